"""Show where a table or file came from: ``rapid lineage TABLE_OR_PATH``.

    rapid lineage kg_entities                 # every run that wrote kg_entities, and its inputs, as a tree
    rapid lineage kg_triples --domain demo
    rapid lineage rapid_home/lake/kg_triples/domain=demo/part=manual
    rapid lineage models/transe/demo --all-runs

Each node is a run (stage, domain/partition, status, time, run id); below it are the run's inputs
(URI, fingerprint, rows) and, under each input, the runs that produced that input, recursively
(`core.lineage.upstream`). By default only the latest successful (or cached) run per
(stage, domain, partition) is shown; ``--all-runs`` shows failed and superseded runs too.

Invariants: read-only; a bare name must be a lake table declared in ``schemas/`` (anything else
is refused before SQL runs); paths are bound as parameters, never pasted into SQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core import lineage, warehouse
from .core.home import Home, check_name
from .core.schemas import known_tables

OK = ("ok", "cached")


def resolve_target(target: str, home: Home) -> str:
    """A lake table name, or a path/URI turned into the URI lineage rows use."""
    if "/" in target or "://" in target:
        if "://" in target:
            return target
        path = Path(target)
        return lineage.normalize_uri(path if path.is_absolute() or path.exists() else home.root / path)
    if target not in known_tables():
        raise ValueError(f"unknown table {target!r}: use one of {', '.join(known_tables())} or a path")
    return target


def _select(runs: list[dict], all_runs: bool, domain: str | None) -> list[dict]:
    runs = [r for r in runs if domain is None or r["domain"] == domain]
    if all_runs:
        return runs
    latest: dict[tuple, dict] = {}
    for r in runs:  # upstream() returns newest first
        if r["status"] in OK:
            latest.setdefault((r["stage"], r["domain"], r["partition"]), r)
    return list(latest.values())


def build_tree(con, target: str, depth: int, all_runs: bool = False, domain: str | None = None,
               seen: set | None = None) -> list[dict]:
    """Runs that produced `target`, each with its inputs and (recursively) their producers."""
    seen = set() if seen is None else seen
    if depth <= 0:
        return []
    nodes = []
    for run in _select(lineage.upstream(con, target, depth=1), all_runs, domain):
        node = {k: run[k] for k in ("run_id", "stage", "domain", "partition", "status", "ended_at", "code_version")}
        node["inputs"] = []
        if run["run_id"] not in seen:
            seen.add(run["run_id"])
            for inp in run["inputs"]:
                producers = build_tree(con, inp["uri"], depth - 1, all_runs, None, seen)
                node["inputs"].append({**inp, "produced_by": producers})
        nodes.append(node)
    return nodes


def render(nodes: list[dict], indent: str = "") -> list[str]:
    lines = []
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        lines.append(f"{indent}{'└─' if last else '├─'} {node['stage']} [{node['domain']}/{node['partition']}] "
                     f"{node['status']} {node['ended_at'][:19]} run={node['run_id'][:8]}")
        child = indent + ("   " if last else "│  ")
        for j, inp in enumerate(node["inputs"]):
            inp_last = j == len(node["inputs"]) - 1
            rows = "" if inp["rows"] is None else f" rows={inp['rows']}"
            lines.append(f"{child}{'└─' if inp_last else '├─'} input {inp['uri']}{rows} fp={(inp['fingerprint'] or '')[:12]}")
            lines += render(inp["produced_by"], child + ("   " if inp_last else "│  "))
    return lines


def add_arguments(parser) -> None:
    parser.add_argument("target", help="a lake table name (kg_entities, pairs, ...) or a path / file:// URI of an output")
    parser.add_argument("--domain", default=None, help="only runs of this domain (top level)")
    parser.add_argument("--depth", type=int, default=10, help="how many producer levels to walk back (default 10)")
    parser.add_argument("--all-runs", action="store_true", help="also show failed and superseded runs")


def main(args, home: Home) -> dict[str, Any]:
    if args.domain is not None:
        check_name(args.domain, "domain")
    target = resolve_target(args.target, home)
    tree = []
    if home.warehouse.exists():  # no warehouse yet: nothing ever ran here
        with warehouse.connect(home, write=False) as con:
            tree = build_tree(con, target, args.depth, args.all_runs, args.domain)
    if not tree:
        return {"target": target, "runs": [], "text": f"no recorded run produced {args.target}"}
    return {"target": target, "runs": tree, "text": "\n".join([f"{args.target}"] + render(tree))}
