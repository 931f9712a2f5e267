"""`rapid run-demo` (tiny preset, --quick, a small demo domain): every step of the main job succeeds,
the served and the generated PNG decode, the CKCLIP R@1 figures with and without the KG are numbers,
the run folders flow from step to step, a rerun answers the training stages from the step cache, and
a failing step stops the chain with its summary written.

    .venv/bin/python -m pytest tests/test_demo_run.py -q      # ~1-2 min on one busy core
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from rapid_pipeline import demo_run
from rapid_pipeline.cli import invoke

PAIRS = "80"
STEPS = ["demo-data", "ingest kg", "ingest pairs", "link", "coverage", "kg transe", "shard", "train clip", "train vae",
         "train diffusion", "train sr", "pipeline assemble", "evaluate", "compile", "serve", "latency", "generate"]


def _png(path: str) -> Image.Image:
    img = Image.open(io.BytesIO(Path(path).read_bytes()))
    assert img.format == "PNG"
    img.load()  # decodes every pixel: a truncated file raises here
    return img


def _demo(home, *extra: str) -> dict:
    return invoke(["run-demo", "--preset", "tiny", "--pairs", PAIRS, "--quick", *extra], home=home.root)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    from rapid_pipeline.core.home import Home

    home = Home.from_env(tmp_path_factory.mktemp("demo") / "rapid_home")
    return home, _demo(home)


def test_every_step_succeeds_in_order(first):
    _, out = first
    assert out["status"] == "ok"
    assert [r["name"] for r in out["steps"]] == STEPS
    bad = [r for r in out["steps"] if r["status"] != "ok"]  # a fresh home: nothing cached, nothing skipped
    assert not bad, bad
    assert all(r["seconds"] >= 0 for r in out["steps"])


def test_served_and_generated_pngs_decode(first):
    home, out = first
    served, image = _png(out["served_png"]), _png(out["image"])
    assert Path(out["served_png"]) == home.reports / "demo" / "served.png"
    assert served.size == image.size == (128, 128)  # tiny: 32 px diffusion, ESRGAN x4
    assert out["serve"]["steps"] == demo_run.SAMPLER_STEPS[True] and out["serve"]["status"] == "ok"
    assert out["serve"]["artifact"] == out["compile"]["artifact_dir"]  # the API served the compiled artifact


def test_ckclip_r_at_1_with_and_without_the_kg(first):
    home, out = first
    table = out["r_at_1"]
    assert set(table) == {"knowledge", "no_knowledge"}
    for m in table.values():
        for key in ("t2i_R@1", "i2t_R@1"):
            assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, (key, m)
        assert m["pairs"] > 0
    current = (home.models / "ckclip" / "demo" / "CURRENT").read_text().strip()
    assert Path(out["parts"]["ckclip"]).name == current  # the ablation leaves CURRENT on the knowledge model
    assert "with KG" in out["text"] and "without KG" in out["text"]


def test_run_folders_flow_through_the_chain(first):
    home, out = first
    assert out["vae"]["psnr_after"] > out["vae"]["psnr_before"] and out["vae"]["scaling_factor"] > 0
    parts = out["parts"]
    training = json.loads((Path(parts["diffusion"]) / "training.json").read_text())
    assert training["clip"] == parts["ckclip"] and training["vae"] == parts["vae"]  # trained VAE, not random
    assert Path(parts["vae"]).parent == home.models / "vae" / "demo"
    assert (Path(out["model"]) / "super_resolution").is_dir() and Path(out["model"]).name.startswith("asm-")


def test_evaluation_compile_and_latency_in_the_summary(first):
    home, out = first
    ev = out["evaluation"]
    assert ev["gate"] == "promoted" and ev["metric"] in ev["metrics"]  # the first build has no production to lose to
    assert (home.models / "pipeline" / "demo" / "production").read_text().strip() == Path(out["model"]).name
    assert out["compile"]["parity"]["ok"] is True and Path(out["compile"]["artifact_dir"], "parity.json").exists()
    table = out["latency_table"].splitlines()
    assert table[0].split()[0] == "variant" and [line.split()[0] for line in table[2:4]] == ["eager", "sdpa-math"]
    saved = json.loads((home.reports / "demo" / "run-demo.json").read_text())
    assert saved["steps"] == out["steps"] and saved["r_at_1"] == out["r_at_1"]
    assert (home.reports / "demo" / "run-demo.txt").read_text().strip() == out["text"].strip()


def test_rerun_answers_training_from_the_cache(first):
    home, _ = first
    again = _demo(home, "--skip-latency")
    status = {r["name"]: r["status"] for r in again["steps"]}
    for step in ("kg transe", "shard", "train clip", "train vae", "train diffusion", "train sr", "pipeline assemble",
                 "evaluate", "compile"):
        assert status[step] == "cached", (step, status)
    assert status["latency"] == "skipped" and status["serve"] == status["generate"] == "ok"
    assert again["evaluation"]["gate"] == "unchanged"
    _png(again["served_png"])


def test_a_failing_step_stops_the_chain_and_writes_the_summary(home, monkeypatch):
    calls = []

    def ok(ctx):
        calls.append("ok")
        return {"status": "ok"}

    def boom(ctx):
        raise ValueError("disk full")

    monkeypatch.setattr(demo_run, "steps", lambda: [("first", ok), ("second", boom), ("third", ok)])
    with pytest.raises(RuntimeError, match="step 'second' failed: ValueError: disk full") as err:
        demo_run.run_config(demo_run.DemoConfig(), home)
    assert isinstance(err.value.__cause__, ValueError) and calls == ["ok"]  # third never ran
    saved = json.loads((home.reports / "demo" / "run-demo.json").read_text())
    assert saved["status"] == "failed" and [(r["name"], r["status"]) for r in saved["steps"]] == [("first", "ok"), ("second", "failed")]
    assert "disk full" in (home.reports / "demo" / "run-demo.txt").read_text()
