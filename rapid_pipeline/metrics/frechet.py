"""Fréchet distance between two Gaussians fitted to feature sets (the formula behind FID).

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)

Used for FID (Inception pool features) and for ``frechet_ckclip`` (CKCLIP image embeddings);
which one a number is, is the caller's label, never this module's.

Invariants: statistics are accumulated in float64 and streamed (`GaussianStats.update`), so a set
of any size needs O(dim²) memory; the trace of the matrix square root uses the symmetric form
S1^½ S2 S1^½ (PSD by construction), whose eigenvalues are clipped at 0 — stable for rank-deficient
covariances (fewer samples than dimensions) and exactly 0 for a set against itself. ``method="sqrtm"``
gives the classic scipy ``sqrtm(S1 @ S2)`` for cross-checking.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_write_bytes


@dataclass
class GaussianStats:
    """Streaming mean / covariance of feature vectors (float64 sums)."""

    dim: int
    n: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.total = np.zeros(self.dim) if self.total is None else self.total
        self.outer = np.zeros((self.dim, self.dim)) if self.outer is None else self.outer

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        self.n += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2  # symmetrise away summation round-off

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, dim=self.dim, n=self.n, total=self.total, outer=self.outer)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "GaussianStats":
        with np.load(path) as z:
            return cls(int(z["dim"]), int(z["n"]), z["total"].copy(), z["outer"].copy())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a [N, D] feature matrix (unbiased covariance)."""
    features = np.asarray(features, dtype=np.float64)
    stats = GaussianStats(features.shape[1])
    stats.update(features)
    return stats.mean_cov()


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str) -> float:
    if method == "eigh":
        root1 = _psd_sqrt(s1)
        middle = root1 @ s2 @ root1
        w = np.linalg.eigvalsh((middle + middle.T) / 2)
        return float(np.sqrt(np.clip(w, 0.0, None)).sum())
    if method == "sqrtm":
        from scipy import linalg

        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # singular product: nudge the diagonal (standard FID fix)
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        return float(np.real(np.trace(covmean)))
    raise ValueError(f"unknown method {method!r}: use 'eigh' or 'sqrtm'")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); never negative."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2, method)
    return max(float(value), 0.0)


def frechet_from_stats(a: GaussianStats, b: GaussianStats, method: str = "eigh") -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov(), method=method)
