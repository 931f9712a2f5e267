"""`rapid ingest pairs`: every input format, the demo drop's exact expected counts, every bad-input
kind quarantined with its reason, odd image modes accepted as RGB, reruns and partitions."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rapid_pipeline import cli
from rapid_pipeline.core import lake, warehouse
from rapid_pipeline.core.atomic import read_manifest
from rapid_pipeline.core.home import Home
from rapid_pipeline.core.images import decode_image
from rapid_pipeline.demo import DemoConfig, draw_scene, encode, ENTITIES, write_demo
from rapid_pipeline.ingest import side_partition
from rapid_pipeline.ingest.blobs import blob_path, put_blob, read_blob
from rapid_pipeline.ingest.pairs import PairsIngestConfig, run, split_of

CFG = PairsIngestConfig()


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    root = tmp_path_factory.mktemp("landing")
    write_demo(root, DemoConfig(seed=7, pairs=40))
    return root


@pytest.fixture(scope="module")
def ingested(drop, tmp_path_factory):
    home = Home.from_env(tmp_path_factory.mktemp("home"))
    report = run(CFG, home, [drop / "pairs"], "demo", "2025-01-01")
    return home, report


def _q(home, partition, stage="ingest_pairs"):
    return lake.read_partition(home, "quarantine", "demo", side_partition(stage, partition)).to_pylist()


def _image(seed: int, size=(96, 96)) -> bytes:
    import random

    return encode(draw_scene(random.Random(seed), [ENTITIES[seed % len(ENTITIES)]], *size), "JPEG")


# --------------------------------------------------------------------------- the demo drop

def test_demo_drop_matches_expected_exactly(drop, ingested):
    home, report = ingested
    exp = json.loads((drop / "expected.json").read_text())
    assert report.status == "ok"
    assert (report.rows_in, report.rows_out, report.rows_duplicate, report.rows_quarantined) == (
        exp["rows_in"], exp["accepted"], exp["duplicates"], exp["quarantined"])
    assert report.rows_in == report.rows_out + report.rows_quarantined + report.rows_duplicate
    reasons = Counter(r["reason"] for r in _q(home, "2025-01-01"))
    assert dict(reasons) == exp["quarantined_by_reason"] == report.extra["reasons"]
    pairs = lake.read_partition(home, "pairs", "demo", "2025-01-01").to_pylist()
    assert len(pairs) == exp["accepted"] and len({p["pair_id"] for p in pairs}) == len(pairs)
    labels = [json.loads(x) for x in (drop / "labels.jsonl").read_text().splitlines()]
    assert {lab["pair_id"] for lab in labels} == {p["pair_id"] for p in pairs}
    by_id = {p["pair_id"]: p for p in pairs}
    assert all(by_id[lab["pair_id"]]["caption"] == lab["caption"] for lab in labels)


def test_pairs_rows_follow_the_contract(ingested):
    home, _ = ingested
    for p in lake.read_partition(home, "pairs", "demo", "2025-01-01").to_pylist():
        data = read_blob(home, p["image_sha256"])
        assert hashlib.sha256(data).hexdigest() == p["image_sha256"]
        assert p["pair_id"] == hashlib.sha256((p["image_sha256"] + "\0" + p["caption"]).encode()).hexdigest()[:16]
        assert p["split"] == split_of(p["image_sha256"], CFG) and p["domain"] == "demo" and p["partition"] == "2025-01-01"
        assert min(p["width"], p["height"]) >= 64
    # The simplified column converts traditional captions; the normalised one folds full-width forms.
    captions = {p["caption_raw"]: p for p in lake.read_partition(home, "pairs", "demo", "2025-01-01").to_pylist()}
    trad = [p for raw, p in captions.items() if "一張" in raw]
    assert trad and all(p["caption_simplified"].startswith("一张") for p in trad)
    assert not any("\u200b" in p["caption"] or "：" in p["caption"] or "１" in p["caption"] for p in captions.values())


def test_every_bad_kind_has_its_reason(ingested):
    home, _ = ingested
    rows = _q(home, "2025-01-01")
    by_file = {}
    for r in rows:
        for needle in ("bomb.png", "tiny.jpg", "wide.jpg", "zero.jpg", "truncated.jpg", "does_not_exist", "remote.jpg", "only_one_column"):
            if needle in r["raw"]:
                by_file[needle] = r["reason"]
    assert by_file == {"bomb.png": "too_many_pixels", "tiny.jpg": "too_small", "wide.jpg": "bad_aspect", "zero.jpg": "empty_image",
                       "truncated.jpg": "undecodable", "does_not_exist": "missing_image", "remote.jpg": "remote_url",
                       "only_one_column": "bad_row"}
    bad_utf8 = next(r for r in rows if r["reason"] == "invalid_utf8")
    assert "\\xff" in bad_utf8["raw"]
    assert next(r for r in rows if r["reason"] == "nul_byte")["raw"].count("\\x00") == 1
    assert len(next(r for r in rows if r["reason"] == "too_long")["raw"]) <= 2048
    assert next(r for r in rows if r["reason"] == "missing_caption")["source_file"] == "img2dataset/00000.tar"
    assert all(r["stage"] == "ingest_pairs" and r["source_pos"] > 0 for r in rows if r["source_file"] == "wukong.csv")


def test_odd_image_modes_are_accepted_as_rgb(ingested):
    home, _ = ingested
    pairs = {p["caption"]: p for p in lake.read_partition(home, "pairs", "demo", "2025-01-01").to_pylist()}
    img = {name: decode_image(read_blob(home, pairs[f"一张草莓的照片({name})"]["image_sha256"])) for name in
           ("cmyk", "gray16", "palette", "rgba", "exif_rotated")}
    assert all(im.mode == "RGB" for im in img.values())
    rot = img["exif_rotated"]
    assert rot.size == (64, 128) and pairs["一张草莓的照片(exif_rotated)"]["width"] == 64
    top, bottom = rot.getpixel((32, 10)), rot.getpixel((32, 118))
    assert top[0] > 180 and top[2] < 80 and bottom[2] > 180 and bottom[0] < 80  # red on top, blue below
    assert min(img["rgba"].getpixel((0, 0))) >= 250  # transparent -> white
    assert img["rgba"].getpixel((40, 40))[0] > 180 and img["rgba"].getpixel((40, 40))[1] < 80
    assert all(abs(c - 128) <= 2 for c in img["gray16"].getpixel((5, 5)))  # 32768/65535 -> 128
    assert min(img["cmyk"].getpixel((1, 1))) > 150  # light background, not inverted by the CMYK path
    assert img["palette"].size == (96, 96)


def test_stats_table_and_warehouse_view(ingested):
    home, report = ingested
    stats = lake.read_partition(home, "ingest_stats", "demo", side_partition("ingest_pairs", "2025-01-01")).to_pylist()
    total = next(s for s in stats if s["source_file"] == "*")
    assert total["rows_in"] == report.rows_in and total["accepted"] == report.rows_out and total["seconds"] >= 0
    per_file = [s for s in stats if s["source_file"] != "*"]
    assert {s["source_file"] for s in per_file} == {"wukong.csv", "img2dataset/00000.tar"}
    assert sum(s["rows_in"] for s in per_file) == total["rows_in"]
    assert all(s["rows_in"] == s["accepted"] + s["quarantined"] + s["duplicates"] for s in stats)
    n = warehouse.query(home, "SELECT count(*) AS n FROM pairs WHERE domain = ?", ["demo"]).column("n")[0].as_py()
    assert n == report.rows_out


# --------------------------------------------------------------------------- reruns and partitions

def test_rerun_is_cached_and_forced_rerun_is_byte_identical(drop, home):
    first = run(CFG, home, [drop / "pairs"], "demo", "p1")
    manifests = {(t, p): read_manifest(home.partition_dir(t, "demo", p)) for t, p in
                 (("pairs", "p1"), ("quarantine", side_partition("ingest_pairs", "p1")))}
    again = run(CFG, home, [drop / "pairs"], "demo", "p1")
    assert again.status == "cached" and again.cached_from == first.run_id and again.rows_out == first.rows_out
    forced = run(CFG, home, [drop / "pairs"], "demo", "p1", force=True)
    assert forced.status == "ok" and forced.rows_duplicate == first.rows_duplicate  # its own rows are not "seen" twice
    for (t, p), m in manifests.items():
        assert read_manifest(home.partition_dir(t, "demo", p))["files"] == m["files"]
    assert lake.read_table(home, "pairs", "demo").num_rows == first.rows_out


def test_two_partitions_do_not_interfere(tmp_path, home):
    write_demo(tmp_path / "land", DemoConfig(seed=1, pairs=12, days=2, start="2025-02-01"))
    d1, d2 = tmp_path / "land/2025-02-01", tmp_path / "land/2025-02-02"
    r1 = run(CFG, home, [d1 / "pairs"], "demo", "2025-02-01")
    r2 = run(CFG, home, [d2 / "pairs"], "demo", "2025-02-02")
    m2 = read_manifest(home.partition_dir("pairs", "demo", "2025-02-02"))
    for r, d in ((r1, d1), (r2, d2)):
        exp = json.loads((d / "expected.json").read_text())
        assert (r.rows_out, r.rows_duplicate, r.rows_quarantined) == (exp["accepted"], exp["duplicates"], exp["quarantined"])
    run(CFG, home, [d1 / "pairs"], "demo", "2025-02-01", force=True)
    assert read_manifest(home.partition_dir("pairs", "demo", "2025-02-02")) == m2
    assert len(_q(home, "2025-02-01")) == r1.rows_quarantined and len(_q(home, "2025-02-02")) == r2.rows_quarantined
    ids = lake.read_table(home, "pairs", "demo", ["pair_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids))


def test_same_drop_in_another_partition_is_all_duplicates(drop, home):
    first = run(CFG, home, [drop / "pairs"], "demo", "a")
    second = run(CFG, home, [drop / "pairs"], "demo", "b")
    assert second.rows_out == 0 and second.rows_duplicate == first.rows_out + first.rows_duplicate
    alone = run(PairsIngestConfig(dedupe_across_partitions=False), home, [drop / "pairs"], "demo", "c")
    assert alone.rows_out == first.rows_out


# --------------------------------------------------------------------------- other input formats

def test_parquet_with_custom_columns_and_file_urls(tmp_path, home):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(6):
        (imgs / f"{i}.jpg").write_bytes(_image(i))
        url = (imgs / f"{i}.jpg").as_uri() if i % 2 else f"imgs/{i}.jpg"
        rows.append({"image_path": url, "text": f"一张{ENTITIES[i]['name']}的照片"})
    rows.append({"image_path": "imgs/0.jpg", "text": None})
    rows.append({"image_path": "imgs/1.jpg", "text": "bad\x00caption"})
    rows.append({"image_path": "../outside.jpg", "text": "一张苹果的照片"})        # escapes the image root
    (tmp_path.parent / "outside.jpg").write_bytes(_image(9))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "w.parquet")
    cfg = PairsIngestConfig(url_column="image_path", caption_column="text")
    rep = run(cfg, home, [tmp_path / "w.parquet"], "demo", "pq")
    assert (rep.rows_in, rep.rows_out, rep.rows_quarantined) == (9, 6, 3)
    assert Counter(r["reason"] for r in _q(home, "pq")) == {"missing_caption": 1, "nul_byte": 1, "bad_url": 1}
    with pytest.raises(ValueError, match="no column 'url'"):
        run(CFG, home, [tmp_path / "w.parquet"], "demo", "pq2")


def test_image_folder_with_sidecars(tmp_path, home):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.jpg", "b.png", "sub/c.jpg", "d.jpg"]):
        data = _image(i) if rel.endswith("jpg") else encode(Image.open(io.BytesIO(_image(i))), "PNG")
        (folder / rel).write_bytes(data)
        if rel != "d.jpg":
            (folder / rel).with_suffix(".txt").write_text(f"桌上放着一个{ENTITIES[i]['name']}\n", encoding="utf-8")
    rep = cli.invoke(["ingest", "pairs", "--images", str(folder), "--domain", "demo", "--partition", "dir"], home=home.root)
    assert (rep["rows_in"], rep["rows_out"], rep["rows_quarantined"]) == (4, 3, 1)
    q = _q(home, "dir")
    assert q[0]["reason"] == "missing_caption" and q[0]["source_file"] == "folder/d.jpg"
    files = {p["source_file"] for p in lake.read_partition(home, "pairs", "demo", "dir").to_pylist()}
    assert files == {"folder/a.jpg", "folder/b.png", "folder/sub/c.jpg"}


def _tar(path: Path, members, gz=False):
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_img2dataset_tar_variants(tmp_path, home):
    meta = lambda k, cap, status="success": json.dumps({"key": k, "caption": cap, "status": status, "url": "x"}).encode()
    members = [("000.jpg", _image(1)), ("000.txt", "一张苹果的照片".encode()), ("000.json", meta("000", "ignored")),
               ("001.jpg", _image(2)), ("001.json", meta("001", "一张香蕉的照片")),           # caption only in the json
               ("002.txt", "一张葡萄的照片".encode()),                                          # no image member
               ("003.jpg", _image(3)), ("003.txt", b"\xff\xfe"),                                # invalid UTF-8
               ("004.jpg", _image(4)), ("004.txt", "一张柠檬的照片".encode()), ("004.json", meta("004", "", "failed_to_download"))]
    _tar(tmp_path / "t.tar.gz", members, gz=True)
    rep = run(CFG, home, [tmp_path / "t.tar.gz"], "demo", "tar")
    assert (rep.rows_in, rep.rows_out) == (5, 2)
    q = {r["source_pos"]: r["reason"] for r in _q(home, "tar")}
    assert q == {2: "missing_image", 3: "invalid_utf8", 4: "download_failed"}
    caps = sorted(p["caption"] for p in lake.read_partition(home, "pairs", "demo", "tar").to_pylist())
    assert caps == ["一张苹果的照片", "一张香蕉的照片"]


def test_cli_flags_override_limits(drop, home):
    rep = cli.invoke(["ingest", "pairs", str(drop / "pairs" / "wukong.csv"), "--domain", "demo", "--partition", "big",
                      "--min-side", "100", "--max-caption-chars", "8"], home=home.root)
    reasons = rep["extra"]["reasons"]
    assert reasons["too_small"] > 1 and reasons["too_long"] > 1
    assert rep["rows_in"] == rep["rows_out"] + rep["rows_quarantined"] + rep["rows_duplicate"]


def test_missing_header_column_is_a_one_line_error(tmp_path, home):
    (tmp_path / "x.csv").write_text("path,text\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"x.csv: no column 'url'"):
        run(CFG, home, [tmp_path / "x.csv"], "demo", "x")
    with pytest.raises(FileNotFoundError):
        run(CFG, home, [tmp_path / "nope.csv"], "demo", "x")
    with pytest.raises(ValueError, match="invalid partition"):
        run(CFG, home, [tmp_path / "x.csv"], "demo", "../etc")


# --------------------------------------------------------------------------- helpers

def test_split_is_80_10_10_and_stable():
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    counts = Counter(split_of(s, CFG) for s in shas)
    assert abs(counts["train"] / 20000 - 0.8) < 0.02 and abs(counts["val"] / 20000 - 0.1) < 0.015
    assert [split_of(s, CFG) for s in shas[:100]] == [split_of(s, CFG) for s in shas[:100]]


def test_blobs_are_content_addressed_and_idempotent(home):
    sha = put_blob(home, b"abc")
    assert sha == hashlib.sha256(b"abc").hexdigest() and blob_path(home, sha).parent.name == sha[:2]
    assert put_blob(home, b"abc", durable=False) == sha and read_blob(home, sha) == b"abc"
    assert not [p for p in blob_path(home, sha).parent.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError):
        blob_path(home, "../../etc/passwd")
    with pytest.raises(FileNotFoundError):
        read_blob(home, "0" * 64)


# --------------------------------------------------------------------------- crash safety

def test_killed_ingest_leaves_the_previous_partition_and_reruns_cleanly(drop, home, tmp_path):
    import os
    import subprocess
    import sys

    good = run(CFG, home, [drop / "pairs" / "img2dataset"], "demo", "crash")
    before = read_manifest(home.partition_dir("pairs", "demo", "crash"))
    env = {**os.environ, "RAPID_HOME": str(home.root), "RAPID_FAULT": "ingest_pairs:mid_write:sigkill", "RAPID_OPENLINEAGE": "off"}
    cmd = [sys.executable, "-m", "rapid_pipeline", "ingest", "pairs", str(drop / "pairs"), "--domain", "demo", "--partition", "crash"]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-500:]
    assert read_manifest(home.partition_dir("pairs", "demo", "crash")) == before  # readers still see the old partition
    again = run(CFG, home, [drop / "pairs"], "demo", "crash")
    exp = json.loads((drop / "expected.json").read_text())
    assert again.status == "ok" and again.rows_out == exp["accepted"] and good.rows_out < again.rows_out
    folder = home.partition_dir("pairs", "demo", "crash")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["_manifest.json", *(f["path"] for f in read_manifest(folder)["files"])])
    for p in lake.read_partition(home, "pairs", "demo", "crash").to_pylist():
        assert blob_path(home, p["image_sha256"]).exists()


def test_injected_fault_between_sources_fails_the_run(drop, home, monkeypatch):
    from rapid_pipeline.core.faults import InjectedFault

    monkeypatch.setenv("RAPID_FAULT", "ingest_pairs:after_source:raise")
    with pytest.raises(InjectedFault):
        run(CFG, home, [drop / "pairs"], "demo", "f")
    assert lake.partitions(home, "pairs", "demo") == []
    monkeypatch.delenv("RAPID_FAULT")
    assert run(CFG, home, [drop / "pairs"], "demo", "f").status == "ok"


def test_small_batches_give_the_same_rows(drop, ingested, home, monkeypatch):
    from rapid_pipeline.ingest import pairs as pairs_mod

    monkeypatch.setattr(pairs_mod, "BATCH_ROWS", 4)  # many pair and quarantine batches
    rep = run(CFG, home, [drop / "pairs"], "demo", "2025-01-01")
    ref_home, ref = ingested
    assert (rep.rows_out, rep.rows_quarantined, rep.rows_duplicate) == (ref.rows_out, ref.rows_quarantined, ref.rows_duplicate)
    for table, part in (("pairs", "2025-01-01"), ("quarantine", side_partition("ingest_pairs", "2025-01-01"))):
        assert lake.read_partition(home, table, "demo", part).to_pylist() == lake.read_partition(ref_home, table, "demo", part).to_pylist()


def test_tsv_file_and_empty_call(tmp_path, home):
    (tmp_path / "im").mkdir()
    (tmp_path / "im/a.jpg").write_bytes(_image(5))
    (tmp_path / "p.tsv").write_bytes("url\tcaption\nim/a.jpg\t桌上放着一个西瓜\nim/a.jpg\t\n".encode())
    rep = run(CFG, home, [tmp_path / "p.tsv"], "demo", "tsv")
    assert (rep.rows_in, rep.rows_out, rep.rows_quarantined) == (2, 1, 1)
    row = lake.read_partition(home, "pairs", "demo", "tsv").to_pylist()[0]
    assert (row["source_file"], row["source_pos"], row["caption"]) == ("p.tsv", 2, "桌上放着一个西瓜")
    with pytest.raises(ValueError, match="nothing to ingest"):
        run(CFG, home, [], "demo", "tsv")
