"""bench/latency.py on the tiny preset / CPU: table structure, ratios computed from measured times."""

from __future__ import annotations

import json

import pytest

def test_tiny_cpu_bench_structure(load_bench, capsys, tmp_path):
    bench = load_bench("latency")
    out_file = tmp_path / "bench.json"
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--fast-steps", "2", "--iters", "1",
                         "--warmup", "1", "--throughput-batches", "2", "--variants", "eager,sdpa-math", "--size", "128",
                         "--extra-variants", "eager", "--json-out", str(out_file)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(json.dumps(result, default=str))  # last line: the JSON
    assert json.loads(out_file.read_text())["best"] == result["best"]
    assert printed[0].split()[:7] == ["variant", "text_encoder", "unet", "unet_per_step", "vae_decoder",
                                      "super_resolution", "total"]
    assert [line.split()[0] for line in printed[2:4]] == ["eager", "sdpa-math"]

    eager, other = result["results"]["eager"], result["results"]["sdpa-math"]
    for comp in ("text_encoder", "unet", "vae_decoder", "super_resolution", "total"):
        assert eager["ms"][comp] > 0 and other["ms"][comp] > 0
        assert other["ratio_vs_eager"][comp] == pytest.approx(eager["ms"][comp] / other["ms"][comp])
        assert eager["ratio_vs_eager"][comp] == pytest.approx(1.0)
    assert other["ms"]["unet_per_step"] == pytest.approx(other["ms"]["unet"] / 2)
    assert other["options"]["attention"] == "sdpa-math" and eager["options"]["compiler"] == "none"
    assert result["final_size"] == 128 and result["size"] == 32  # --size is the final (x4 ESRGAN) size

    assert set(result["throughput"]["eager"]) == {"2"} and result["throughput"]["eager"]["2"] > 0
    assert result["fast_total_ms"]["eager"] > 0
    goals = {g["metric"]: g for g in result["goals"]}
    assert goals["total_ms"]["measured"] == pytest.approx(result["results"][result["best"]]["ms"]["total"])
    # A tiny CPU run is not the goals' setting (paper preset, GPU, 1024 px): nothing is judged met or not.
    assert result["goals_comparable"] is False and all(g["met"] is None for g in result["goals"])
    assert any(line.strip().startswith("total_ms") and "goal <= 120.0" in line for line in printed)


def test_unknown_variant_is_a_clear_error(load_bench):
    bench = load_bench("latency")
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(["--preset", "tiny", "--device", "cpu", "--variants", "warp-drive", "--throughput-batches"])


@pytest.mark.gpu
@pytest.mark.slow
def test_tiny_cuda_bench_with_compile_and_cuda_graphs(load_bench):
    bench = load_bench("latency")
    result = bench.main(["--preset", "tiny", "--device", "cuda", "--steps", "4", "--iters", "2", "--warmup", "2",
                         "--throughput-batches", "2", "--variants", "eager,lowp-flash,lowp-flash-inductor-cudagraphs"])
    assert result["device"].startswith("cuda:")
    for name in ("eager", "lowp-flash", "lowp-flash-inductor-cudagraphs"):
        assert result["results"][name]["ms"]["total"] > 0
    assert result["results"]["lowp-flash-inductor-cudagraphs"]["options"]["cuda_graphs"] is True


def test_goals_are_judged_only_for_the_paper_setting(load_bench):
    import argparse

    import torch

    bench = load_bench("latency")
    paper = argparse.Namespace(preset="paper", model=None, batch=1, steps=50)
    assert bench.comparable_to_goals(paper, torch.device("cuda"), 1024)
    assert not bench.comparable_to_goals(paper, torch.device("cpu"), 1024)
    assert not bench.comparable_to_goals(argparse.Namespace(**{**vars(paper), "preset": "tiny"}), torch.device("cuda"), 1024)
    assert not bench.comparable_to_goals(paper, torch.device("cuda"), 512)
    ms = {"total": 100.0, "unet_per_step": 1.5, "super_resolution": 12.0, "vae_decoder": 3.0}
    rows = {r["metric"]: r["met"] for r in bench.goal_rows({"v": {"ms": ms}}, {"v": {"1": 25.0}}, {"v": 40.0}, "v", True)}
    assert rows == {"total_ms": True, "unet_ms_per_step": True, "super_resolution_ms": False, "vae_decoder_ms": True,
                    "throughput_images_per_s": True, "fast_total_ms": True}
