"""`rapid shard`: byte-exact round trip through stock webdataset, bounds, manifest, determinism,
quarantine of undecodable images, entity rows that index the TransE embeddings."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rapid_pipeline import shard, transe
from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake
from rapid_pipeline.core.atomic import sha256_file
from rapid_pipeline.ingest.blobs import put_blob

from .test_transe import entity_id, lake_table

DOMAIN = "shardtest"
NAMES = ["草莓", "香蕉", "苹果", "葡萄", "西瓜"]
TINY = dataclasses.replace(shard.PRESETS["tiny"], image_size=32, max_samples_per_shard=7)


def image_bytes(i: int) -> bytes:
    """Varied sizes, modes and formats; seeded, so the blobs are the same every run."""
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    if i % 3 == 0:
        img.convert("RGBA").save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_domain(home, domain: str = DOMAIN, n: int = 40, bad: bool = True, embeddings: bool = True) -> dict:
    """pairs (two partitions, one duplicated pair), blobs, links and a TransE embeddings folder.

    With `bad`, one pair's blob is truncated and one pair's blob is missing (both must be quarantined).
    """
    rng = random.Random(1)
    rows, links = {"2025-01-01": [], "2025-01-02": []}, []
    for i in range(n):
        data = image_bytes(i)
        if bad and i == 3:
            data = data[: len(data) // 3]  # truncated: decode_image refuses it
        sha = put_blob(home, data) if not (bad and i == 5) else hashlib.sha256(b"missing").hexdigest()
        a, b = rng.sample(NAMES, 2)
        caption = f"一只{a}和{b}在桌上{i}"
        pid = hashlib.sha256(f"{sha}\0{caption}".encode()).hexdigest()[:16]
        split = ("train", "train", "train", "val", "test")[i % 5]
        part = "2025-01-01" if i < n // 2 else "2025-01-02"
        rows[part].append({"pair_id": pid, "caption": caption, "image_sha256": sha, "split": split, "source_pos": i})
        start = caption.index(a)
        links.append({"pair_id": pid, "entity_id": entity_id(domain, a), "start": start, "end": start + len(a), "surface": a})
        start = caption.index(b)
        links.append({"pair_id": pid, "entity_id": entity_id(domain, b), "start": start, "end": start + len(b), "surface": b})
    rows["2025-01-02"].append(dict(rows["2025-01-01"][0], source_pos=999))  # the same pair ingested twice
    for part, rs in rows.items():
        lake.publish_table(home, "pairs", domain, part, lake_table("pairs", {
            "domain": [domain] * len(rs), "partition": [part] * len(rs), "pair_id": [r["pair_id"] for r in rs],
            "caption_raw": [r["caption"] for r in rs], "caption": [r["caption"] for r in rs],
            "caption_simplified": [r["caption"] for r in rs], "image_sha256": [r["image_sha256"] for r in rs],
            "width": [1] * len(rs), "height": [1] * len(rs), "split": [r["split"] for r in rs],
            "source_file": ["pairs.csv"] * len(rs), "source_pos": [r["source_pos"] for r in rs]}), "test")
    lake.publish_table(home, "links", domain, "all", lake_table("links", {
        "domain": [domain] * len(links), "partition": ["all"] * len(links),
        **{k: [link[k] for link in links] for k in ("pair_id", "entity_id", "start", "end", "surface")},
        "method": ["exact"] * len(links)}), "test")
    if embeddings:
        publish_embeddings(home, domain, NAMES[:-1])  # 西瓜 has no vector -> emb_row -1
    return {"pairs": sum(len(r) for r in rows.values()), "unique": n}


def publish_embeddings(home, domain: str, names: list[str], dim: int = 8) -> Path:
    ids = pa.array([entity_id(domain, x) for x in names])
    matrix = np.random.default_rng(0).normal(size=(len(names), dim)).astype(np.float32)
    files = {transe.EMBEDDINGS: transe.vectors_table(ids, matrix, "entity_id"),
             transe.RELATIONS: transe.vectors_table(pa.array(["r0"]), matrix[:1], "relation_id")}
    return transe.publish_run(home, domain, "testrun0", files, {"metrics.json": {}, "config.json": {"dim": dim}})


def read_tar_members(path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ----------------------------------------------------------------------------------------- tests
def test_round_trip_through_stock_webdataset_is_byte_exact(home):
    import webdataset as wds

    build_domain(home)
    report = shard.run(TINY, home, DOMAIN)
    root = home.shards / DOMAIN
    manifest = json.loads((root / "manifest.json").read_text())
    pairs = {r["pair_id"]: r for r in lake.read_table(home, "pairs", DOMAIN).to_pylist()}
    links = lake.read_table(home, "links", DOMAIN).to_pylist()
    emb_ids, _ = transe.load_embeddings(home.models / "transe" / DOMAIN)
    seen, rows_seen = set(), set()
    for split, info in manifest["splits"].items():
        urls = [str(root / s["path"]) for s in info["shards"]]
        got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else []
        assert len(got) == info["samples"]
        for sample in got:
            key = sample["__key__"]
            pair = pairs[key]
            expected = shard.prepare_image((home.lake / "blobs" / pair["image_sha256"][:2] / pair["image_sha256"]).read_bytes(),
                                           32, 95)
            assert sample["jpg"] == expected  # the image bytes we wrote, untouched by the tar layer
            assert sample["txt"] == pair["caption"].encode()
            meta = json.loads(sample["json"])
            assert meta["pair_id"] == key and meta["split"] == split == pair["split"] and meta["domain"] == DOMAIN
            assert meta["caption"] == pair["caption"] and meta["caption_simplified"] == pair["caption_simplified"]
            want = sorted((x["start"], x["end"], x["entity_id"]) for x in links if x["pair_id"] == key)
            assert [(e["start"], e["end"], e["entity_id"]) for e in meta["entities"]] == want
            for e in meta["entities"]:
                assert set(e) == {"entity_id", "start", "end", "surface", "emb_row"}
                assert pair["caption"][e["start"]:e["end"]] == e["surface"]
                assert e["emb_row"] == (emb_ids.index(e["entity_id"]) if e["entity_id"] in emb_ids else -1)
                rows_seen.add(e["emb_row"])
            img = Image.open(io.BytesIO(sample["jpg"]))
            assert img.size == (32, 32) and img.mode == "RGB"
            seen.add(key)
    assert len(seen) == report.rows_out == 38  # 40 unique pairs, 2 bad images
    assert {-1, 0, 1, 2, 3} == rows_seen  # 西瓜 has no vector; the four others index the embeddings


def test_counts_reconcile_and_bad_images_are_quarantined(home):
    counts = build_domain(home)
    report = shard.run(TINY, home, DOMAIN)
    assert report.rows_in == counts["pairs"] == 41
    assert (report.rows_out, report.rows_quarantined, report.rows_duplicate) == (38, 2, 1)
    q = lake.read_table(home, "quarantine", DOMAIN).to_pylist()
    q = [r for r in q if r["stage"] == "shard"]
    assert sorted(r["reason"] for r in q) == ["missing_blob", "undecodable"]
    assert {r["source_pos"] for r in q} == {3, 5}
    manifest = json.loads((home.shards / DOMAIN / "manifest.json").read_text())
    assert manifest["samples"] == 38 == sum(v["samples"] for v in manifest["splits"].values())


def test_shard_bounds_and_manifest_checksums(home):
    build_domain(home, bad=False)
    by_count = shard.run(TINY, home, DOMAIN)
    manifest = json.loads((home.shards / DOMAIN / "manifest.json").read_text())
    shards = [s for v in manifest["splits"].values() for s in v["shards"]]
    assert all(s["samples"] <= 7 for s in shards) and len(manifest["splits"]["train"]["shards"]) == 4  # 24 train
    assert by_count.extra["shards"] == len(shards)
    for s in shards:
        path = home.shards / DOMAIN / s["path"]
        assert sha256_file(path) == s["sha256"] and path.stat().st_size == s["bytes"]
        assert len(read_tar_members(path)) == 3 * s["samples"]
    assert sorted(p.name for p in (home.shards / DOMAIN / "train").iterdir()) == [f"{i:06d}.tar" for i in range(4)]
    # Byte bound: about three samples of 32x32 JPEG per 20 KiB shard.
    cfg = dataclasses.replace(TINY, max_samples_per_shard=1000, max_bytes_per_shard=20480)
    shard.run(cfg, home, DOMAIN)
    manifest = json.loads((home.shards / DOMAIN / "manifest.json").read_text())
    shards = [s for v in manifest["splits"].values() for s in v["shards"]]
    assert all(s["bytes"] <= 20480 for s in shards) and max(s["samples"] for s in shards) > 1
    assert sum(s["samples"] for s in shards) == 40
    emb = manifest["embeddings"]
    emb_path = (home.shards / DOMAIN / emb["path"]).resolve()
    assert emb_path == (transe.resolve_run(home.models / "transe" / DOMAIN) / "embeddings.parquet").resolve()
    assert emb["fingerprint"] == sha256_file(emb_path) and (emb["dim"], emb["rows"]) == (8, 4)
    assert manifest["image_size"] == 32 and manifest["image_format"]["quality"] == 95


def test_two_runs_write_identical_tars_and_the_shuffle_is_seeded(tmp_path):
    from rapid_pipeline.core.home import Home

    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        home = Home.from_env(tmp_path / name)
        build_domain(home, bad=False)
        shard.run(dataclasses.replace(TINY, seed=seed), home, DOMAIN)
        manifest = json.loads((home.shards / DOMAIN / "manifest.json").read_text())
        digests.append([s["sha256"] for v in manifest["splits"].values() for s in v["shards"]])
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_order_is_a_shuffle_not_the_ingest_order(home):
    build_domain(home, bad=False)
    shard.run(TINY, home, DOMAIN)
    keys = [n[:-4] for s in json.loads((home.shards / DOMAIN / "manifest.json").read_text())["splits"]["train"]["shards"]
            for n in read_tar_members(home.shards / DOMAIN / s["path"]) if n.endswith(".txt")]
    assert len(keys) == len(set(keys)) == 24 and keys != sorted(keys)


def test_cli_cache_and_clear_errors(home):
    with pytest.raises(FileNotFoundError, match="rapid kg transe"):
        invoke(["shard", "--domain", DOMAIN], home=home.root)
    build_domain(home, bad=False)
    first = invoke(["shard", "--domain", DOMAIN, "--image-size", "32", "--max-samples-per-shard", "10"], home=home.root)
    assert first["status"] == "ok" and first["rows_out"] == 40
    again = invoke(["shard", "--domain", DOMAIN, "--image-size", "32", "--max-samples-per-shard", "10"], home=home.root)
    assert again["status"] == "cached"
    no_emb = shard.run(dataclasses.replace(TINY, embeddings="none"), home, DOMAIN)
    manifest = json.loads((home.shards / DOMAIN / "manifest.json").read_text())
    assert no_emb.status == "ok" and manifest["embeddings"] is None
    tar = home.shards / DOMAIN / manifest["splits"]["train"]["shards"][0]["path"]
    metas = [json.loads(v) for k, v in read_tar_members(tar).items() if k.endswith(".json")]
    assert all(e["emb_row"] == -1 for m in metas for e in m["entities"])


def test_a_crash_mid_write_leaves_the_previous_shard_set_intact(home, monkeypatch):
    from rapid_pipeline.core.faults import InjectedFault

    build_domain(home, bad=False)
    shard.run(TINY, home, DOMAIN)
    root = home.shards / DOMAIN
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    monkeypatch.setenv("RAPID_FAULT", "shard:mid_write:raise")
    with pytest.raises(InjectedFault):
        shard.run(dataclasses.replace(TINY, image_size=48), home, DOMAIN)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before
    assert len(list(home.shards.glob(f".tmp-*-{DOMAIN}"))) == 1  # the crashed staging folder, never published
    monkeypatch.delenv("RAPID_FAULT")
    shard.run(dataclasses.replace(TINY, image_size=48), home, DOMAIN)
    assert not list(home.shards.glob(f".tmp-*-{DOMAIN}"))  # cleaned up by the next run
