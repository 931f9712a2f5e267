"""The HTML evaluation report of a domain: ``reports/<domain>/index.html`` (one self-contained file).

    python -c "from rapid_pipeline.report import build_report; from rapid_pipeline.core.home import Home; print(build_report(Home.from_env(), 'demo'))"

(``rapid evaluate`` regenerates it after every evaluation.) It reads only the published main
``reports/<domain>/<run>/metrics.json`` (+ ``gate.json``, ``fast_sampler.json``, ``samples/*.png``) of
every build — one row per build; the reports of other protocols under ``<run>/protocols/`` are not rows —
and shows: a metric table per build (the Fréchet metric under its true name: ``fid`` or ``frechet_ckclip``;
the gate and the fast-sampler decision with their reasons),
trend plots across builds as inline SVG drawn here (no plotting dependency), and an image grid
of prompts × builds with PNG thumbnails (≤ 256 px) embedded as data URIs; the full-size PNGs stay in ``<run>/samples/``. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .core.atomic import atomic_write_bytes
from .core.home import Home, check_name

MAX_GRID_BUILDS = 6
THUMB_SIDE = 256


def _optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def load_builds(home: Home, domain: str) -> list[dict]:
    """Main metrics.json (+ gate.json, fast_sampler.json) of every evaluated build of `domain`, oldest first.
    The glob is one level deep on purpose: protocols/<p>/metrics.json are not builds."""
    builds = []
    for path in sorted((home.reports / domain).glob("*/metrics.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["_gate"] = _optional_json(path.parent / "gate.json")
        doc["_fast"] = _optional_json(path.parent / "fast_sampler.json")
        doc["_dir"] = path.parent
        builds.append(doc)
    return sorted(builds, key=lambda d: (d.get("created_at", ""), d["model_run"]))


def metric_columns(builds: list[dict]) -> list[str]:
    names: list[str] = []
    for b in builds:
        for k, v in b["metrics"].items():
            keys = [f"retrieval_{r}" for r in v] if isinstance(v, dict) else [k]
            names += [n for n in keys if n not in names]
    return names


def metric_value(build: dict, name: str) -> float | None:
    if name.startswith("retrieval_"):
        return build["metrics"].get("retrieval", {}).get(name.removeprefix("retrieval_"))
    value = build["metrics"].get(name)
    return value if isinstance(value, (int, float)) else None


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fast_sampler_cell(fast: dict | None) -> str:
    """'accepted: dpmsolver++ 20 steps' + the reason (which names the metric), or '-' without a decision."""
    if not fast:
        return "-"
    cand = fast.get("candidate") or {}
    head = f"{fast.get('decision', '?')}: {cand.get('scheduler', '?')} {cand.get('steps', '?')} steps"
    return f"{_e(head)}<br><small>{_e(fast.get('reason', ''))}</small>"


def metrics_table(builds: list[dict], production: str | None) -> str:
    cols = metric_columns(builds)
    head = "".join(f"<th>{_e(c)}</th>" for c in ["build", "created", "samples", "feature space", *cols, "fast sampler", "gate"])
    rows = []
    for b in builds:
        gate = b["_gate"] or {}
        label = _e(b["model_run"]) + (" <b>(production)</b>" if b["model_run"] == production else "")
        vals = "".join(f"<td>{'' if metric_value(b, c) is None else f'{metric_value(b, c):.4f}'}</td>" for c in cols)
        gate_cell = f"{_e(gate.get('decision', '-'))}<br><small>{_e(gate.get('reason', ''))}</small>"
        rows.append(f"<tr><td>{label}</td><td>{_e(b.get('created_at', ''))}</td><td>{_e(b['samples'])}</td>"
                    f"<td>{_e(b['metric_kind']['extractor'])}</td>{vals}<td>{fast_sampler_cell(b.get('_fast'))}</td>"
                    f"<td>{gate_cell}</td></tr>")
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def svg_trend(name: str, points: list[tuple[str, float]], width: int = 360, height: int = 160) -> str:
    """A line plot of one metric across builds (x = build order), as an inline SVG element."""
    if not points:
        return ""
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pad = 28
    xs = [pad + i * (width - 2 * pad) / max(len(points) - 1, 1) for i in range(len(points))]
    ys = [height - pad - (v - lo) / span * (height - 2 * pad) for v in values]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"><title>{_e(b)}: {v:.4f}</title></circle>'
                   for (b, v), x, y in zip(points, xs, ys))
    return (f'<svg class="trend" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(name)} across builds"><text x="{pad}" y="16">{_e(name)}</text>'
            f'<text x="2" y="{height - pad}" font-size="10">{lo:.3g}</text><text x="2" y="{pad}" font-size="10">{hi:.3g}</text>'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{line}"/>{dots}</svg>')


def trends(builds: list[dict]) -> str:
    plots = []
    for name in metric_columns(builds):
        points = [(b["model_run"], metric_value(b, name)) for b in builds if metric_value(b, name) is not None]
        plots.append(svg_trend(name, points))
    return "".join(plots)


def _data_uri(path: Path, max_side: int = THUMB_SIDE) -> str:
    """PNG thumbnail as a data URI: full-size 1024 px samples would make the page tens of MB."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_grid(builds: list[dict]) -> str:
    """Rows = prompts (union, first-seen order), columns = the newest builds; empty cell when absent."""
    shown = builds[-MAX_GRID_BUILDS:]
    prompts: list[str] = []
    for b in shown:
        prompts += [g["prompt"] for g in b.get("grid", []) if g["prompt"] not in prompts]
    head = "<th>prompt</th>" + "".join(f"<th>{_e(b['model_run'])}</th>" for b in shown)
    rows = []
    for prompt in prompts:
        cells = []
        for b in shown:
            entry = next((g for g in b.get("grid", []) if g["prompt"] == prompt), None)
            png = b["_dir"] / entry["png"] if entry else None
            cells.append(f'<td><img src="{_data_uri(png)}" alt="{_e(prompt)}" title="seed {_e(entry["seed"])}"></td>'
                         if png is not None and png.exists() else "<td></td>")
        rows.append(f"<tr><th>{_e(prompt)}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.grid img{width:160px;height:auto;image-rendering:pixelated}"
         ".trend{margin:0 1em 1em 0;border:1px solid #eee}")


def render(domain: str, builds: list[dict], production: str | None) -> str:
    note = ("<p>fid = Fréchet Inception Distance (InceptionV3 pool features); frechet_ckclip = Fréchet distance of "
            "CKCLIP image embeddings — a different feature space, not comparable with published FIDs.</p>")
    body = (f"<h1>Evaluation report: {_e(domain)}</h1><p>production build: <b>{_e(production or 'none')}</b>; "
            f"{len(builds)} evaluated build(s)</p>{note}<h2>Metrics</h2>{metrics_table(builds, production)}"
            f"<h2>Trends</h2><div class=\"trends\">{trends(builds)}</div><h2>Samples (prompts × builds)</h2>{image_grid(builds)}")
    return (f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>rapid evaluation: {_e(domain)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def build_report(home: Home, domain: str) -> Path:
    """Write reports/<domain>/index.html atomically and return its path."""
    check_name(domain, "domain")
    pointer = home.models / "pipeline" / domain / "production"
    production = pointer.read_text().strip() if pointer.exists() else None
    out = home.reports / domain / "index.html"
    atomic_write_bytes(out, render(domain, load_builds(home, domain), production).encode("utf-8"))
    return out
