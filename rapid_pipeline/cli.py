"""``rapid``: the command line of rapid_pipeline. ``rapid --help`` lists the commands, and
``rapid COMMAND --help`` explains each one.

Every command works on a home folder (``--home`` or ``RAPID_HOME``, default ``./rapid_home``),
prints a human summary (or, with ``--json``, one JSON object: counts, paths, run id), and exits
non-zero with a one-line reason on failure (``RAPID_DEBUG=1`` shows the traceback).

Each command lives in its own module, imported only when that command runs (so ``rapid --help``
does not import torch). A command module defines ``add_arguments(parser)`` and
``main(args, home) -> StageReport | dict``; its docstring is the command's ``--help`` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from typing import Any, Sequence

# (command path) -> (module, one-line help). Order is the order `rapid --help` shows.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo-data",): ("rapid_pipeline.demo", "write the deterministic synthetic demo domain (KG + image-text pairs)"),
    ("ingest", "kg"): ("rapid_pipeline.ingest.kg", "ingest KG triples (TSV/CSV, N-Triples, Turtle, JSONL; .gz/.bz2) into the lake"),
    ("ingest", "pairs"): ("rapid_pipeline.ingest.pairs", "ingest image-text pairs (Wukong CSV/Parquet, image folders, img2dataset tars)"),
    ("sql",): ("rapid_pipeline.sql_cli", "run a SQL query or a .sql file against the warehouse"),
    ("lineage",): ("rapid_pipeline.lineage_cli", "show the runs and inputs upstream of a table or path"),
    ("link",): ("rapid_pipeline.link", "link entities named in captions to the KG (Aho-Corasick)"),
    ("coverage",): ("rapid_pipeline.coverage", "entity coverage report of a domain (sql/coverage.sql)"),
    ("kg", "transe"): ("rapid_pipeline.transe", "train TransE entity embeddings with PyKEEN"),
    ("shard",): ("rapid_pipeline.shard", "write webdataset shards per split with entity annotations"),
    ("train", "clip"): ("rapid_pipeline.train.clip", "train the knowledge-enhanced Chinese CLIP (CKCLIP)"),
    ("train", "vae"): ("rapid_pipeline.train.vae", "train the KL autoencoder (VAE) from scratch when no pretrained SD VAE is given"),
    ("train", "diffusion"): ("rapid_pipeline.train.diffusion", "fine-tune the latent diffusion U-Net (+ CKCLIP text tower)"),
    ("train", "sr"): ("rapid_pipeline.train.sr", "fine-tune the ESRGAN x4 super-resolution model"),
    ("pipeline", "assemble"): ("rapid_pipeline.assemble", "assemble trained CKCLIP, U-Net, VAE and ESRGAN into one pipeline folder"),
    ("generate",): ("rapid_pipeline.generate", "text -> image with a pipeline folder"),
    ("compile",): ("rapid_pipeline.accel.compile", "build an optimized (attention backend + compiler + precision) artifact"),
    ("evaluate",): ("rapid_pipeline.evaluate", "FID / CLIP score / retrieval of a model on a domain's test split, with promotion gate"),
    ("serve",): ("rapid_pipeline.serve", "REST API: text -> PNG"),
    ("run-demo",): ("rapid_pipeline.demo_run", "the main job: demo data -> ingest -> link -> TransE -> shards -> train -> evaluate"),
}


class CommandError(RuntimeError):
    """An expected failure: printed as one line, exit code 1."""


def _groups() -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    for path in COMMANDS:
        out.setdefault(path[0], []).append(path)
    return out


def _selected(argv: Sequence[str]) -> tuple[str, ...] | None:
    words = [a for a in argv if not a.startswith("-")]
    # Skip values of top-level options (``--home DIR``) that precede the command words.
    for i in range(len(words)):
        for n in (2, 1):
            if tuple(words[i:i + n]) in COMMANDS:
                return tuple(words[i:i + n])
    return None


def _add_command(sub, path: tuple[str, ...], load: bool) -> None:
    module_name, help_text = COMMANDS[path]
    if not load:
        sub.add_parser(path[-1], help=help_text)
        return
    module = importlib.import_module(module_name)
    p = sub.add_parser(path[-1], help=help_text, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_module=module)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    chosen = _selected(argv)
    parser = argparse.ArgumentParser(prog="rapid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=None, help="home folder (default: $RAPID_HOME or ./rapid_home)")
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for head, paths in _groups().items():
        if paths == [(head,)]:
            _add_command(sub, (head,), chosen == (head,))
            continue
        group = sub.add_parser(head, help=" / ".join(p[1] for p in paths) + " (see rapid " + head + " --help)")
        gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        for path in paths:
            _add_command(gsub, path, chosen == path)
    return parser


def _jsonable(result: Any) -> Any:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    return result


def _print(result: Any, as_json: bool) -> None:
    data = _jsonable(result)
    if as_json:
        print(json.dumps(data, ensure_ascii=False, default=str, indent=1))
    elif hasattr(result, "summary"):
        print(result.summary())
    elif isinstance(data, dict) and "text" in data:
        print(data["text"])
    elif data is not None:
        print(json.dumps(data, ensure_ascii=False, default=str, indent=1))


def invoke(argv: Sequence[str], home: str | os.PathLike | None = None) -> Any:
    """Run one command in-process and return its JSON-able result; errors propagate as exceptions.

    This is how DAG tasks and tests call stages: ``invoke(["ingest", "pairs", path, "--domain", "demo"])``.
    """
    from .core.home import Home

    args = build_parser(argv).parse_args(list(argv))
    if not hasattr(args, "_module"):
        raise CommandError(f"not a command: {' '.join(argv)}")
    return _jsonable(args._module.main(args, Home.from_env(home or args.home)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_module"):
        parser.print_help()
        return 2
    from .core.home import Home

    try:
        home = Home.from_env(args.home)
        result = args._module.main(args, home)
    except KeyboardInterrupt:
        print("rapid: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback, unless asked
        if os.environ.get("RAPID_DEBUG"):
            raise
        print(f"rapid: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
