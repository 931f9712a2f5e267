"""`rapid evaluate --accept-fast-sampler` (a fewer-step sampler vs the reference protocol on the same split,
N, seeds and extractor), the per-protocol report folders that keep the reference `metrics.json` intact, the
decision in the HTML report, and `rapid serve --fast-sampler` using only an accepted decision.

The stand-in pipeline's quality depends on the (scheduler, steps) it is asked for (`SamplerStandIn`), so a
candidate can be made as good as the reference or pure noise. References use few steps (the stand-in does
not iterate) except where the default protocol (pndm, 50) itself is under test."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from rapid_pipeline import evaluate as ev
from rapid_pipeline import serve
from rapid_pipeline.report import build_report, load_builds

from _evalkit import SamplerStandIn, make_model_dir, tiny_clip_features

FAST = ev.FastSampler("dpmsolver++", 1)  # candidate of a pndm-2 reference
PROMPT = "一个红色的方块0"


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), domain="demo", samples=10, steps=2, workers=0, batch_size=4, grid=3)
    return ev.EvalConfig(**{**base, **kw})


def _accept(home, run, cand_noise, ref_noise=0.05, fast=FAST, **kw):
    pipe = SamplerStandIn({(fast.scheduler, fast.steps): cand_noise}, noise=ref_noise)
    cfg = _cfg(make_model_dir(home, "demo", run), **kw)
    decision, report = ev.accept_fast_sampler(cfg, fast, home, pipeline=pipe, clip=tiny_clip_features())
    return decision, report, pipe


def _main_metrics(home, run):
    return home.reports / "demo" / run / "metrics.json"


# ---------------------------------------------------------------- the decision on real evaluations
def test_candidate_as_good_as_reference_is_accepted(home, shards):
    decision, report, pipe = _accept(home, "good", cand_noise=0.05)
    assert decision["decision"] == "accepted", decision["reason"]
    assert set(pipe.protocols) == {("pndm", 2), ("dpmsolver++", 1)}  # the candidate really was generated
    assert pipe.protocols.count(("dpmsolver++", 1)) == 10 == decision["samples"]
    ref, cand = decision["reference"], decision["candidate"]
    assert (ref["scheduler"], ref["steps"], cand["scheduler"], cand["steps"]) == ("pndm", 2, "dpmsolver++", 1)
    assert ref["metric"] == cand["metric"] == "frechet_ckclip" and decision["margin"] == ev.DEFAULT_MARGINS["frechet_ckclip"]
    assert cand["value"] == pytest.approx(ref["value"])  # same images for the same seeds
    assert decision["reason"].startswith("frechet_ckclip") and "FID" not in decision["reason"]
    on_disk = json.loads(ev.fast_sampler_path(home, "demo", "good").read_text())
    assert on_disk == decision and on_disk["data_fingerprint"] == ev.load_metrics_doc(home, "demo", "good")["data_fingerprint"]
    cand_doc = json.loads((home.reports / "demo" / "good" / "protocols" / "dpmsolverpp-1" / "metrics.json").read_text())
    assert cand_doc["protocol"]["scheduler"] == "dpmsolver++" and cand_doc["protocol"]["seed"] == 0


def test_noise_candidate_is_rejected_with_metric_and_both_values(home, shards):
    decision, _, _ = _accept(home, "noisy", cand_noise=1.0)
    ref, cand = decision["reference"]["value"], decision["candidate"]["value"]
    assert decision["decision"] == "rejected" and cand > ref + decision["margin"]
    reason = decision["reason"]
    assert "frechet_ckclip" in reason and f"{cand:.4f}" in reason and f"{ref:.4f}" in reason and ">" in reason
    assert "FID" not in reason and "dpmsolver++ 1 steps" in reason
    assert json.loads(ev.fast_sampler_path(home, "demo", "noisy").read_text())["decision"] == "rejected"


def test_candidate_leaves_reference_metrics_bytes_and_cache_alone(home, shards):
    model_dir = make_model_dir(home, "demo", "b1")
    first = ev.run(_cfg(model_dir), home, pipeline=SamplerStandIn({}), clip=tiny_clip_features())
    before = _main_metrics(home, "b1").read_bytes()
    sample = (home.reports / "demo" / "b1" / "samples" / "000.png").read_bytes()
    decision, ref_report, _ = _accept(home, "b1", cand_noise=1.0)
    assert first.status == "ok" and ref_report.status == "cached"  # the reference is reused, not re-generated
    assert _main_metrics(home, "b1").read_bytes() == before
    assert (home.reports / "demo" / "b1" / "samples" / "000.png").read_bytes() == sample
    assert decision["candidate_report_dir"].endswith("b1/protocols/dpmsolverpp-1")
    again, ref_again, pipe = _accept(home, "b1", cand_noise=1.0)  # one cache partition per protocol
    assert ref_again.status == "cached" and pipe.protocols == [] and again["decision"] == "rejected"
    assert [b["model_run"] for b in load_builds(home, "demo")] == ["b1"]  # protocols/ is not a build row


def test_plain_other_protocol_never_replaces_a_reference_report(home, shards):
    model_dir, clip = make_model_dir(home, "demo", "r"), tiny_clip_features()
    ev.run(_cfg(model_dir, steps=50), home, pipeline=SamplerStandIn({}), clip=clip)  # the defaults: pndm 50
    before = _main_metrics(home, "r").read_bytes()
    other = ev.run(_cfg(model_dir, scheduler="dpmsolver++", steps=20), home, pipeline=SamplerStandIn({}), clip=clip)
    assert other.extra["report_dir"] == str(home.reports / "demo" / "r" / "protocols" / "dpmsolverpp-20")
    assert _main_metrics(home, "r").read_bytes() == before
    assert ev.load_metrics_doc(home, "demo", "r")["protocol"]["steps"] == 50


def test_reference_reclaims_main_folder_and_keeps_protocols_and_decision(home, shards):
    _accept(home, "q", cand_noise=0.05)  # quick reference pndm-2 owns the main folder (nothing else there)
    assert ev.load_metrics_doc(home, "demo", "q")["protocol"]["steps"] == 2
    model_dir, clip = make_model_dir(home, "demo", "q"), tiny_clip_features()
    ev.run(_cfg(model_dir, steps=50), home, pipeline=SamplerStandIn({}), clip=clip)
    assert ev.load_metrics_doc(home, "demo", "q")["protocol"]["steps"] == 50
    assert ev.fast_sampler_path(home, "demo", "q").exists()
    assert (home.reports / "demo" / "q" / "protocols" / "dpmsolverpp-1" / "metrics.json").exists()
    quick = ev.run(_cfg(model_dir), home, pipeline=SamplerStandIn({}), clip=clip)  # pndm-2 again: now below
    assert quick.extra["report_dir"].endswith("q/protocols/pndm-2")
    assert ev.load_metrics_doc(home, "demo", "q")["protocol"]["steps"] == 50


# ---------------------------------------------------------------- the decision on injected docs
def _doc(value, name="fid", **over):
    doc = {"domain": "demo", "model_run": "m", "model_fingerprint": "f" * 64, "data_fingerprint": "d" * 64,
           "samples": 10, "metric_kind": {"name": name, "extractor": "x", "resize": "r"}, "metrics": {name: value},
           "protocol": {"scheduler": "pndm", "steps": 50, "guidance": 7.5, "seed": 0, "size": 0, "super_resolution": True}}
    for key, val in over.items():
        if key in doc["protocol"]:
            doc["protocol"][key] = val
        else:
            doc[key] = val
    return doc


def test_fid_margin_defaults_to_half_a_point():
    ref = _doc(10.0)
    ok = ev.decide_fast_sampler(ref, _doc(10.4, scheduler="dpmsolver++", steps=20))
    assert ok["decision"] == "accepted" and ok["margin"] == 0.5 and ok["reason"].startswith("fid of dpmsolver++ 20 steps 10.4000 <=")
    bad = ev.decide_fast_sampler(ref, _doc(10.6, scheduler="dpmsolver++", steps=20))
    assert bad["decision"] == "rejected" and "10.6000 > reference pndm 50 steps 10.0000 + margin 0.5" in bad["reason"]
    assert ev.decide_fast_sampler(ref, _doc(10.6, scheduler="dpmsolver++", steps=20), margin=1.0)["decision"] == "accepted"
    assert ev.decide_fast_sampler(ref, _doc(float("nan"), scheduler="dpmsolver++", steps=20))["decision"] == "rejected"


@pytest.mark.parametrize("over, why", [
    ({"data_fingerprint": "e" * 64}, "data fingerprints differ"),
    ({"metric_kind": {"name": "fid", "extractor": "other", "resize": "r"}}, "metric kinds differ"),
    ({"guidance": 5.0}, "protocols differ beyond the sampler (guidance"),
    ({"seed": 1}, "protocols differ beyond the sampler (seed"),
    ({"model_fingerprint": "g" * 64}, "different builds"),
])
def test_non_comparable_docs_are_rejected_with_the_reason(over, why):
    decision = ev.decide_fast_sampler(_doc(10.0), _doc(9.0, scheduler="dpmsolver++", steps=20, **over))
    assert decision["decision"] == "rejected" and why in decision["reason"], decision["reason"]
    assert "vs production" not in decision["reason"]


def test_candidate_that_is_not_a_fewer_step_mode_is_refused_before_any_work():
    cfg = ev.EvalConfig(steps=50)
    with pytest.raises(ValueError, match="fewer steps"):
        ev.check_fast_sampler(cfg, ev.FastSampler("dpmsolver++", 60))
    with pytest.raises(ValueError, match="reference protocol itself"):
        ev.check_fast_sampler(cfg, ev.FastSampler("pndm", 50))
    with pytest.raises(ValueError, match="not one of"):
        ev.check_fast_sampler(cfg, ev.FastSampler("euler", 20))
    assert ev.protocol_slug("dpmsolver++", 20) == "dpmsolverpp-20"
    with pytest.raises(ValueError, match="sampling protocol"):
        ev.protocol_slug("../x", 20)


# ---------------------------------------------------------------- CLI, HTML report
def _patch_loaders(monkeypatch, pipe):
    monkeypatch.setattr(ev, "load_pipeline", lambda model_dir, device: pipe)
    monkeypatch.setattr(ev, "_load_clip", lambda home, cfg: tiny_clip_features())


def test_cli_rejected_sampler_is_a_result_and_shows_in_the_html(home, shards, monkeypatch):
    from rapid_pipeline import cli

    _patch_loaders(monkeypatch, SamplerStandIn({("dpmsolver++", 1): 1.0}))
    model_dir = make_model_dir(home, "demo", "cli-fast")
    out = cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo", "--samples", "6", "--steps", "2",
                      "--workers", "0", "--gate", "--accept-fast-sampler", "--fast-steps", "1"], home=home.root)
    assert out["fast_sampler"]["decision"] == "rejected" and out["gate"]["decision"] == "promoted"
    assert out["report_dir"] == str(home.reports / "demo" / "cli-fast")  # the reference's report, as before
    html = (home.reports / "demo" / "index.html").read_text(encoding="utf-8")
    assert "rejected: dpmsolver++ 1 steps" in html and "fast sampler" in html
    with pytest.raises(ValueError, match="need --accept-fast-sampler"):
        cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo", "--fast-steps", "1"], home=home.root)


def test_cli_gate_refuses_a_report_that_went_below_protocols(home, shards, monkeypatch):
    from rapid_pipeline import cli

    _patch_loaders(monkeypatch, SamplerStandIn({}))
    model_dir = make_model_dir(home, "demo", "g")
    cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo", "--samples", "4", "--workers", "0"], home=home.root)
    with pytest.raises(ValueError, match="--gate compares the build's main report"):
        cli.invoke(["evaluate", "--model", str(model_dir), "--domain", "demo", "--samples", "4", "--steps", "3",
                    "--workers", "0", "--gate"], home=home.root)
    assert ev.load_metrics_doc(home, "demo", "g")["protocol"]["steps"] == 50


def test_every_new_flag_has_help():
    from rapid_pipeline import cli

    def help_of(command):
        parser = cli.build_parser([command])
        return next(a for a in parser._actions if a.dest == "command").choices[command].format_help()

    evaluate_help = help_of("evaluate")
    for flag in ("--accept-fast-sampler", "--fast-scheduler", "--fast-steps", "--fast-margin"):
        assert flag in evaluate_help
    assert "--fast-sampler" in help_of("serve") and "--fast-steps" not in help_of("serve")  # filled, not a flag


def test_html_escapes_the_fast_sampler_reason(home, shards):
    _accept(home, "esc", cand_noise=0.05)
    path = ev.fast_sampler_path(home, "demo", "esc")
    path.write_text(json.dumps({**json.loads(path.read_text()), "reason": "<script>alert(1)</script>"}))
    text = build_report(home, "demo").read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "accepted: dpmsolver++ 1 steps" in text


# ---------------------------------------------------------------- rapid serve --fast-sampler
def test_serve_refuses_without_an_accepted_decision(home, shards):
    model_dir = make_model_dir(home, "demo", "s0")
    settings = serve.ServeSettings(model=str(model_dir), fast_sampler=True)
    with pytest.raises(ValueError, match="no fast-sampler decision.*--accept-fast-sampler"):
        serve.fast_sampler_settings(settings, home)
    assert serve.fast_sampler_settings(serve.ServeSettings(model=str(model_dir)), home).fast_steps == 0  # flag off
    _accept(home, "s0", cand_noise=1.0)
    with pytest.raises(ValueError, match="'rejected', not accepted"):
        serve.fast_sampler_settings(settings, home)


def test_serve_uses_the_accepted_scheduler_and_steps_for_default_requests(home, shards):
    _accept(home, "s1", cand_noise=0.05)
    ev.production_pointer(home, "demo").write_text("s1\n")  # resolved through the production pointer too
    settings = serve.fast_sampler_settings(
        serve.ServeSettings(model=str(ev.production_pointer(home, "demo")), fast_sampler=True), home)
    assert (settings.fast_scheduler, settings.fast_steps) == ("dpmsolver++", 1)
    default = serve.parse_job({"prompt": PROMPT}, settings, has_sr=False)
    explicit = serve.parse_job({"prompt": PROMPT, "steps": 3}, settings, has_sr=False)
    assert (default.steps, default.scheduler) == (1, "dpmsolver++")
    assert (explicit.steps, explicit.scheduler) == (3, settings.scheduler) == (3, "pndm")

    class Recorder(SamplerStandIn):
        def __call__(self, prompt, **kw):
            self.kw = kw
            return super().__call__(prompt, **kw)

    worker = serve.Worker(lambda: None, settings)
    worker.pipeline = Recorder({})
    assert worker._run(default)[:4] == b"\x89PNG"
    assert (worker.pipeline.kw["scheduler"], worker.pipeline.kw["num_inference_steps"]) == ("dpmsolver++", 1)
    assert worker.health()["fast_sampler"] == {"scheduler": "dpmsolver++", "steps": 1}


def test_serve_cli_refuses_before_starting_and_wires_an_accepted_sampler(home, shards, monkeypatch):
    import uvicorn

    from rapid_pipeline import cli

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    model_dir = make_model_dir(home, "demo", "s2")
    with pytest.raises(ValueError, match="no fast-sampler decision"):
        cli.invoke(["serve", "--model", str(model_dir), "--fast-sampler"], home=home.root)
    assert started == []  # refused before binding a port
    _accept(home, "s2", cand_noise=0.05)
    out = cli.invoke(["serve", "--model", str(model_dir), "--fast-sampler"], home=home.root)
    assert out["fast_sampler"] == {"scheduler": "dpmsolver++", "steps": 1}
    assert started[0].state.worker.settings.fast_steps == 1


def test_stand_in_sampler_quality_follows_the_protocol():
    pipe = SamplerStandIn({("dpmsolver++", 1): 1.0})
    import torch

    good = pipe(PROMPT, num_inference_steps=2, scheduler="pndm", generator=torch.Generator().manual_seed(0)).images[0]
    bad = pipe(PROMPT, num_inference_steps=1, scheduler="dpmsolver++", generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(good, Image.Image) and good.tobytes() != bad.tobytes()
    assert pipe.protocols == [("pndm", 2), ("dpmsolver++", 1)]
