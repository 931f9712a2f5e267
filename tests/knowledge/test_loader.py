"""`rapid_pipeline.data.loader`: deterministic order, exact resume with `start`, embeddings checked
against the manifest, and a torch IterableDataset that splits work without duplicates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from rapid_pipeline import shard, transe
from rapid_pipeline.core.images import decode_image
from rapid_pipeline.data.loader import ShardDataset, iter_raw, iter_samples, load_embeddings_for

from .test_shard import DOMAIN, build_domain, read_tar_members

CFG = dataclasses.replace(shard.PRESETS["tiny"], image_size=32, max_samples_per_shard=5)


@pytest.fixture
def shard_root(home):
    build_domain(home, n=50, bad=False)
    shard.run(CFG, home, DOMAIN)
    return home.shards / DOMAIN


def keys(it) -> list[str]:
    return [s["key"] if isinstance(s, dict) else s[1] for s in it]


def test_samples_match_the_tars(shard_root):
    manifest = json.loads((shard_root / "manifest.json").read_text())
    tar_members = {}
    for s in manifest["splits"]["train"]["shards"]:
        tar_members.update(read_tar_members(shard_root / s["path"]))
    samples = list(iter_samples(shard_root, "train"))
    assert len(samples) == manifest["splits"]["train"]["samples"] == 30
    for s in samples:
        assert isinstance(s["image"], Image.Image) and s["image"].mode == "RGB" and s["image"].size == (32, 32)
        assert np.array_equal(np.asarray(s["image"]), np.asarray(decode_image(tar_members[s["key"] + ".jpg"])))
        meta = json.loads(tar_members[s["key"] + ".json"])
        assert s["caption"] == meta["caption"] and s["entities"] == meta["entities"]
        assert s["caption_simplified"] == meta["caption_simplified"]
    # Unshuffled order = manifest shard order, then tar order.
    tar_order = [n[:-4] for sh in manifest["splits"]["train"]["shards"]
                 for n in read_tar_members(shard_root / sh["path"]) if n.endswith(".txt")]
    assert keys(samples) == tar_order


@pytest.mark.parametrize("seed", [None, 7])
def test_start_resumes_at_the_exact_sample(shard_root, seed):
    full = keys(iter_raw(shard_root, "train", seed=seed, buffer=8))
    assert len(full) == len(set(full)) == 30
    for start in (0, 1, 5, 13, 29, 30):
        assert keys(iter_raw(shard_root, "train", seed=seed, start=start, buffer=8)) == full[start:]
    resumed = keys(iter_samples(shard_root, "train", seed=seed, start=13, buffer=8))
    assert resumed == full[13:]


def test_seeded_order_is_deterministic_and_seed_dependent(shard_root):
    a = keys(iter_raw(shard_root, "train", seed=3, buffer=8))
    assert a == keys(iter_raw(shard_root, "train", seed=3, buffer=8))
    assert a != keys(iter_raw(shard_root, "train", seed=4, buffer=8))
    assert sorted(a) == sorted(keys(iter_raw(shard_root, "train")))
    assert a != keys(iter_raw(shard_root, "train"))


def test_embeddings_are_checked_against_the_manifest(shard_root, home):
    matrix = load_embeddings_for(shard_root)
    ids, expected = transe.load_embeddings(home.models / "transe" / DOMAIN)
    assert matrix.dtype == np.float32 and np.array_equal(matrix, expected)
    sample = next(iter(ShardDataset(shard_root, "train")))
    for ent, vec in zip(sample["entities"], sample["entity_vectors"]):
        assert np.array_equal(vec, matrix[ent["emb_row"]] if ent["emb_row"] >= 0 else np.zeros(matrix.shape[1]))
    assert sample["entity_vectors"].shape == (len(sample["entities"]), 8)
    path = transe.resolve_run(home.models / "transe" / DOMAIN) / "embeddings.parquet"
    path.write_bytes(path.read_bytes() + b"\0")  # tampered after sharding
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_embeddings_for(shard_root)


def test_dataset_splits_across_ranks_and_workers_without_duplicates(shard_root):
    import torch
    from torch.utils.data import DataLoader

    everything = keys(iter_raw(shard_root, "train", seed=1))
    seen = []
    for rank in range(2):
        ds = ShardDataset(shard_root, "train", transform=lambda im: torch.from_numpy(np.asarray(im).copy()),
                          seed=1, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        got = [s["key"] for s in loader]
        assert len(got) == len(ds) == 15
        seen += got
    assert sorted(seen) == sorted(everything) and len(set(seen)) == 30
    ds = ShardDataset(shard_root, "train", seed=1, start=10, rank=0, world_size=1)
    assert [s["key"] for s in ds] == everything[10:]
    sample = next(iter(ShardDataset(shard_root, "val", transform=lambda im: np.asarray(im), rank=0, world_size=1)))
    assert sample["image"].shape == (32, 32, 3)


def test_clear_errors(tmp_path, shard_root):
    with pytest.raises(FileNotFoundError, match="rapid shard"):
        list(iter_samples(tmp_path, "train"))
    with pytest.raises(ValueError, match="unknown split"):
        list(iter_samples(shard_root, "dev"))
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(shard_root, "train", rank=2, world_size=2)
