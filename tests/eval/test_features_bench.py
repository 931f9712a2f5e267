"""bench/features.py on CPU with a few images: structure, ratios from measured times, and that our
streamed Inception sums equal torchmetrics' own on the same batches (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import urllib.request

import pytest

def test_cpu_features_bench(load_bench, capsys, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("the bench tried to download something")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    bench = load_bench("features")
    result = bench.main(["--device", "cpu", "--images", "6", "--batch-size", "4", "--workers", "1", "--side", "64",
                         "--threads", "1", "--warmup", "1", "--json-out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(json.dumps(result)) == json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 6 and result["sums_agree"] is True
    feats = result["features_per_s"]
    assert feats["ours"] > 0 and feats["torchmetrics"] > 0
    assert result["features_ratio_vs_torchmetrics"] == pytest.approx(feats["ours"] / feats["torchmetrics"])
    assert result["decode_ratio"] == pytest.approx(result["decode_per_s"]["workers_1"] / result["decode_per_s"]["in_process"])
    assert result["goal"] == {"metric": "features_per_s", "goal": 3000.0, "measured": feats["ours"], "met": None, "comparable": False}
    assert result["weights"] == "random (timing only)"


def test_bad_arguments_are_a_clear_error(load_bench):
    with pytest.raises(SystemExit):
        load_bench("features").main(["--images", "1"])
