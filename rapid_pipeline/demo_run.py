"""``rapid run-demo``: the main job, end to end, on the built-in demo domain.

    rapid run-demo --preset tiny            # CPU, minutes
    rapid --home /data/rapid run-demo --preset small --pairs 5000

Runs every stage the DAGs run, in the same order, through the same commands:
demo-data → ingest kg → ingest pairs → link → coverage → kg transe → shard → train clip →
train diffusion → train sr → pipeline assemble → evaluate (gate) → generate one image.
Each step is a cached stage, so a rerun only redoes what changed. The summary lists every
step's status and the final model, report and image paths.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from .core.home import Home

PROMPT = "一张草莓的照片"


def _steps(args: argparse.Namespace, home: Home) -> list[tuple[str, Callable[[dict], list[str]]]]:
    d, p, landing = args.domain, args.preset, home.landing / args.domain / args.date
    return [
        ("demo-data", lambda s: ["demo-data", "--out", str(landing), "--seed", str(args.seed), "--pairs", str(args.pairs)]),
        ("ingest kg", lambda s: ["ingest", "kg", str(landing / "kg" / "triples.tsv"), "--domain", d, "--partition", args.date]),
        ("ingest pairs", lambda s: ["ingest", "pairs", str(landing / "pairs"), "--domain", d, "--partition", args.date]),
        ("link", lambda s: ["link", "--domain", d]),
        ("coverage", lambda s: ["coverage", "--domain", d]),
        ("kg transe", lambda s: ["kg", "transe", "--domain", d, "--preset", p]),
        ("shard", lambda s: ["shard", "--domain", d, "--preset", p]),
        ("train clip", lambda s: ["train", "clip", "--domain", d, "--preset", p]),
        ("train diffusion", lambda s: ["train", "diffusion", "--domain", d, "--preset", p]),
        ("train sr", lambda s: ["train", "sr", "--domain", d, "--preset", p]),
        ("pipeline assemble", lambda s: ["pipeline", "assemble", "--domain", d]),
        ("evaluate", lambda s: ["evaluate", "--model", _model(s), "--domain", d, "--gate"]),
        ("generate", lambda s: ["generate", PROMPT, "--model", _model(s), "-o", str(home.reports / d / "demo.png"), "--seed", "0"]),
    ]


def _model(state: dict) -> str:
    out = state["pipeline assemble"]
    return out["outputs"][0]["uri"].removeprefix("file://") if out.get("outputs") else out["model"]


def run(args: argparse.Namespace, home: Home) -> dict[str, Any]:
    from .cli import invoke

    state: dict[str, Any] = {}
    lines = []
    for name, argv in _steps(args, home):
        t0 = time.perf_counter()
        state[name] = invoke(argv(state), home=home.root) or {}
        status = state[name].get("status", "ok") if isinstance(state[name], dict) else "ok"
        lines.append(f"{name:<18} {status:<8} {time.perf_counter() - t0:7.1f}s")
    return {"text": "\n".join(lines) + f"\nimage: {home.reports / args.domain / 'demo.png'}", "steps": state,
            "model": _model(state), "image": str(home.reports / args.domain / "demo.png"), "status": "ok"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper"), help="model size preset for every training stage")
    p.add_argument("--domain", default="demo", help="domain name to use for the demo data")
    p.add_argument("--date", default="2025-01-01", help="landing partition date for the demo drop")
    p.add_argument("--pairs", type=int, default=2000, help="number of demo image-text pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data")


def main(args: argparse.Namespace, home: Home) -> dict[str, Any]:
    return run(args, home)
