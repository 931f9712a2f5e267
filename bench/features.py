"""Evaluation feature throughput: real test-split images decoded in workers, and Inception features in memory.

    .venv/bin/python bench/features.py --device cpu --images 256 --batch-size 32           # CPU smoke run
    .venv/bin/python bench/features.py --device cuda --images 20000 --batch-size 256 --workers 16 \\
        [--inception-weights pt_inception-2015-12-05.pth]     # issue 5's setting: >= 3,000 images/s on a GPU

Writes a synthetic test split (``--side`` px JPEGs in webdataset tars written by ``webdataset.TarWriter``,
plus the ``manifest.json`` of the shard contract) to a temp dir, then measures, in this process:

1. decode: `metrics.features.iter_uint8_batches(ShardImages)` — read at the byte offset, `core.images`
   decoder, clean-fid's PIL bicubic resize to 299 — in this process (the baseline) and in ``--workers``
   worker processes; images/s and the ratio;
2. features in memory: the same uint8 batches, already decoded, through ours (`features.extract` with
   `InceptionFeatures`: the network plus streamed float64 Gaussian sums) and through torchmetrics' own
   ``FrechetInceptionDistance.update`` (the raw library, the same network); images/s, the ratio, and
   whether the two feature sums agree;
3. end to end: the decode workers feeding ours (what ``rapid evaluate`` does for the real side).

Without ``--inception-weights`` the network gets random weights built here (nothing is downloaded):
the speed is the same, the features mean nothing. The goal is judged only on a CUDA device.
The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid_pipeline.metrics import features as F  # noqa: E402

GOAL_FEATURES_PER_S = 3000.0  # issue 5: Inception features in memory, one GPU


def write_split(root: Path, n: int, side: int, per_shard: int = 1000, seed: int = 0) -> Path:
    """root/test/NNNNNN.tar (.jpg/.txt) + root/manifest.json, `n` smooth colour images of `side` px."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = root / "test" / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(n, start + per_shard)):
                sink.write({"__key__": f"p{i:015d}", "jpg": _jpeg(rng, side), "txt": f"图片{i}"})
        shards.append({"path": f"test/{path.name}", "samples": min(n, start + per_shard) - start})
    (root / "manifest.json").write_text(json.dumps({"splits": {"test": {"shards": shards, "samples": n}}}))
    return root


def _jpeg(rng: np.random.Generator, side: int) -> bytes:
    yy, xx = np.mgrid[0:side, 0:side]
    base = rng.integers(0, 200, 3)
    arr = np.clip(base + (xx[..., None] * rng.integers(0, 3, 3) + yy[..., None]) // 4, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def random_inception_weights(path: Path) -> Path:
    """A state dict of torch-fidelity's FID InceptionV3 with random weights (for timing only).

    Why patch: its constructor downloads the weights when given no path; here it must not.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    cls = fi.FeatureExtractorInceptionV3
    saved = fi.load_state_dict_from_url, cls.load_state_dict
    fi.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: {}), (lambda self, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    finally:
        fi.load_state_dict_from_url, cls.load_state_dict = saved
    torch.save(net.state_dict(), path)
    return path


def timed(fn, *args) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def decode_all(refs: list, batch_size: int, workers: int) -> list[torch.Tensor]:
    return list(F.iter_uint8_batches(F.ShardImages(refs), batch_size, workers))


def torchmetrics_update(metric, batches: list[torch.Tensor], device: str):
    metric.reset()
    for batch in batches:
        metric.update(batch.to(device), real=True)
    return metric


def measure(args: argparse.Namespace, root: Path, weights: Path) -> dict:
    refs = F.index_split(root, "test")
    n = len(refs)
    base_s, batches = timed(decode_all, refs, args.batch_size, 0)
    par_s, _ = timed(decode_all, refs, args.batch_size, args.workers)
    extractor = F.InceptionFeatures(weights, args.device)
    for batch in batches[: args.warmup]:  # cuDNN autotuning and lazy initialisation, untimed
        extractor(batch)
    ours_s, (stats, _) = timed(F.extract, extractor, batches)
    lib_s, metric = timed(torchmetrics_update, extractor.fid, batches, args.device)
    e2e_s, _ = timed(lambda: F.extract(extractor, F.iter_uint8_batches(F.ShardImages(refs), args.batch_size, args.workers)))
    lib_sum = metric.real_features_sum.double().cpu().numpy()
    agree = bool(np.allclose(stats.total, lib_sum, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(lib_sum).max()))))
    return {"images": n, "decode_per_s": {"in_process": n / base_s, f"workers_{args.workers}": n / par_s},
            "decode_ratio": base_s / par_s, "features_per_s": {"ours": n / ours_s, "torchmetrics": n / lib_s},
            "features_ratio_vs_torchmetrics": lib_s / ours_s, "end_to_end_per_s": n / e2e_s, "sums_agree": agree}


def goal(result: dict, device: str) -> dict:
    measured = result["features_per_s"]["ours"]
    comparable = device.startswith("cuda")
    return {"metric": "features_per_s", "goal": GOAL_FEATURES_PER_S, "measured": measured,
            "met": (measured >= GOAL_FEATURES_PER_S) if comparable else None, "comparable": comparable}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="test-split images to write and measure (default 512)")
    p.add_argument("--side", type=int, default=256, help="side of the synthetic JPEGs in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-network batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="decode worker processes of the parallel run (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed network batches first (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--inception-weights", default="", help="LOCAL torch-fidelity InceptionV3 weights (default: random, timing only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.images < 2 or args.batch_size < 1 or args.workers < 1:
        p.error("--images must be >= 2, --batch-size and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_split(Path(tmp) / "shards", args.images, args.side)
        weights = Path(args.inception_weights) if args.inception_weights else random_inception_weights(Path(tmp) / "inception.pt")
        result = measure(args, root, weights)
    result.update(device=args.device, batch_size=args.batch_size, workers=args.workers, side=args.side,
                  weights="given" if args.inception_weights else "random (timing only)")
    result["goal"] = goal(result, args.device)
    for key in ("decode_per_s", "features_per_s"):
        print(f"{key}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result[key].items()))
    print(f"decode ratio (workers / in-process): {result['decode_ratio']:.2f}; features ratio (ours / torchmetrics): "
          f"{result['features_ratio_vs_torchmetrics']:.2f}; end to end {result['end_to_end_per_s']:,.1f} images/s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
