"""Learning-rate schedules shared by the trainers that are not upstream's teacher recipe (student, image encoder)."""
from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.05):
    """Linear warm-up then cosine decay, well defined for any run length (OneCycleLR fails below ~10 steps)."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return factor
