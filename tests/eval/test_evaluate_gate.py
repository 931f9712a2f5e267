"""`rapid evaluate` end to end on a tiny test split with stand-in pipelines / CKCLIP (frechet_ckclip
path), the promotion gate, warehouse rows, the reference-statistics cache, reproducibility."""

from __future__ import annotations

import json

import pytest

from rapid_pipeline import evaluate as ev
from rapid_pipeline.core.warehouse import query

from _evalkit import StandInPipeline, make_model_dir, tiny_clip_features


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), domain="demo", samples=10, steps=2, workers=0, batch_size=4, grid=3)
    return ev.EvalConfig(**{**base, **kw})


def _evaluate(home, run, noise, clip=None, **kw):
    model_dir = make_model_dir(home, "demo", run)
    clip = clip or tiny_clip_features()
    report = ev.run(_cfg(model_dir, **kw), home, pipeline=StandInPipeline(noise), clip=clip)
    return report, ev.load_metrics_doc(home, "demo", run)


def test_metrics_land_in_json_and_warehouse(home, shards):
    report, doc = _evaluate(home, "run-a", noise=0.0)
    assert report.status == "ok" and doc["samples"] == 10
    assert doc["metric_kind"]["name"] == "frechet_ckclip" and "fid" not in doc["metrics"]
    assert doc["metrics"]["frechet_ckclip"] >= 0 and -100 <= doc["metrics"]["clip_score"] <= 100
    rows = query(home, "SELECT name, value, subject_fingerprint, data_fingerprint FROM metrics WHERE stage='evaluate' ORDER BY name")
    names = rows.column("name").to_pylist()
    assert {"frechet_ckclip", "clip_score", "retrieval_t2i_R@1", "retrieval_i2t_R@10", "retrieval_mean_R"} <= set(names)
    assert set(rows.column("subject_fingerprint").to_pylist()) == {doc["model_fingerprint"]}
    assert set(rows.column("data_fingerprint").to_pylist()) == {doc["data_fingerprint"]}
    assert len(doc["grid"]) == 3 and (home.reports / "demo" / "run-a" / "samples" / "000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_better_images_score_better_and_reference_stats_are_cached(home, shards):
    _, good = _evaluate(home, "good", noise=0.05)
    _, bad = _evaluate(home, "bad", noise=1.0)
    assert good["metrics"]["frechet_ckclip"] < bad["metrics"]["frechet_ckclip"]
    assert good["reference_cache_hit"] is False and bad["reference_cache_hit"] is True
    assert len(list((home.reports / "fid_stats").glob("*.npz"))) == 1


def test_reproducible_seeds_per_prompt(home, shards):
    pipe = StandInPipeline(0.5)
    cfg = _cfg(make_model_dir(home, "demo", "r1"), seed=7)
    ev.run(cfg, home, pipeline=pipe, clip=tiny_clip_features())
    assert [s for _, s in pipe.calls] == list(range(7, 17))  # prompt i -> seed + i
    first = ev.load_metrics_doc(home, "demo", "r1")["metrics"]
    ev.run(cfg, home, pipeline=StandInPipeline(0.5), clip=tiny_clip_features(), force=True)
    assert ev.load_metrics_doc(home, "demo", "r1")["metrics"] == first


def test_second_identical_evaluation_is_a_cache_hit(home, shards):
    _evaluate(home, "c1", noise=0.1)
    report, _ = _evaluate(home, "c1", noise=0.1)
    assert report.status == "cached"


def test_gate_promotes_first_blocks_worse_promotes_as_good(home, shards):
    _, good = _evaluate(home, "good", noise=0.05)
    first = ev.gate(home, good)
    assert first["decision"] == "promoted" and "no production" in first["reason"]
    pointer = ev.production_pointer(home, "demo")
    assert pointer.read_text().strip() == "good"

    _, bad = _evaluate(home, "bad", noise=1.0)
    blocked = ev.gate(home, bad, margin=0.0)
    assert blocked["decision"] == "blocked" and "frechet_ckclip" in blocked["reason"]
    assert pointer.read_text().strip() == "good"
    assert json.loads((home.reports / "demo" / "bad" / "gate.json").read_text())["decision"] == "blocked"

    _, same = _evaluate(home, "same", noise=0.05)  # same images as "good" -> equal metric
    assert same["metrics"]["frechet_ckclip"] == pytest.approx(good["metrics"]["frechet_ckclip"])
    assert ev.gate(home, same, margin=0.0)["decision"] == "promoted"
    assert pointer.read_text().strip() == "same"


def test_gate_with_injected_values_respects_margins(home):
    def doc(run, frechet, clip):
        return {"domain": "demo", "model_run": run, "data_fingerprint": "d" * 64,
                "metric_kind": {"name": "fid", "extractor": "x", "resize": "r"},
                "metrics": {"fid": frechet, "clip_score": clip}}

    import rapid_pipeline.core.atomic as atomic

    prod = doc("prod", 10.0, 30.0)
    atomic.atomic_write_json(home.reports / "demo" / "prod" / "metrics.json", prod)
    atomic.atomic_write_bytes(ev.production_pointer(home, "demo"), b"prod\n")
    assert ev.gate(home, doc("n1", 10.4, 30.0), margin=0.5)["decision"] == "promoted"  # within margin
    atomic.atomic_write_bytes(ev.production_pointer(home, "demo"), b"prod\n")
    assert ev.gate(home, doc("n2", 10.6, 30.0), margin=0.5)["decision"] == "blocked"  # FID worse beyond margin
    assert ev.gate(home, doc("n3", 9.0, 29.0), margin=0.5, clip_margin=0.5)["decision"] == "blocked"  # CLIP score dropped
    assert ev.production_pointer(home, "demo").read_text().strip() == "prod"


def test_gate_refuses_incomparable_builds(home, shards, monkeypatch):
    _, a = _evaluate(home, "a", noise=0.05)
    ev.gate(home, a)
    _, b = _evaluate(home, "b", noise=0.05, samples=8)  # different sample count -> different data fingerprint
    decision = ev.gate(home, b)
    assert decision["decision"] == "blocked" and "data fingerprints differ" in decision["reason"]
    _, c = _evaluate(home, "c", noise=0.05, clip=tiny_clip_features(seed=1))  # other feature extractor
    decision = ev.gate(home, c)
    assert decision["decision"] == "blocked" and "metric kinds differ" in decision["reason"]
    assert ev.production_pointer(home, "demo").read_text().strip() == "a"
    # the same data and extractor but another sampling protocol (1 step against production's 2): refused,
    # until production is evaluated with the candidate's protocol too
    _, d = _evaluate(home, "d", noise=0.05, steps=1)
    decision = ev.gate(home, d)
    assert decision["decision"] == "blocked" and "sampling protocols differ (steps: 1 vs production 2)" in decision["reason"]
    monkeypatch.setattr(ev, "load_pipeline", lambda model_dir, device: StandInPipeline(0.05))
    monkeypatch.setattr(ev, "_load_clip", lambda home, cfg: tiny_clip_features())
    assert ev.ensure_production_evaluated(home, _cfg(make_model_dir(home, "demo", "d"), steps=1), d) == "ok"
    decision = ev.gate(home, d, margin=0.0)
    assert decision["decision"] == "promoted" and "refusing" not in decision["reason"], decision


def test_cli_gate_result_and_clear_errors(home, shards, monkeypatch):
    from rapid_pipeline import cli

    monkeypatch.setattr(ev, "load_pipeline", lambda model_dir, device: StandInPipeline(0.05))
    monkeypatch.setattr(ev, "_load_clip", lambda home, cfg: tiny_clip_features())
    model_dir = make_model_dir(home, "demo", "cli-run")
    out = cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo", "--samples", "6", "--steps", "1",
                      "--workers", "0", "--gate"], home=home.root)
    assert out["gate"]["decision"] == "promoted" and out["metric_kind"]["name"] == "frechet_ckclip"
    assert (home.reports / "demo" / "index.html").exists()
    # a new sample count: production's metrics no longer compare, so --gate re-evaluates production first
    second = make_model_dir(home, "demo", "cli-run-2")
    out = cli.invoke(["evaluate", "--model", str(second), "--domain", "demo", "--samples", "5", "--steps", "1",
                      "--workers", "0", "--gate", "--margin", "1.0"], home=home.root)
    assert out["production_evaluation"] == "ok" and out["gate"]["decision"] == "promoted", out["gate"]
    assert ev.load_metrics_doc(home, "demo", "cli-run")["samples"] == 5
    monkeypatch.setattr(ev, "_load_clip", lambda home, cfg: None)
    with pytest.raises(ValueError, match="inception-weights"):
        cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo"], home=home.root)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        cli.invoke(["evaluate", "--model", str(home.root), "--domain", "demo"], home=home.root)


