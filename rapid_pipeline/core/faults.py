"""Fault injection for crash tests: ``RAPID_FAULT=stage:point:action[,stage:point:action]``.

`action` is ``sigkill`` (the process dies at once, as on OOM-kill) or ``raise``.
Stages call ``fault_point("ingest_pairs", "mid_write")`` at the places tests aim at; with the
variable unset this is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    pass


def _rules() -> set[tuple[str, str, str]]:
    spec = os.environ.get("RAPID_FAULT", "").strip()
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"RAPID_FAULT item {item!r} is not stage:point:action")
        out.add(tuple(parts))
    return out


def fault_point(stage: str, point: str) -> None:
    for s, p, action in _rules():
        if s == stage and p == point:
            if action == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "raise":
                raise InjectedFault(f"injected fault at {stage}:{point}")
            raise ValueError(f"unknown RAPID_FAULT action {action!r} (sigkill|raise)")
