"""TransE entity embeddings for a domain's KG (PyKEEN), published as a model folder.

    rapid kg transe --domain demo --preset tiny            # subgraph around linked entities (2 hops)
    rapid kg transe --domain demo --scope full --preset small
    rapid kg transe --domain demo --fold-in                # vectors for entities that arrived later

Reads ``kg_entities`` / ``kg_relations`` / ``kg_triples`` (and ``links`` for the default subgraph scope)
and writes ``models/transe/<domain>/<run>/`` (``embeddings.parquet``: entity_id, row int32,
vector list<float32>; ``relations.parquet``; ``metrics.json``; ``config.json``), then points
``models/transe/<domain>/CURRENT`` at it. `load_embeddings` reads it back.

Invariants:
* Memory stays bounded on big KGs: ids are mapped with Arrow compute into one int64 array and PyKEEN gets
  a label-free ``CoreTriplesFactory`` (no string triples, no label dicts); evaluation switches to a sampled
  entity subset above ``eval_full_max_entities`` and says so (``evaluation: sampled(n)``).
* Seeded: the same KG, config and seed give the same split, the same vectors and the same metrics.
* Resume continues: checkpoints (model, Adam state, RNG, early-stopping state) go under
  ``models/transe/<domain>/_train-<key>/checkpoints/`` every ``checkpoint_every`` epochs; a rerun of the
  same training picks the newest one up, so an interrupted run ends where an uninterrupted one would.
* Early stopping on validation filtered MRR; the best epoch's weights are the ones published.
* Fold-in never moves trained vectors: only the new rows are optimised, against frozen entity and
  relation vectors; old rows keep their row numbers.
* The run folder appears atomically (staging + rename) and CURRENT is replaced atomically, last.

Presets: ``tiny`` (dim 32, CPU seconds), ``small`` (dim 64), ``paper`` (dim 100: classic TransE
dimension of Bordes et al. 2013; CKCLIP's knowledge projection maps it to the text width 768).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .core import lake
from .core.atomic import atomic_write_bytes, atomic_write_json, publish_dir, staging_dir
from .core.config import add_config_args, config_from_args, opt, preset
from .core.faults import fault_point
from .core.fingerprint import fingerprint_obj, fingerprint_path
from .core.home import Home, check_name
from .core.progress import bar
from .core.stage import DatasetRef, StageReport, StageResult, run_stage
from .ingest.kg import stable_id

# torch_max_mem warns on every CPU evaluation that only CUDA is "safe" for its batch-size search: noise here.
logging.getLogger("torch_max_mem").setLevel(logging.ERROR)

STAGE = "transe"
EMBEDDINGS = "embeddings.parquet"
RELATIONS = "relations.parquet"
CURRENT = "CURRENT"


@dataclass(frozen=True)
class TransEConfig:
    embedding_dim: int = opt(32, "entity/relation vector size (paper preset: 100)")
    scoring_norm: int = opt(1, "p of the L_p distance ||h + r - t|| (1 or 2)")
    epochs: int = opt(30, "maximum training epochs")
    batch_size: int = opt(256, "positive triples per batch")
    lr: float = opt(0.01, "Adam learning rate")
    margin: float = opt(1.0, "margin of the margin-ranking loss")
    num_negs: int = opt(1, "negatives per positive (PyKEEN basic negative sampler: corrupt head or tail)")
    seed: int = opt(42, "seed of the split, the initialisation, batching and negative sampling")
    scope: str = opt("subgraph", "subgraph: entities in `links` + their k-hop neighbourhood; full: the whole KG")
    hops: int = opt(2, "k of the k-hop neighbourhood for --scope subgraph")
    split: tuple[float, ...] = opt((0.8, 0.1, 0.1), "train/valid/test ratios of the triples (seeded)")
    eval_every: int = opt(5, "validate (filtered MRR) every N epochs for early stopping")
    patience: int = opt(3, "stop after this many validations without improvement")
    relative_delta: float = opt(0.002, "minimum relative MRR gain that counts as an improvement")
    eval_batch_size: int = opt(256, "triples per evaluation batch (bounds evaluation memory)")
    eval_full_max_entities: int = opt(20000, "above this many entities, rank against a sampled entity subset")
    eval_sample_entities: int = opt(5000, "size of the sampled candidate entity set for large KGs")
    eval_max_triples: int = opt(5000, "at most this many valid/test triples are ranked (seeded sample)")
    checkpoint_every: int = opt(5, "epochs between checkpoints (resume continues from the newest)")
    fold_in: bool = opt(False, "give entities missing from the CURRENT model vectors, without retraining it")
    fold_in_epochs: int = opt(100, "optimisation steps over the new entities' triples (fold-in)")


PRESETS = {
    "tiny": TransEConfig(embedding_dim=32, epochs=30, eval_every=5, checkpoint_every=5),
    "small": TransEConfig(embedding_dim=64, epochs=200, eval_every=10, checkpoint_every=10, batch_size=1024),
    "paper": TransEConfig(embedding_dim=100, epochs=1000, eval_every=20, checkpoint_every=20, batch_size=4096,
                          lr=0.005, scoring_norm=1, patience=5),
}

# Fields that do not change what is learned: excluded from the resume key so a rerun with another
# checkpoint interval still finds its checkpoints.
_NOT_LEARNED = ("checkpoint_every", "fold_in", "fold_in_epochs", "eval_batch_size")


# ----------------------------------------------------------------------------------------- the graph
@dataclass
class Graph:
    """Integer-coded KG: ``triples[:, 0/1/2]`` index ``entity_ids`` / ``relation_ids`` / ``entity_ids``."""

    entity_ids: pa.Array
    relation_ids: pa.Array
    triples: np.ndarray  # int64 [n, 3]


def _id_table(home: Home, domain: str, table: str, id_col: str, prefix: str, names: list[pa.ChunkedArray]) -> pa.Table:
    """(id, name) of `table` sorted by id; names the triples use that the table lacks get their stable id too."""
    known = lake.read_table(home, table, domain, [id_col, "name"])
    used = pc.unique(pa.chunked_array([c for arr in names for c in arr.chunks], type=pa.string()))
    missing = pc.filter(used, pc.invert(pc.is_in(used, value_set=known["name"]))).to_pylist()
    extra = pa.table({id_col: [stable_id(prefix, domain, n) for n in missing], "name": pa.array(missing, pa.string())})
    return pa.concat_tables([known, extra.cast(known.schema)]).sort_by(id_col)


def _codes(names: pa.ChunkedArray, universe: pa.Table) -> np.ndarray:
    return pc.index_in(names, value_set=universe["name"]).to_numpy(zero_copy_only=False).astype(np.int64)


def load_graph(home: Home, domain: str) -> Graph:
    """All triples of the domain, integer-coded by id order (the entity universe also holds triple-less entities).

    kg_triples holds names; kg_entities / kg_relations map them to ids (one row per name)."""
    tri = lake.read_table(home, "kg_triples", domain, ["head", "relation", "tail"])
    ents = _id_table(home, domain, "kg_entities", "entity_id", "e", [tri["head"], tri["tail"]])
    rels = _id_table(home, domain, "kg_relations", "relation_id", "r", [tri["relation"]])
    triples = np.stack([_codes(tri["head"], ents), _codes(tri["relation"], rels), _codes(tri["tail"], ents)], 1)
    return Graph(ents["entity_id"].combine_chunks(), rels["relation_id"].combine_chunks(), triples.reshape(-1, 3))


def linked_entities(home: Home, domain: str) -> pa.Array:
    return pc.unique(lake.read_table(home, "links", domain, ["entity_id"])["entity_id"])


def khop_mask(graph: Graph, seeds: pa.Array, hops: int) -> np.ndarray:
    """Entities within `hops` undirected steps of `seeds` (vectorised frontier expansion)."""
    mask = np.zeros(len(graph.entity_ids), dtype=bool)
    idx = pc.fill_null(pc.index_in(seeds, value_set=graph.entity_ids), -1).to_numpy(zero_copy_only=False)
    mask[idx[idx >= 0]] = True  # linked entities unknown to the KG (-1) seed nothing
    h, t = graph.triples[:, 0], graph.triples[:, 2]
    for _ in range(hops):
        nxt = mask.copy()
        nxt[t[mask[h]]] = True
        nxt[h[mask[t]]] = True
        if (nxt == mask).all():
            break
        mask = nxt
    return mask


def scoped_graph(home: Home, domain: str, graph: Graph, scope: str, hops: int) -> tuple[Graph, str]:
    """Restrict to the induced subgraph on the k-hop neighbourhood of linked entities (or keep all)."""
    if scope not in ("subgraph", "full"):
        raise ValueError(f"unknown scope {scope!r}: use subgraph or full")
    if scope == "full":
        return graph, "full"
    seeds = linked_entities(home, domain)
    if len(seeds) == 0:
        raise ValueError(f"domain {domain!r} has no links: run `rapid link --domain {domain}` first, or use --scope full")
    mask = khop_mask(graph, seeds, hops)
    keep = mask[graph.triples[:, 0]] & mask[graph.triples[:, 2]]
    return Graph(graph.entity_ids, graph.relation_ids, graph.triples[keep]), f"subgraph({len(seeds)} linked, {hops} hops)"


def compact(graph: Graph) -> Graph:
    """Keep only entities/relations that occur in a triple, renumbered 0..n-1 in id order."""
    ents, inv_e = np.unique(graph.triples[:, [0, 2]], return_inverse=True)
    rels, inv_r = np.unique(graph.triples[:, 1], return_inverse=True)
    inv_e = inv_e.reshape(-1, 2)
    triples = np.stack([inv_e[:, 0], inv_r.reshape(-1), inv_e[:, 1]], 1).astype(np.int64)
    return Graph(graph.entity_ids.take(pa.array(ents)), graph.relation_ids.take(pa.array(rels)), triples)


def dedupe(graph: Graph) -> tuple[Graph, int]:
    unique = np.unique(graph.triples, axis=0) if len(graph.triples) else graph.triples
    return Graph(graph.entity_ids, graph.relation_ids, unique), len(graph.triples) - len(unique)


# ----------------------------------------------------------------------------------------- PyKEEN pieces
def triples_factory(triples: np.ndarray, num_entities: int, num_relations: int):
    import torch
    from pykeen.triples import CoreTriplesFactory

    return CoreTriplesFactory.create(mapped_triples=torch.as_tensor(triples, dtype=torch.long),
                                     num_entities=num_entities, num_relations=num_relations)


def split_triples(graph: Graph, config: TransEConfig):
    """Seeded train/valid/test split; PyKEEN moves triples so every test entity is seen in training."""
    if len(config.split) != 3 or abs(sum(config.split) - 1.0) > 1e-6:
        raise ValueError(f"--split needs three ratios summing to 1, got {config.split}")
    if len(graph.triples) < 10:
        raise ValueError(f"only {len(graph.triples)} triples in scope: TransE needs at least 10 (try --scope full or more --hops)")
    tf = triples_factory(graph.triples, len(graph.entity_ids), len(graph.relation_ids))
    return tf.split(list(config.split), random_state=config.seed)


def build_model(tf, config: TransEConfig):
    from pykeen.models import TransE

    return TransE(triples_factory=tf, embedding_dim=config.embedding_dim, scoring_fct_norm=config.scoring_norm,
                  loss="marginranking", loss_kwargs={"margin": config.margin}, random_seed=config.seed)


def build_loop(model, tf, config: TransEConfig):
    import torch
    from pykeen.training import SLCWATrainingLoop

    optimizer = torch.optim.Adam(model.get_grad_params(), lr=config.lr)
    return SLCWATrainingLoop(model=model, triples_factory=tf, optimizer=optimizer, negative_sampler="basic",
                             negative_sampler_kwargs={"num_negs_per_pos": config.num_negs})


# ----------------------------------------------------------------------------------------- evaluation
def eval_subset(mapped, num_entities: int, config: TransEConfig, rng: np.random.Generator):
    """Triples to rank and the candidate entities (None = all). Large KGs rank against a sample."""
    n = len(mapped)
    if n > config.eval_max_triples:
        mapped = mapped[np.sort(rng.choice(n, config.eval_max_triples, replace=False))]
    if num_entities <= config.eval_full_max_entities:
        return mapped, None, f"full({num_entities} entities, {len(mapped)} triples)"
    ends = np.unique(mapped[:, [0, 2]].numpy())
    extra = rng.choice(num_entities, min(config.eval_sample_entities, num_entities), replace=False)
    subset = np.union1d(ends, extra)
    return mapped, tuple(subset.tolist()), f"sampled({len(subset)} of {num_entities} entities, {len(mapped)} triples)"


def evaluate(model, mapped, filters: list, config: TransEConfig, seed_offset: int) -> dict:
    """Filtered (realistic-rank) MRR and Hits@1/3/10, both head and tail prediction."""
    from pykeen.evaluation import RankBasedEvaluator

    rng = np.random.default_rng(config.seed + seed_offset)
    mapped, restrict, how = eval_subset(mapped, model.num_entities, config, rng)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        res = RankBasedEvaluator(filtered=True).evaluate(
            model, mapped, batch_size=config.eval_batch_size, use_tqdm=False, restrict_entities_to=restrict,
            additional_filter_triples=filters)
    out = {"mrr": res.get_metric("both.realistic.inverse_harmonic_mean_rank")}
    for k in (1, 3, 10):
        out[f"hits_at_{k}"] = res.get_metric(f"both.realistic.hits_at_{k}")
    return {**{k: float(v) for k, v in out.items()}, "evaluation": how, "triples": int(len(mapped))}


# ----------------------------------------------------------------------------------------- training state
@dataclass
class Progress:
    epoch: int = 0
    best_mrr: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    losses: list = dataclasses.field(default_factory=list)
    valid: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    resumed_from: int = 0  # epoch of the checkpoint this run continued from (0 = fresh start)


def resume_key(config: TransEConfig, data_fingerprint: str) -> str:
    learned = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_LEARNED}
    return fingerprint_obj([learned, data_fingerprint])[:16]


def work_dir(home: Home, domain: str, key: str) -> Path:
    return home.models / "transe" / check_name(domain, "domain") / f"_train-{key}"


def _best_path(work: Path, epoch: int) -> Path:
    return work / f"best-{epoch:06d}.safetensors"


def save_progress(work: Path, loop, prog: Progress) -> None:
    from .train.common import save_checkpoint

    extra = dataclasses.asdict(prog)
    save_checkpoint(work, prog.epoch, {"model": loop.model}, loop.optimizer, extra=extra, keep=2)
    for old in work.glob("best-*.safetensors"):  # only the best file the newest checkpoint names survives
        if old.name != _best_path(work, prog.best_epoch).name and int(old.stem.split("-")[1]) < prog.epoch:
            old.unlink(missing_ok=True)
    fault_point(STAGE, "after_checkpoint")


def restore_progress(work: Path, loop) -> Progress | None:
    from .train.common import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(work)
    if ckpt is None:
        return None
    state = load_checkpoint(ckpt, {"model": loop.model}, loop.optimizer)
    prog = Progress(**{**state.extra, "resumed_from": int(state.extra["epoch"])})
    loop._epoch, loop.losses_per_epochs = prog.epoch, list(prog.losses)  # PyKEEN continues from here
    return prog


def _validate(loop, valid, filters, config: TransEConfig, prog: Progress, work: Path) -> None:
    from .core.checkpoint import save_state_dict

    mrr = evaluate(loop.model, valid, filters, config, seed_offset=1)["mrr"]
    prog.valid.append([prog.epoch, mrr])
    if mrr > prog.best_mrr * (1 + config.relative_delta) or prog.best_mrr < 0:
        prog.best_mrr, prog.best_epoch, prog.bad_evals = mrr, prog.epoch, 0
        save_state_dict(loop.model.state_dict(), _best_path(work, prog.epoch))
    else:
        prog.bad_evals += 1
        prog.stopped = prog.bad_evals >= config.patience


def _next_stop(prog: Progress, config: TransEConfig) -> int:
    """Train in chunks that end at the next validation, checkpoint or the last epoch."""
    nxt = [config.epochs]
    for every in (config.eval_every, config.checkpoint_every):
        if every > 0:
            nxt.append((prog.epoch // every + 1) * every)
    return min(nxt)


def train(loop, splits, config: TransEConfig, work: Path) -> Progress:
    """Epoch loop with validation-MRR early stopping and checkpoints; resumes from `work` if it can."""
    train_tf, valid_tf, _ = splits
    prog = restore_progress(work, loop) or Progress()
    filters = [train_tf.mapped_triples]
    # PyKEEN runs gc.collect() after every epoch; with torch + sklearn loaded that walks ~1M objects
    # (0.3 s/epoch here). Freezing the already-imported heap makes those collections cheap.
    gc.freeze()
    try:
        return _epochs(loop, train_tf, valid_tf, filters, config, work, prog)
    finally:
        gc.unfreeze()


def _epochs(loop, train_tf, valid_tf, filters, config: TransEConfig, work: Path, prog: Progress) -> Progress:
    with bar("transe epochs", total=config.epochs, unit="epoch") as pbar:
        pbar.update(prog.epoch)
        while prog.epoch < config.epochs and not prog.stopped:
            target = _next_stop(prog, config)
            loop.train(train_tf, num_epochs=target, batch_size=config.batch_size, continue_training=prog.epoch > 0,
                       use_tqdm=False, use_tqdm_batch=False, pin_memory=False)
            pbar.update(target - prog.epoch)
            prog.epoch, prog.losses = target, [float(x) for x in loop.losses_per_epochs]
            if config.eval_every > 0 and (prog.epoch % config.eval_every == 0 or prog.epoch == config.epochs):
                _validate(loop, valid_tf.mapped_triples, filters, config, prog, work)
            if config.checkpoint_every > 0 and (prog.epoch % config.checkpoint_every == 0 or prog.stopped):
                save_progress(work, loop, prog)
    return prog


def restore_best(loop, prog: Progress, work: Path) -> None:
    from .core.checkpoint import load_state_dict

    path = _best_path(work, prog.best_epoch)
    if prog.best_epoch and path.exists():
        loop.model.load_state_dict(load_state_dict(path))


# ----------------------------------------------------------------------------------------- outputs
def entity_matrix(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.entity_representations[0](indices=None).detach().cpu().numpy().astype(np.float32)


def relation_matrix(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.relation_representations[0](indices=None).detach().cpu().numpy().astype(np.float32)


def vectors_table(ids: pa.Array, matrix: np.ndarray, id_column: str) -> pa.Table:
    n, dim = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1), type=pa.float32())
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), flat)
    return pa.table({id_column: ids.cast(pa.string()), "row": pa.array(np.arange(n, dtype=np.int32)), "vector": vectors})


def write_table(table: pa.Table, path: Path) -> None:
    # Fixed options: the same vectors give the same bytes, so the fingerprint follows the content.
    pq.write_table(table, path, compression="zstd", row_group_size=65536)


def run_dir_name(run_id: str) -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + run_id[:8]


def domain_dir(home: Home, domain: str) -> Path:
    return home.models / "transe" / check_name(domain, "domain")


def publish_run(home: Home, domain: str, run_id: str, files: dict[str, pa.Table], docs: dict[str, dict]) -> Path:
    """Write the run folder in staging, swap it in, then replace CURRENT (the last, atomic step)."""
    final = domain_dir(home, domain) / run_dir_name(run_id)
    tmp = staging_dir(final)
    fault_point(STAGE, "start_write")
    for name, table in files.items():
        write_table(table, tmp / name)
    fault_point(STAGE, "mid_write")
    for name, doc in docs.items():
        atomic_write_json(tmp / name, doc)
    publish_dir(tmp, final)
    atomic_write_bytes(domain_dir(home, domain) / CURRENT, (final.name + "\n").encode())
    fault_point(STAGE, "end_write")
    return final


def record_metrics(home: Home, run_id: str, domain: str, subject: Path, data_fp: str, metrics: dict) -> None:
    from .train.common import log_metrics

    values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    extra = {k: v for k, v in metrics.items() if k not in values}
    log_metrics(home, run_id, STAGE, values, step=metrics.get("epochs_trained"), domain=domain, subject=str(subject),
                subject_fingerprint=fingerprint_path(subject / EMBEDDINGS), data_fingerprint=data_fp, extra=extra)


# ----------------------------------------------------------------------------------------- loading
def resolve_run(path: str | Path) -> Path:
    """A run folder, a domain folder (follows CURRENT) or an embeddings.parquet file -> the run folder."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if (path / CURRENT).is_file():
        return path / (path / CURRENT).read_text().strip()
    if (path / EMBEDDINGS).is_file():
        return path
    raise FileNotFoundError(f"{path}: no TransE embeddings (expected {EMBEDDINGS} or {CURRENT}); run `rapid kg transe` first")


