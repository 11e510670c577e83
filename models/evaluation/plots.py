"""Curves from stats.jsonl, written atomically (matplotlib without a display)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ..io.files import atomic_path


def plot_metric_curves(stats_path, png_path, keys=("loss",), x="step", log_y=False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in Path(stats_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r[x], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel(x)
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path)


def save_figure(fig, path, dpi: int = 100) -> None:
    """A matplotlib figure to PNG, atomically, and closed."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
