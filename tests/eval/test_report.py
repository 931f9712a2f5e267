"""The HTML report renders from published metrics: parse it, check the metric table, the trend SVGs and
the prompts × builds image grid (embedded PNGs), the production mark and escaping."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from _evalkit import StandInPipeline, make_model_dir, tiny_clip_features

from rapid_pipeline import evaluate as ev
from rapid_pipeline.report import build_report, svg_trend


class Tree(HTMLParser):
    """Collects tables (rows of cell texts), images and svg elements."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.svgs, self.polylines, self._cell = [], [], 0, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"class": a.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "svg":
            self.svgs += 1
        elif tag == "polyline":
            self.polylines.append(a["points"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_report_renders_grid_tables_and_trends(home, shards, monkeypatch):
    clip = tiny_clip_features()
    for run, noise in (("build-1", 0.6), ("build-2", 0.3), ("build-3", 0.05)):
        ev.run(ev.EvalConfig(model=str(make_model_dir(home, "demo", run)), samples=6, steps=1, workers=0, grid=2),
               home, pipeline=StandInPipeline(noise), clip=clip)
        ev.gate(home, ev.load_metrics_doc(home, "demo", run), margin=0.0, clip_margin=100.0)  # stand-in CLIP: score is noise
    path = build_report(home, "demo")
    text = path.read_text(encoding="utf-8")
    assert path == home.reports / "demo" / "index.html" and text.startswith("<!DOCTYPE html>")
    tree = Tree()
    tree.feed(text)

    metrics = next(t for t in tree.tables if t["class"] == "metrics")
    header, *rows = metrics["rows"]
    assert "frechet_ckclip" in header and "clip_score" in header and "retrieval_i2t_R@1" in header and "fid" not in header
    assert [r[0] for r in rows] == ["build-1", "build-2", "build-3 (production)"]
    col = header.index("frechet_ckclip")
    values = [float(r[col]) for r in rows]
    assert values[0] > values[1] > values[2]  # less noise, lower distance
    assert all("promoted" in r[-1] for r in rows)

    grid = next(t for t in tree.tables if t["class"] == "grid")
    assert grid["rows"][0] == ["prompt", "build-1", "build-2", "build-3"]
    assert len(grid["rows"]) == 1 + 2  # two prompts x three builds
    assert len(tree.imgs) == 6
    png = base64.b64decode(tree.imgs[0]["src"].split(",", 1)[1])
    assert tree.imgs[0]["src"].startswith("data:image/png;base64,") and png[:4] == b"\x89PNG"
    assert tree.svgs == len(header) - 6 and len(tree.polylines[0].split()) == 3  # one plot per metric, 3 builds
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_svg_trend_escapes_and_scales():
    svg = svg_trend("<fid>", [("a<b", 1.0), ("c", 3.0)])
    assert "<fid>" not in svg and "&lt;fid&gt;" in svg and "a&lt;b" in svg
    assert svg_trend("x", []) == ""


def test_empty_domain_report(home):
    text = build_report(home, "demo").read_text(encoding="utf-8")
    assert "0 evaluated build(s)" in text and "production build: <b>none</b>" in text
