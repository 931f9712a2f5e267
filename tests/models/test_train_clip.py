"""`rapid train clip`: loss falls, exact resume, CLI end to end (tiny preset on a shard fixture built here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import _shards
from _shards import entity_sample, noisy_colour
from rapid_pipeline.train import clip as tc
from rapid_pipeline.train import common

ENTITIES = [("红富士苹果", (200, 30, 30)), ("香蕉", (230, 220, 40)), ("青椒", (30, 160, 40)),
            ("蓝莓", (40, 50, 200)), ("葡萄", (120, 40, 140)), ("橙子", (250, 140, 20)),
            ("白菜", (235, 235, 225)), ("黑米", (25, 25, 25))]
TEMPLATES = ["一张{}的照片", "桌上放着{}", "新鲜的{}特写", "{}和盘子"]


def _sample(i: int, split: str, rng) -> dict:
    name, rgb = ENTITIES[i % len(ENTITIES)]
    return entity_sample(i, split, [n for n, _ in ENTITIES], TEMPLATES, noisy_colour(rgb, rng, 48, sd=12))


def write_shards(home, domain="demo", sizes=(("train", 48), ("val", 16)), dim=8) -> None:
    _shards.write_shards(home, _sample, sizes, domain, n_entities=len(ENTITIES), dim=dim, image_size=48)


def _run_steps(tr, n):
    return [tc.train_step(tr, tc.collate(tr, tc.next_samples(tr))) for _ in range(n)]


def test_loss_falls_on_tiny(home, tmp_path):
    write_shards(home)
    cfg = tc.ClipTrainConfig(steps=100, batch_size=8, lr=1e-3, warmup_steps=1)
    tr = tc.setup(cfg, home, "demo", tmp_path / "work")
    batch = tc.collate(tr, tc.next_samples(tr))
    losses = [tc.train_step(tr, batch) for _ in range(30)]  # the same batch: the loss must go down
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses
    assert batch["entity_mask"].any(dim=1).all()  # every fixture caption carries an entity


def test_resume_gives_the_same_next_step_loss(home, tmp_path):
    write_shards(home)
    cfg = tc.ClipTrainConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=0)
    straight = _run_steps(tc.setup(cfg, home, "demo", tmp_path / "a"), 8)  # 48/8 = 6 steps: crosses an epoch

    first = tc.setup(cfg, home, "demo", tmp_path / "b")
    head = _run_steps(first, 5)
    tc.save(first)
    torch.manual_seed(123), np.random.seed(7)  # disturb every RNG: resume must restore them
    second = tc.setup(cfg, home, "demo", tmp_path / "b")
    assert tc.resume(second, "auto") and second.step == 5 and (second.epoch, second.position) == (0, 40)
    tail = _run_steps(second, 3)
    assert np.allclose(head, straight[:5], atol=0, rtol=0)
    assert np.allclose(tail, straight[5:], atol=1e-6, rtol=0), (tail, straight[5:])


def test_checkpoint_roundtrip_restores_optimizer_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.randn(4, 3)).sum().backward()
    opt.step(), sched.step()
    common.save_checkpoint(tmp_path, 1, {"m": model}, opt, sched, {"epoch": 0, "position": 4})
    expected = torch.rand(3)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    state = common.load_checkpoint(common.latest_checkpoint(tmp_path), {"m": model2}, opt2, sched2)
    assert state.step == 1 and state.data_position == {"epoch": 0, "position": 4}
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model2.weight, model.weight) and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "checkpoints" / "step-0000002").mkdir()  # an unfinished one (no state.json) is never picked
    assert common.latest_checkpoint(tmp_path).name == "step-0000001"


def test_cli_trains_publishes_logs_and_caches(home):
    from rapid_pipeline import cli
    from rapid_pipeline.core.warehouse import query

    write_shards(home)
    argv = ["train", "clip", "--domain", "demo", "--preset", "tiny", "--steps", "4", "--batch-size", "8",
            "--eval-max", "16"]
    out = cli.invoke(argv, home=home.root)
    assert out["status"] == "ok"
    model_dir = home.root / "models" / "ckclip" / "demo" / (home.root / "models/ckclip/demo/CURRENT").read_text().strip()
    assert model_dir == __import__("pathlib").Path(out["extra"]["model_dir"])
    for name in ("config.json", "model.safetensors", "knowledge.json", "knowledge.safetensors",
                 "knowledge/entities.parquet", "report.json", "checkpoints/step-0000004/state.json"):
        assert (model_dir / name).exists(), name
    report = json.loads((model_dir / "report.json").read_text())
    r = report["retrieval"]
    assert r["split"] == "val" and r["pairs"] == 16 and 0 <= r["t2i_R@1"] <= r["t2i_R@5"] <= r["t2i_R@10"] <= 1
    assert report["entity_coverage"] == 1.0 and report["steps"] == 4
    rows = query(home, "SELECT name, count(*) FROM metrics WHERE stage='train_clip' GROUP BY name ORDER BY name")
    counts = dict(zip(*rows.to_pydict().values()))
    assert counts["loss"] == 4 and counts["retrieval/t2i_R@1"] == 1 and counts["retrieval/i2t_R@10"] == 1
    assert cli.invoke(argv, home=home.root)["status"] == "cached"


def test_cli_resumes_after_a_crash(home, monkeypatch):
    from rapid_pipeline import cli
    from rapid_pipeline.core.faults import InjectedFault

    write_shards(home)
    argv = ["train", "clip", "--domain", "demo", "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2",
            "--eval-max", "8"]
    monkeypatch.setenv("RAPID_FAULT", "train_clip:mid_write:raise")  # dies while publishing, after training
    with pytest.raises(InjectedFault):
        cli.invoke(argv, home=home.root)
    assert not (home.root / "models/ckclip/demo/CURRENT").exists()
    monkeypatch.delenv("RAPID_FAULT")
    out = cli.invoke(argv, home=home.root)
    report = json.loads((__import__("pathlib").Path(out["extra"]["model_dir"]) / "report.json").read_text())
    assert report["resumed"] is True and report["steps"] == 4 and len(report.get("config", {})) > 0


def test_no_knowledge_flag_and_bad_input(home):
    from rapid_pipeline import cli

    with pytest.raises(FileNotFoundError, match="rapid shard"):
        cli.invoke(["train", "clip", "--domain", "nosuch"], home=home.root)
    write_shards(home)
    with pytest.raises(ValueError, match="fewer than one batch"):
        cli.invoke(["train", "clip", "--domain", "demo", "--steps", "2", "--batch-size", "64"], home=home.root)
    out = cli.invoke(["train", "clip", "--domain", "demo", "--steps", "2", "--batch-size", "8", "--no-knowledge",
                      "--eval-max", "8"], home=home.root)
    model_dir = __import__("pathlib").Path(out["extra"]["model_dir"])
    assert "nokg" in model_dir.name
    assert json.loads((model_dir / "knowledge.json").read_text())["knowledge"] is False
