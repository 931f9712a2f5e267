"""Fixtures of the evaluation tests (helpers live in _evalkit.py)."""

from __future__ import annotations

import pytest
from _evalkit import write_split


@pytest.fixture
def shards(home):
    return write_split(home.shards / "demo")
