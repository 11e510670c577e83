"""Attribution's search: the reference rows most similar (cosine) to each query, chunked over the reference set."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def top_k_similar(query: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 8192):
    """Cosine similarity of each query row to every reference row (flattened); returns (scores, indices)."""
    q = F.normalize(query.flatten(1).float(), dim=1)
    best_s = torch.full((q.shape[0], 0), -math.inf, device=q.device)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, reference.shape[0], chunk):
        r = F.normalize(reference[start:start + chunk].to(q.device).flatten(1).float(), dim=1)
        s = q @ r.T
        s_all = torch.cat([best_s, s], 1)
        i_all = torch.cat([best_i, torch.arange(start, start + r.shape[0], device=q.device).expand(q.shape[0], -1)], 1)
        best_s, pos = s_all.topk(min(k, s_all.shape[1]), dim=1)
        best_i = i_all.gather(1, pos)
    return best_s, best_i
