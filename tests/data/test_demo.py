"""The demo domain generator: determinism, layout, content that matches the KG, and labels."""

from __future__ import annotations

import json
import tarfile

from PIL import Image

from rapid_pipeline import cli
from rapid_pipeline.core.text import normalize
from rapid_pipeline.demo import COLOURS, DEMO_DOMAIN, ENTITIES, DemoConfig, write_demo


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    write_demo(tmp_path / "a", DemoConfig(seed=3, pairs=40))
    write_demo(tmp_path / "b", DemoConfig(seed=3, pairs=40))
    write_demo(tmp_path / "c", DemoConfig(seed=4, pairs=40))
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert {k for k in a if "/images/" not in k} == {k for k in c if "/images/" not in k}
    assert a["pairs/wukong.csv"] != c["pairs/wukong.csv"]
    assert a["kg/triples.tsv"] == c["kg/triples.tsv"]  # the KG is fixed, the pairs are not


def test_layout_and_expected_counts(tmp_path):
    res = write_demo(tmp_path, DemoConfig(pairs=50))
    exp = json.loads((tmp_path / "expected.json").read_text())
    assert res["drops"][0]["expected"] == exp
    assert exp["rows_in"] == exp["accepted"] + exp["duplicates"] + exp["quarantined"]
    assert exp["accepted"] == 50 + 5 + 1  # clean + five converted modes + the first copy of the duplicated row
    assert exp["duplicates"] == 2
    assert sum(exp["quarantined_by_reason"].values()) == exp["quarantined"]
    for reason in ("empty_text", "invalid_utf8", "nul_byte", "too_long", "bad_row", "missing_image", "empty_image",
                   "undecodable", "too_many_pixels", "too_small", "bad_aspect", "missing_caption"):
        assert exp["quarantined_by_reason"][reason] >= 1, reason
    assert (tmp_path / "kg/triples.tsv").read_text().splitlines()[0] == "head\trelation\ttail"
    assert (tmp_path / "pairs/wukong.csv").read_bytes().startswith(b"url,caption\n")
    with tarfile.open(tmp_path / "pairs/img2dataset/00000.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("000000000.json"))
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert {"url", "caption", "key", "status", "width", "height"} <= meta.keys() and meta["status"] == "success"
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == exp["accepted"]


def test_days_write_one_drop_per_date(tmp_path):
    res = write_demo(tmp_path, DemoConfig(pairs=10, days=2, start="2025-03-01"))
    assert [d["date"] for d in res["drops"]] == ["2025-03-01", "2025-03-02"]
    a = (tmp_path / "2025-03-01/pairs/wukong.csv").read_bytes()
    assert a != (tmp_path / "2025-03-02/pairs/wukong.csv").read_bytes()
    assert (tmp_path / "2025-03-02/kg/triples.nt").exists()
    one = write_demo(tmp_path / "one", DemoConfig(pairs=3, days=1))
    assert one["drops"][0]["date"] == "2025-01-01" and (tmp_path / "one/2025-01-01/expected.json").exists()


def test_kg_and_images_agree(tmp_path):
    write_demo(tmp_path, DemoConfig(pairs=30))
    tsv = (tmp_path / "kg/triples.tsv").read_text().splitlines()[1:]
    triples = {tuple(line.split("\t")) for line in tsv}
    assert ("草莓", "别名", "士多啤梨") in triples and ("番茄", "别名", "西红柿") in triples
    assert ("苹果", "别名", "蘋果") in triples and ("红富士苹果", "属于", "苹果") in triples
    nt = (tmp_path / "kg/triples.nt").read_text()
    assert len(nt.splitlines()) == len(tsv) and '<http://kg.rapid/e/草莓> <http://kg.rapid/r/颜色> "红色" .' in nt
    assert 30 <= len(ENTITIES) <= 60 and DEMO_DOMAIN == "demo"
    # A single-object caption: the dominant non-background colour of its image is the KG colour.
    by_surface = {s: e for e in ENTITIES for s in [e["name"], *e["aliases"]]}
    labels = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    checked = 0
    for lab in labels:
        if len(lab["mentions"]) != 1 or not lab["url"].startswith("images/0"):
            continue
        ent = by_surface[lab["mentions"][0]["surface"]]
        img = Image.open(tmp_path / "pairs" / lab["url"]).convert("RGB")
        colours = sorted(img.getcolors(1 << 16), reverse=True)
        target = COLOURS[ent["colour"]]
        assert any(max(abs(a - b) for a, b in zip(c, target)) < 30 for _, c in colours[:50]), (lab, colours[:5])
        checked += 1
    assert checked >= 10


def test_labels_point_at_the_normalised_caption(tmp_path):
    write_demo(tmp_path, DemoConfig(pairs=60))
    names = {e["name"] for e in ENTITIES}
    for line in (tmp_path / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        assert normalize(lab["caption_raw"]).text == lab["caption"]
        for m in lab["mentions"]:
            assert lab["caption"][m["start"]:m["end"]] == m["surface"] and m["entity"] in names
    text = (tmp_path / "pairs/wukong.csv").read_bytes().decode("utf-8", "replace")
    assert "１２３" in text or "ＡＢＣ" in text


def test_cli_demo_data(tmp_path):
    res = cli.invoke(["demo-data", "--out", str(tmp_path / "d"), "--pairs", "5", "--seed", "1"], home=tmp_path / "h")
    assert res["drops"][0]["expected"]["accepted"] == 11
    assert (tmp_path / "d/pairs/wukong.csv").exists()
