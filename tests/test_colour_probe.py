"""scripts/colour_probe.py's colour reading on drawn demo scenes (the model part needs minutes of training)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np

from rapid_pipeline.demo import COLOURS, ENTITIES, draw_scene


def _probe():
    path = Path(__file__).resolve().parents[1] / "scripts" / "colour_probe.py"
    spec = importlib.util.spec_from_file_location("colour_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_drawn_entity_reads_as_its_kg_colour():
    probe = _probe()
    rng = random.Random(0)
    for ent in [e for e in ENTITIES if e["colour"] != "白色"][:12]:
        image = np.asarray(draw_scene(rng, [ent], 64, 64))
        assert probe.nearest_colour(probe.saturated_mean(image)) == ent["colour"], ent["name"]


def test_a_grey_image_has_no_colour():
    probe = _probe()
    assert probe.nearest_colour(probe.saturated_mean(np.full((8, 8, 3), 128, np.uint8))) is None
    assert set(probe.PALETTE) == set(COLOURS) - {"白色"}
