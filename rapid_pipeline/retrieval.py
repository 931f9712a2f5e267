"""Image-text retrieval metrics: Recall@K in both directions from a similarity matrix.

    sim = text_feats @ image_feats.T              # [N texts, N images]; pair i is (text i, image i)
    recall_at_k(sim, ks=(1, 5, 10))               # {"t2i_R@1": ..., "i2t_R@1": ..., "mean_R": ...}

Invariants: ground truth is the diagonal (one caption per image, as in the shards); a query counts as
a hit at K when its true item's rank (number of items scoring strictly higher) is < K, so ties never
help a query; values are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _ranks(sim: np.ndarray) -> np.ndarray:
    """Rank of the diagonal entry in each row (0 = best)."""
    true = np.diag(sim)[:, None]
    return (sim > true).sum(axis=1)


def recall_at_k(sim: np.ndarray | torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K text→image (rows) and image→text (columns), plus their mean over all K (``mean_R``)."""
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().float().cpu().numpy()
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity matrix must be square and non-empty (text i pairs with image i); got {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity matrix holds NaN or inf")
    out: dict[str, float] = {}
    for name, ranks in (("t2i", _ranks(sim)), ("i2t", _ranks(sim.T))):
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks < k).mean())
    out["mean_R"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks]))
    return out


def similarity(text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N_text, N_image] (features are L2-normalised here, whatever the caller did)."""
    t = torch.nn.functional.normalize(text_feats.float(), dim=-1)
    i = torch.nn.functional.normalize(image_feats.float(), dim=-1)
    return t @ i.t()