def _save_tiny_ckclip(folder, captions):
    """A real (random-weight) tiny CKCLIP folder: engineer E's model + KnowledgeTokenizer, saved."""
    import numpy as np

    from rapid_pipeline.models.char_tokenizer import build_vocab, load_tokenizer
    from rapid_pipeline.models.ckclip import KnowledgeTokenizer, build_ckclip

    build_vocab(captions, folder)
    tok = load_tokenizer(folder)
    ktok = KnowledgeTokenizer(tok, ["e1"], np.ones((1, 8), np.float32), [["方块"]])
    build_ckclip("tiny", vocab_size=len(tok), entity_dim=8).save_pretrained(folder)
    ktok.save_pretrained(folder)
    return folder


def test_cli_with_real_tiny_pipeline_and_ckclip(home, shards):
    """The real path: F's pipeline folder + E's CKCLIP folder, loaded from disk by `rapid evaluate`."""
    from _evalkit import caption

    from rapid_pipeline import cli
    from rapid_pipeline.pipeline import build_random_pipeline

    run_dir = home.models / "pipeline" / "demo" / "tiny-run"
    build_random_pipeline("tiny", seed=0).save_pretrained(run_dir)
    clip_dir = _save_tiny_ckclip(home.models / "ckclip" / "demo" / "clip-run", [caption(i) for i in range(12)])
    out = cli.invoke(["evaluate", "--model", str(run_dir), "--domain", "demo", "--samples", "4", "--steps", "2",
                      "--workers", "2", "--no-super-resolution", "--gate"], home=home.root)
    assert out["status"] == "ok" and out["metric_kind"]["extractor"].startswith("ckclip:")
    assert out["metrics"]["frechet_ckclip"] > 0 and "t2i_R@1" in out["metrics"]["retrieval"]
    assert out["gate"]["decision"] == "promoted" and ev.production_pointer(home, "demo").read_text().strip() == "tiny-run"
    doc = ev.load_metrics_doc(home, "demo", "tiny-run")
    from PIL import Image

    assert Image.open(home.reports / "demo" / "tiny-run" / doc["grid"][0]["png"]).size == (32, 32)
    from rapid_pipeline.core.fingerprint import fingerprint_path

    assert out["metric_kind"]["extractor"] == "ckclip:" + fingerprint_path(clip_dir)[:16]  # the newest CKCLIP was used


def test_generated_image_does_not_depend_on_generation_batch():
    """Per-prompt generators: prompt i gives the same image alone or inside a batch (real tiny pipeline)."""
    import torch

    from rapid_pipeline.pipeline import build_random_pipeline

    import numpy as np

    pipe = build_random_pipeline("tiny", seed=0)
    prompts = ["一个红色的方块", "一个蓝色的方块", "一个绿色的方块"]
    one, full_one = ev.generate_images(pipe, prompts, ev.EvalConfig(steps=2, gen_batch=1, super_resolution=False, grid=3))
    three, full_three = ev.generate_images(pipe, prompts, ev.EvalConfig(steps=2, gen_batch=3, super_resolution=False, grid=3))
    assert one.shape == (3, 3, 299, 299) and len(full_one) == len(full_three) == 3
    # The generated images themselves (not their bicubic 299 px copies, whose overshoot can turn a 1-level
    # difference into 2 on some CPUs): uint8 rounding of float noise at most.
    diff = max(np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() for a, b in zip(full_one, full_three))
    assert diff <= 1
    assert not torch.equal(one[0], one[1])
