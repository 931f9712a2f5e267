"""Does a trained pipeline draw each demo entity in the colour its KG gives it?

    .venv/bin/python scripts/colour_probe.py --model rapid_home/models/pipeline/demo/<run> --seeds 8
    .venv/bin/python scripts/colour_probe.py --model A --model B          # compare builds on the same seeds

For every demo entity with a saturated KG colour (颜色 is not 白色), generates ``--seeds`` images of
"一张{name}的照片" (seeded, PNDM, guidance ``--guidance``), takes the mean of the image's saturated
pixels (HSV saturation > 0.35 and value > 0.25: the demo backgrounds are grey or beige) and names
the nearest colour of the demo palette. Prints the share of images whose colour is the entity's KG
colour (chance: 1 / number of palette colours), per model, and one JSON line.

Why a script and not a test: it measures what a model learned, which takes minutes of training; the
demo domain is built so that a tiny model can learn it (each image is the entity's shape filled with
its KG colour).
"""

from __future__ import annotations

import argparse
import colorsys
import json

import numpy as np
import torch

from rapid_pipeline.demo import COLOURS, ENTITIES
from rapid_pipeline.generate import load

PALETTE = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items() if name != "白色"}


def saturated_mean(image: np.ndarray) -> np.ndarray | None:
    """Mean RGB (0-255) of the saturated pixels of an HxWx3 uint8 image, None if there are none."""
    flat = image.reshape(-1, 3).astype(np.float64) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in flat])
    mask = (hsv[:, 1] > 0.35) & (hsv[:, 2] > 0.25)
    return flat[mask].mean(axis=0) * 255.0 if mask.any() else None


def nearest_colour(rgb: np.ndarray | None) -> str | None:
    if rgb is None:
        return None
    return min(PALETTE, key=lambda name: float(np.sum((PALETTE[name] - rgb) ** 2)))


def probe(model: str, seeds: int, steps: int, guidance: float) -> dict:
    pipe = load(model, "auto", "auto")
    pipe.set_progress_bar_config(disable=True)
    hits, rows = 0, []
    for ent in (e for e in ENTITIES if e["colour"] in PALETTE):
        prompt = f"一张{ent['name']}的照片"
        gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
        images = [np.asarray(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                                  super_resolution=False).images[0].convert("RGB")) for g in gens]
        got = [nearest_colour(saturated_mean(im)) for im in images]
        hits += sum(c == ent["colour"] for c in got)
        rows.append({"entity": ent["name"], "kg_colour": ent["colour"], "drawn": got})
    total = sum(len(r["drawn"]) for r in rows)
    return {"model": model, "accuracy": hits / total, "images": total, "chance": 1 / len(PALETTE), "rows": rows}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="pipeline folder (repeat to compare builds)")
    p.add_argument("--seeds", type=int, default=8, help="images per entity")
    p.add_argument("--steps", type=int, default=25, help="PNDM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    args = p.parse_args(argv)
    results = [probe(m, args.seeds, args.steps, args.guidance) for m in args.model]
    for r in results:
        print(f"{r['model']}: KG colour drawn in {r['accuracy']:.1%} of {r['images']} images (chance {r['chance']:.1%})")
    print(json.dumps([{k: v for k, v in r.items() if k != "rows"} for r in results]))
    return results


if __name__ == "__main__":
    main()
