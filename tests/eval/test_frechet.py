"""Fréchet distance: self-distance ≈ 0, closed form for known Gaussians, streaming stats, the one
resize, parallel decoding = serial decoding, torchmetrics FID agrees with our formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rapid_pipeline.metrics import GaussianStats, frechet_distance, gaussian_stats
from rapid_pipeline.metrics import features as F


def test_self_distance_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32)) @ np.random.default_rng(1).normal(size=(32, 32))
    mu, sigma = gaussian_stats(x)
    scale = np.trace(sigma)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu, sigma, mu, sigma, method=method) <= 1e-6 * scale


def test_rank_deficient_self_distance_is_zero():
    x = np.random.default_rng(2).normal(size=(10, 64))  # fewer samples than dimensions
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) <= 1e-6 * np.trace(sigma)


def test_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))  # = 5 + (1 + 1 + 6.25)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), method=method) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(13.25)


def test_non_diagonal_closed_form_by_rotation():
    """A shared rotation leaves the distance unchanged: rotate the diagonal case and compare."""
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    rotated = frechet_distance(q @ mu1, q @ d1 @ q.T, q @ mu2, q @ d2 @ q.T)
    assert rotated == pytest.approx(13.25, rel=1e-9)


def test_sampled_gaussians_approach_closed_form():
    rng = np.random.default_rng(4)
    a = rng.normal(loc=[0, 0], scale=[1, 2], size=(200_000, 2))
    b = rng.normal(loc=[3, 0], scale=[2, 1], size=(200_000, 2))
    value = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert value == pytest.approx(9 + (1 + 4 - 4) + (4 + 1 - 4), rel=0.01)


def test_streaming_stats_match_batch(tmp_path):
    x = np.random.default_rng(5).normal(size=(301, 8))
    stream = GaussianStats(8)
    for i in range(0, 301, 64):
        stream.update(x[i:i + 64])
    mu, cov = stream.mean_cov()
    assert np.allclose(mu, x.mean(0)) and np.allclose(cov, np.cov(x, rowvar=False))
    stream.save(tmp_path / "s.npz")
    back = GaussianStats.load(tmp_path / "s.npz")
    assert back.n == 301 and np.array_equal(back.outer, stream.outer)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_clean_resize_is_pil_bicubic_uint8():
    img = Image.fromarray(np.random.default_rng(6).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    out = F.clean_resize(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 299, 299)
    ref = np.asarray(img.resize((299, 299), Image.BICUBIC))
    assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)
    # float [0, 1] arrays (pipeline np output) are rounded to uint8 first, like PIL output
    assert np.array_equal(np.asarray(F.to_pil(np.asarray(img) / 255.0)), np.asarray(img))


def test_index_split_and_parallel_decoding_match_serial(shards):
    refs = F.index_split(shards, "test", limit=7)
    assert len(refs) == 7 and refs[0].caption.startswith("一个")  # first 7 in manifest/tar order, across 2 shards
    serial = torch.cat(list(F.iter_uint8_batches(F.ShardImages(refs), batch_size=3, workers=0)))
    parallel = torch.cat(list(F.iter_uint8_batches(F.ShardImages(refs), batch_size=3, workers=2)))
    assert torch.equal(serial, parallel) and serial.shape == (7, 3, 299, 299)


def _random_inception_weights(path, monkeypatch):
    """A random-init InceptionV3 state dict with torch-fidelity's key layout (nothing downloaded)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    from rapid_pipeline.core.checkpoint import save_state_dict

    with monkeypatch.context() as m:
        m.setattr(fe.torch, "load", lambda *a, **k: {})
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    save_state_dict(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_torchmetrics_fid_matches_our_formula(tmp_path, monkeypatch, shards):
    pytest.importorskip("torch_fidelity", reason="FID needs torch-fidelity (pip install torch-fidelity==0.4.0)")
    from rapid_pipeline.evaluate import fid_value
    from rapid_pipeline.metrics.features import InceptionFeatures, extract
    from rapid_pipeline.metrics.frechet import frechet_from_stats

    weights = _random_inception_weights(tmp_path / "inception.safetensors", monkeypatch)
    ext = InceptionFeatures(weights)
    refs = F.index_split(shards, "test")
    real, _ = extract(ext, F.iter_uint8_batches(F.ShardImages(refs[:4]), 4))
    fake, _ = extract(ext, F.iter_uint8_batches(F.ShardImages(refs[4:8]), 4))
    ours = frechet_from_stats(real, fake)
    assert ours > 0 and fid_value(ext, real, fake) == pytest.approx(ours, rel=1e-4)
    assert fid_value(ext, real, real) == pytest.approx(0.0, abs=1e-3 * max(ours, 1.0))
