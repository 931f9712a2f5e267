"""Progress bars on long work (tqdm on stderr, so ``--json`` output on stdout stays clean).

``RAPID_PROGRESS=0`` turns them off (CI logs, Airflow task logs).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("RAPID_PROGRESS", "1") not in {"0", "false", "off"}


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled(), dynamic_ncols=True, leave=False))


def bar(desc: str, total: int | None = None, unit: str = "it"):
    return tqdm(desc=desc, total=total, unit=unit, disable=not enabled(), dynamic_ncols=True, leave=False)