def _read_vectors(path: Path, id_column: str) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path).sort_by("row")
    rows = table["row"].to_numpy()
    if len(rows) and not np.array_equal(rows, np.arange(len(rows))):
        raise ValueError(f"{path}: rows are not 0..n-1")
    vec = table["vector"].combine_chunks()
    dim = (len(vec.values) // len(vec)) if len(vec) else 0
    matrix = vec.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(vec), dim)
    return table[id_column].to_pylist(), matrix


def load_embeddings(path_or_domain_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(entity ids in row order, float32 [N, dim]) from a run folder, domain folder or parquet file."""
    path = Path(path_or_domain_dir)
    return _read_vectors(path if path.is_file() else resolve_run(path) / EMBEDDINGS, "entity_id")


def load_relations(path_or_domain_dir: str | Path) -> tuple[list[str], np.ndarray]:
    return _read_vectors(resolve_run(path_or_domain_dir) / RELATIONS, "relation_id")


# ----------------------------------------------------------------------------------------- stage bodies
def prepare(home: Home, domain: str, config: TransEConfig) -> tuple[Graph, str, int, int]:
    """Scoped, compacted, deduplicated graph + scope label, rows in scope and duplicates."""
    graph, scope = scoped_graph(home, domain, load_graph(home, domain), config.scope, config.hops)
    rows_in = len(graph.triples)
    graph, dups = dedupe(compact(graph)) if rows_in else (graph, 0)
    return graph, scope, rows_in, dups


def graph_fingerprint(graph: Graph) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(graph.triples).tobytes())
    for arr in (graph.entity_ids, graph.relation_ids):
        for i in range(0, len(arr), 1 << 16):  # in slices: a 16M-entity KG never becomes one giant string
            h.update("\0".join(arr.slice(i, 1 << 16).to_pylist()).encode() + b"\1")
    return h.hexdigest()


def train_body(home: Home, domain: str, config: TransEConfig, report: StageReport) -> StageResult:
    from pykeen.utils import set_random_seed

    graph, scope, rows_in, dups = prepare(home, domain, config)
    data_fp = graph_fingerprint(graph)
    work = work_dir(home, domain, resume_key(config, data_fp))
    set_random_seed(config.seed)
    splits = split_triples(graph, config)
    loop = build_loop(build_model(splits[0], config), splits[0], config)
    prog = train(loop, splits, config, work)
    restore_best(loop, prog, work)
    metrics = test_metrics(loop.model, splits, config, prog, scope, graph)
    final = publish_outputs(home, domain, report.run_id, loop.model, graph, config, metrics)
    record_metrics(home, report.run_id, domain, final, data_fp, metrics)
    shutil.rmtree(work, ignore_errors=True)  # published: checkpoints are no longer needed
    out = DatasetRef.of(final / EMBEDDINGS, rows=len(graph.entity_ids))
    return StageResult([out], rows_in=rows_in, rows_out=len(graph.triples), rows_duplicate=dups,
                       extra={"run_dir": str(final), **metrics})


def test_metrics(model, splits, config: TransEConfig, prog: Progress, scope: str, graph: Graph) -> dict:
    train_tf, valid_tf, test_tf = splits
    res = evaluate(model, test_tf.mapped_triples, [train_tf.mapped_triples, valid_tf.mapped_triples], config, seed_offset=2)
    return {**res, "scope": scope, "entities": len(graph.entity_ids), "relations": len(graph.relation_ids),
            "train_triples": train_tf.num_triples, "valid_triples": valid_tf.num_triples,
            "test_triples": test_tf.num_triples, "epochs_trained": prog.epoch, "best_epoch": prog.best_epoch,
            "best_valid_mrr": prog.best_mrr, "early_stopped": prog.stopped, "resumed_from_epoch": prog.resumed_from,
            "final_loss": prog.losses[-1] if prog.losses else None, "valid_history": prog.valid}


def publish_outputs(home: Home, domain: str, run_id: str, model, graph: Graph, config: TransEConfig, metrics: dict) -> Path:
    files = {EMBEDDINGS: vectors_table(graph.entity_ids, entity_matrix(model), "entity_id"),
             RELATIONS: vectors_table(graph.relation_ids, relation_matrix(model), "relation_id")}
    docs = {"metrics.json": metrics,
            "config.json": {"config": dataclasses.asdict(config), "domain": domain, "run_id": run_id,
                            "dim": config.embedding_dim, "model": "pykeen.TransE", "scope": metrics.get("scope")}}
    return publish_run(home, domain, run_id, files, docs)


# ----------------------------------------------------------------------------------------- fold-in
def fold_in_vectors(old_e: np.ndarray, new_count: int, rel: np.ndarray, triples: np.ndarray,
                    config: TransEConfig, norm: int, margin: float) -> tuple[np.ndarray, list[float]]:
    """Optimise only rows >= len(old_e) of [old; new] against frozen old entity and relation vectors.

    `triples` index the combined entity table; each has at least one new entity. Negatives corrupt the
    head or tail with a random entity (same scheme as training).
    """
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    old = torch.as_tensor(old_e)
    new = torch.nn.Parameter(torch.empty(new_count, old.shape[1]).uniform_(-1, 1, generator=gen))
    rel_t, tri = torch.as_tensor(rel), torch.as_tensor(triples, dtype=torch.long)
    opt_ = torch.optim.Adam([new], lr=config.lr)
    losses = []
    for _ in range(config.fold_in_epochs):
        losses.append(_fold_step(old, new, rel_t, tri, opt_, gen, norm, margin))
    with torch.no_grad():
        return torch.nn.functional.normalize(new, dim=-1).numpy().astype(np.float32), losses


def _fold_step(old, new, rel, tri, optimizer, gen, norm: int, margin: float) -> float:
    import torch

    ent = torch.cat([old, torch.nn.functional.normalize(new, dim=-1)])  # TransE keeps entities unit-norm
    neg = tri.clone()
    corrupt_head = torch.rand(len(tri), generator=gen) < 0.5
    random_ent = torch.randint(len(ent), (len(tri),), generator=gen)
    neg[corrupt_head, 0] = random_ent[corrupt_head]
    neg[~corrupt_head, 2] = random_ent[~corrupt_head]

    def score(t):
        return -torch.linalg.vector_norm(ent[t[:, 0]] + rel[t[:, 1]] - ent[t[:, 2]], ord=norm, dim=-1)

    loss = torch.relu(margin - score(tri) + score(neg)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _index(values: pa.Array, universe: list[str]) -> np.ndarray:
    """Positions of `values` in `universe`, -1 where absent."""
    idx = pc.index_in(values, value_set=pa.array(universe, type=pa.string()))
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def fold_in_plan(graph: Graph, old_ids: list[str], rel_ids: list[str]) -> tuple[list[str], np.ndarray, int]:
    """New entity ids reached by a triple with a known relation, and those triples coded against
    ``[old ids; new ids]`` and the model's relation rows; plus how many triples had an unknown relation."""
    old_code, rel_code = _index(graph.entity_ids, old_ids), _index(graph.relation_ids, rel_ids)
    h, r, t = graph.triples[:, 0], graph.triples[:, 1], graph.triples[:, 2]
    h_old, t_old, known = old_code[h] >= 0, old_code[t] >= 0, rel_code[r] >= 0
    touches_new = ~(h_old & t_old)
    sel = touches_new & known
    new_idx = np.unique(np.concatenate([h[sel & ~h_old], t[sel & ~t_old]]))  # graph order = id order
    code = old_code.copy()
    code[new_idx] = len(old_ids) + np.arange(len(new_idx))
    triples = np.stack([code[h[sel]], rel_code[r[sel]], code[t[sel]]], 1).astype(np.int64)
    return graph.entity_ids.take(pa.array(new_idx)).to_pylist(), triples, int((touches_new & ~known).sum())


def fold_in_body(home: Home, domain: str, config: TransEConfig, report: StageReport) -> StageResult:
    current = resolve_run(domain_dir(home, domain))
    old_ids, old_e = load_embeddings(current)
    rel_ids, rel = load_relations(current)
    trained = json.loads((current / "config.json").read_text())["config"]
    scoped = dataclasses.replace(config, scope=trained["scope"], hops=trained["hops"])
    graph, scope, rows_in, dups = prepare(home, domain, scoped)
    new_ids, triples, skipped = fold_in_plan(graph, old_ids, rel_ids)
    if not new_ids:
        raise ValueError(f"fold-in: no new entities with triples to known relations in domain {domain!r} (model {current.name})")
    vectors, losses = fold_in_vectors(old_e, len(new_ids), rel, triples, config, trained["scoring_norm"], trained["margin"])
    ids = pa.array(old_ids + new_ids, type=pa.string())
    metrics = {"fold_in_from": current.name, "new_entities": len(new_ids), "fold_in_triples": int(len(triples)),
               "skipped_unknown_relation": skipped, "fold_in_first_loss": losses[0], "fold_in_final_loss": losses[-1],
               "entities": len(ids), "scope": scope, "evaluation": "none (fold-in; the base run's test metrics are in base_metrics)",
               "base_metrics": json.loads((current / "metrics.json").read_text())}
    final = publish_fold_in(home, domain, report.run_id, ids, np.concatenate([old_e, vectors]), (rel_ids, rel),
                            {"config": trained, "fold_in": dataclasses.asdict(config)}, metrics)
    record_metrics(home, report.run_id, domain, final, graph_fingerprint(graph), metrics)
    extra = {"run_dir": str(final), **{k: v for k, v in metrics.items() if k != "base_metrics"}}
    return StageResult([DatasetRef.of(final / EMBEDDINGS, rows=len(ids))], rows_in=rows_in, rows_out=rows_in - dups,
                       rows_duplicate=dups, extra=extra)


def publish_fold_in(home: Home, domain: str, run_id: str, ids: pa.Array, matrix: np.ndarray, relations, cfg: dict,
                    metrics: dict) -> Path:
    files = {EMBEDDINGS: vectors_table(ids, matrix, "entity_id"),
             RELATIONS: vectors_table(pa.array(relations[0], type=pa.string()), relations[1], "relation_id")}
    docs = {"metrics.json": metrics,
            "config.json": {**cfg, "domain": domain, "run_id": run_id, "dim": int(matrix.shape[1]),
                            "model": "pykeen.TransE + fold-in", "scope": metrics["scope"]}}
    return publish_run(home, domain, run_id, files, docs)


# ----------------------------------------------------------------------------------------- entry points
def _inputs(home: Home, domain: str, config: TransEConfig) -> list[DatasetRef]:
    refs = [r for t in ("kg_entities", "kg_relations", "kg_triples") for r in lake.table_refs(home, t, domain)]
    if not lake.table_refs(home, "kg_triples", domain):
        raise FileNotFoundError(f"domain {domain!r} has no kg_triples: run `rapid ingest kg FILE --domain {domain}` first")
    if config.scope == "subgraph" or config.fold_in:
        refs += lake.table_refs(home, "links", domain)
    if config.fold_in:
        refs.append(DatasetRef.of(resolve_run(domain_dir(home, domain)) / EMBEDDINGS))
    return refs


def run(config: TransEConfig, home: Home, domain: str, force: bool = False) -> StageReport:
    """Train (or fold in) TransE for `domain` under the stage runner (cache, lock, lineage)."""
    check_name(domain, "domain")
    body = fold_in_body if config.fold_in else train_body
    return run_stage(home, STAGE, config, _inputs(home, domain, config), lambda rep: body(home, domain, config, rep),
                     domain=domain, partition="fold-in" if config.fold_in else "all", force=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, help="domain whose KG to embed (lake partitions domain=<d>)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size preset: tiny (CPU seconds), small, paper (dim 100)")
    parser.add_argument("--force", action="store_true", help="run even if the step cache says nothing changed")
    add_config_args(parser, TransEConfig)


def main(args: argparse.Namespace, home: Home) -> StageReport:
    config = config_from_args(preset(PRESETS, args.preset), args)
    return run(config, home, args.domain, force=args.force)
