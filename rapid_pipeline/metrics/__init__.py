"""Evaluation metrics: Fréchet distances (FID / frechet_ckclip) and the image features behind them."""

from .frechet import GaussianStats, frechet_distance, frechet_from_stats, gaussian_stats

__all__ = ["GaussianStats", "frechet_distance", "frechet_from_stats", "gaussian_stats"]
