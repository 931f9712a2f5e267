"""`rapid kg transe`: learning beats random, PyKEEN parity on Nations, scope, sampled evaluation,
metrics in the warehouse, checkpoint/resume, fold-in, load_embeddings."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import random
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rapid_pipeline import transe
from rapid_pipeline.core import lake
from rapid_pipeline.core.faults import InjectedFault
from rapid_pipeline.core.schemas import table_schema
from rapid_pipeline.core.warehouse import query

DOMAIN = "toy"
FAST = transe.TransEConfig(scope="full", embedding_dim=32, epochs=20, lr=0.02, batch_size=128, eval_every=5,
                           checkpoint_every=5, patience=10)


# ----------------------------------------------------------------------------------------- fixtures in code
def _default(t: pa.DataType, n: int) -> pa.Array:
    if pa.types.is_list(t):
        return pa.array([[] for _ in range(n)], t)
    if pa.types.is_boolean(t):
        return pa.array([False] * n, t)
    if pa.types.is_string(t):
        return pa.array([""] * n, t)
    return pa.array([0] * n, t)


def lake_table(name: str, cols: dict) -> pa.Table:
    """A table with exactly the schema's columns; columns the test does not care about get defaults."""
    n = len(next(iter(cols.values())))
    return pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else _default(f.type, n)
                     for f in table_schema(name)})


def entity_id(domain: str, name: str) -> str:
    return "e" + hashlib.sha256(f"{domain}\0{name}".encode()).hexdigest()[:15]


def relation_id(domain: str, name: str) -> str:
    return "r" + hashlib.sha256(f"{domain}\0{name}".encode()).hexdigest()[:15]


def toy_triples(n_classes: int = 6, per_class: int = 10, seed: int = 0, prefix: str = "物") -> list[tuple[str, str, str]]:
    """Instances of classes; a class fixes colour and shape; 类别 is many-to-one, 相邻 links classmates."""
    rng = random.Random(seed)
    out = []
    for c in range(n_classes):
        for i in range(per_class):
            inst = f"{prefix}{c}_{i}"
            out += [(inst, "类别", f"类{c}"), (inst, "颜色", f"色{c % 3}"), (inst, "形状", f"形{c % 4}")]
            out += [(inst, "相邻", f"物{c}_{j}") for j in rng.sample(range(per_class), 2) if f"物{c}_{j}" != inst]
    return out


def publish_kg(home, domain: str, triples, partition: str = "manual") -> None:
    """kg_entities / kg_relations (partition all) and one kg_triples partition, as `rapid ingest kg` lays them out."""
    old = lake.read_table(home, "kg_triples", domain, ["head", "relation", "tail"]).to_pylist()
    every = [(r["head"], r["relation"], r["tail"]) for r in old] + list(triples)
    names = sorted({h for h, _, _ in every} | {t for _, _, t in every})
    rels = sorted({r for _, r, _ in every})
    lake.publish_table(home, "kg_entities", domain, "all", lake_table("kg_entities", {
        "domain": [domain] * len(names), "entity_id": [entity_id(domain, n) for n in names], "name": names,
        "name_simplified": names}), "test")
    lake.publish_table(home, "kg_relations", domain, "all", lake_table("kg_relations", {
        "domain": [domain] * len(rels), "relation_id": [relation_id(domain, r) for r in rels], "name": rels}), "test")
    n = len(triples)
    lake.publish_table(home, "kg_triples", domain, partition, lake_table("kg_triples", {
        "domain": [domain] * n, "partition": [partition] * n, "head": [h for h, _, _ in triples],
        "relation": [r for _, r, _ in triples], "tail": [t for _, _, t in triples],
        "source_file": ["kg.tsv"] * n, "source_pos": list(range(1, n + 1))}), "test")


def publish_links(home, domain: str, names: list[str], partition: str = "manual") -> None:
    n = len(names)
    lake.publish_table(home, "links", domain, partition, lake_table("links", {
        "domain": [domain] * n, "partition": [partition] * n, "pair_id": [f"p{i:015d}" for i in range(n)],
        "entity_id": [entity_id(domain, x) for x in names], "start": [0] * n, "end": [len(x) for x in names],
        "surface": names, "method": ["exact"] * n}), "test")


# ----------------------------------------------------------------------------------------- learning
def test_transe_beats_random_init_and_records_metrics(home):
    publish_kg(home, DOMAIN, toy_triples())
    report = transe.run(FAST, home, DOMAIN)
    assert report.status == "ok" and report.rows_in == report.rows_out + report.rows_duplicate
    # The same split and an untrained model with the same initialisation scheme, evaluated the same way.
    graph, *_ = transe.prepare(home, DOMAIN, FAST)
    splits = transe.split_triples(graph, FAST)
    random_model = transe.build_model(splits[0], FAST)
    random_mrr = transe.evaluate(random_model, splits[2].mapped_triples,
                                 [splits[0].mapped_triples, splits[1].mapped_triples], FAST, seed_offset=2)["mrr"]
    trained = report.extra["mrr"]
    assert trained > 2 * random_mrr and trained - random_mrr > 0.1, (trained, random_mrr)
    run_dir = Path(report.extra["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mrr"] == trained and metrics["evaluation"].startswith("full(")
    assert {"hits_at_1", "hits_at_3", "hits_at_10"} <= metrics.keys()
    rows = query(home, "SELECT name, value, extra_json FROM metrics WHERE run_id = ? AND stage = 'transe'", [report.run_id]).to_pylist()
    by_name = {r["name"]: r["value"] for r in rows}
    assert by_name["mrr"] == pytest.approx(trained) and "hits_at_10" in by_name
    assert json.loads(rows[0]["extra_json"])["evaluation"].startswith("full(")


def test_output_folder_contract_and_load_embeddings(home):
    publish_kg(home, DOMAIN, toy_triples())
    report = transe.run(dataclasses.replace(FAST, epochs=5), home, DOMAIN)
    domain_dir = home.models / "transe" / DOMAIN
    run_dir = Path(report.extra["run_dir"])
    assert (domain_dir / "CURRENT").read_text().strip() == run_dir.name
    assert {p.name for p in run_dir.iterdir()} == {"embeddings.parquet", "relations.parquet", "metrics.json", "config.json"}
    import pyarrow.parquet as pq

    schema = pq.read_schema(run_dir / "embeddings.parquet")
    assert schema.field("entity_id").type == pa.string() and schema.field("row").type == pa.int32()
    assert schema.field("vector").type == pa.list_(pa.float32())
    for path in (domain_dir, run_dir, run_dir / "embeddings.parquet"):
        ids, vectors = transe.load_embeddings(path)
        assert vectors.dtype == np.float32 and vectors.shape == (len(ids), 32)
    names = {r["name"] for r in lake.read_table(home, "kg_entities", DOMAIN).to_pylist()}
    assert set(ids) == {entity_id(DOMAIN, n) for n in names}
    assert transe.run(dataclasses.replace(FAST, epochs=5), home, DOMAIN).status == "cached"
    with pytest.raises(FileNotFoundError, match="rapid kg transe"):
        transe.load_embeddings(home.models / "transe" / "nothing")


def test_subgraph_scope_is_the_k_hop_neighbourhood_of_linked_entities(home):
    publish_kg(home, DOMAIN, toy_triples() + [("孤岛", "相邻", "远方")])
    publish_links(home, DOMAIN, ["物0_0"])
    graph = transe.load_graph(home, DOMAIN)
    one, _ = transe.scoped_graph(home, DOMAIN, graph, "subgraph", 1)
    ents = transe.compact(one).entity_ids.to_pylist()
    facts = toy_triples()
    hop1 = {"物0_0"} | {t for h, _, t in facts if h == "物0_0"} | {h for h, _, t in facts if t == "物0_0"}
    assert set(ents) == {entity_id(DOMAIN, n) for n in hop1}
    two, label = transe.scoped_graph(home, DOMAIN, graph, "subgraph", 2)
    assert label == "subgraph(1 linked, 2 hops)" and len(two.triples) > len(one.triples)
    assert entity_id(DOMAIN, "孤岛") not in set(transe.compact(two).entity_ids.to_pylist())
    with pytest.raises(ValueError, match="no links"):
        transe.scoped_graph(home, "other", graph, "subgraph", 2)


def test_early_stopping_on_validation_mrr_keeps_the_best_epoch(home):
    publish_kg(home, DOMAIN, toy_triples())
    # An improvement must be >10x the best MRR so far: the second validation cannot count, patience 1 stops.
    cfg = dataclasses.replace(FAST, epochs=20, eval_every=2, patience=1, relative_delta=10.0)
    report = transe.run(cfg, home, DOMAIN)
    assert report.extra["early_stopped"] and report.extra["epochs_trained"] == 4
    assert report.extra["best_epoch"] == 2 and [e for e, _ in report.extra["valid_history"]] == [2, 4]
    # The published vectors are epoch 2's: retraining for exactly 2 epochs gives the same ones.
    ids, stopped = transe.load_embeddings(Path(report.extra["run_dir"]))
    two = transe.run(dataclasses.replace(FAST, epochs=2, eval_every=2), home, DOMAIN)
    assert np.array_equal(transe.load_embeddings(Path(two.extra["run_dir"]))[1], stopped)


def test_large_kg_switches_to_sampled_evaluation_and_says_so(home):
    publish_kg(home, DOMAIN, toy_triples())
    cfg = dataclasses.replace(FAST, epochs=5, eval_full_max_entities=20, eval_sample_entities=10, eval_max_triples=15)
    report = transe.run(cfg, home, DOMAIN)
    assert report.extra["evaluation"].startswith("sampled(") and report.extra["triples"] == 15
    assert "sampled(" in json.loads((Path(report.extra["run_dir"]) / "metrics.json").read_text())["evaluation"]


def test_bad_input_gives_one_line_errors(home):
    with pytest.raises(FileNotFoundError, match="rapid ingest kg"):
        transe.run(FAST, home, DOMAIN)
    publish_kg(home, DOMAIN, toy_triples()[:6])
    with pytest.raises(ValueError, match="at least 10"):
        transe.run(FAST, home, DOMAIN)
    with pytest.raises(ValueError, match="three ratios"):
        transe.run(dataclasses.replace(FAST, split=(0.5, 0.5)), home, DOMAIN)


# ----------------------------------------------------------------------------------------- resume / fold-in
def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from rapid_pipeline.core.home import Home

    cfg = dataclasses.replace(FAST, epochs=10, checkpoint_every=4, eval_every=2)
    clean = Home.from_env(tmp_path / "clean")
    publish_kg(clean, DOMAIN, toy_triples())
    full = transe.run(cfg, clean, DOMAIN)

    home = Home.from_env(tmp_path / "crashy")
    publish_kg(home, DOMAIN, toy_triples())
    monkeypatch.setenv("RAPID_FAULT", "transe:after_checkpoint:raise")
    with pytest.raises(InjectedFault):
        transe.run(cfg, home, DOMAIN)  # dies right after the epoch-4 checkpoint
    monkeypatch.delenv("RAPID_FAULT")
    assert not (home.models / "transe" / DOMAIN / "CURRENT").exists()
    resumed = transe.run(cfg, home, DOMAIN)
    assert resumed.extra["resumed_from_epoch"] == 4 and full.extra["resumed_from_epoch"] == 0
    assert resumed.extra["epochs_trained"] == 10 and resumed.extra["valid_history"] == full.extra["valid_history"]
    ids_a, a = transe.load_embeddings(Path(full.extra["run_dir"]))
    ids_b, b = transe.load_embeddings(Path(resumed.extra["run_dir"]))
    assert ids_a == ids_b and np.array_equal(a, b)
    assert resumed.extra["mrr"] == full.extra["mrr"]
    assert not list((home.models / "transe" / DOMAIN).glob("_train-*"))  # checkpoints cleaned after publish


def test_fold_in_gives_new_entities_vectors_and_keeps_old_ones(home):
    publish_kg(home, DOMAIN, toy_triples())
    base = transe.run(dataclasses.replace(FAST, epochs=30), home, DOMAIN)
    old_ids, old = transe.load_embeddings(home.models / "transe" / DOMAIN)
    # Later arrivals: new instances of existing classes, linked only to entities the model knows.
    later = [(f"新{c}_{i}", rel, tail) for c in range(6) for i in range(2)
             for rel, tail in (("类别", f"类{c}"), ("颜色", f"色{c % 3}"), ("形状", f"形{c % 4}"), ("相邻", f"物{c}_{i}"))]
    publish_kg(home, DOMAIN, later, partition="2025-02-01")
    report = transe.run(dataclasses.replace(FAST, fold_in=True, fold_in_epochs=150), home, DOMAIN)
    assert report.extra["new_entities"] == 12 and report.extra["fold_in_final_loss"] < report.extra["fold_in_first_loss"]
    ids, vectors = transe.load_embeddings(home.models / "transe" / DOMAIN)
    assert ids[: len(old_ids)] == old_ids and np.array_equal(vectors[: len(old_ids)], old)  # old rows untouched
    assert Path(report.extra["run_dir"]).name != Path(base.extra["run_dir"]).name
    # The new vectors carry the KG's structure: h + r(类别) is nearest to the true class among all classes.
    rel_ids, rel = transe.load_relations(home.models / "transe" / DOMAIN)
    r = rel[rel_ids.index(relation_id(DOMAIN, "类别"))]
    row = {e: i for i, e in enumerate(ids)}
    classes = np.stack([vectors[row[entity_id(DOMAIN, f"类{c}")]] for c in range(6)])
    hits = sum(int(np.argmin(np.abs(vectors[row[entity_id(DOMAIN, f"新{c}_{i}")]] + r - classes).sum(1)) == c)
               for c in range(6) for i in range(2))
    assert hits >= 9, hits  # chance would be 2 of 12


# ----------------------------------------------------------------------------------------- PyKEEN parity
NATIONS = Path(__import__("pykeen").__file__).parent / "datasets" / "nations"


@pytest.mark.slow
def test_nations_through_our_ingest_matches_pykeen_pipeline(home, tmp_path):
    """Nations via `rapid ingest kg` + `rapid kg transe` vs `pykeen.pipeline(dataset="Nations")`.

    Same model, loss, margin, dim, epochs, lr, batch size, negative sampler, no early stopping; the split
    differs (Nations ships a fixed one, we draw a seeded 80/10/10), so we compare the mean filtered MRR of two
    seeds. Tolerance 0.04: measured seed-to-seed sd of either side is 0.010-0.015 on this CPU, so the sd of a
    difference of two 2-seed means is ~0.012 and 0.04 is ~3 sd.
    """
    from pykeen.pipeline import pipeline

    from rapid_pipeline.cli import invoke

    tsv = tmp_path / "nations.tsv"
    tsv.write_text("".join((NATIONS / f).read_text() for f in ("train.txt", "valid.txt", "test.txt")), encoding="utf-8")
    invoke(["ingest", "kg", str(tsv), "--domain", "nations"], home=home.root)
    cfg = transe.TransEConfig(scope="full", embedding_dim=32, epochs=100, lr=0.01, batch_size=128, num_negs=1,
                              margin=1.0, scoring_norm=1, eval_every=0, checkpoint_every=0)
    ours = [transe.run(dataclasses.replace(cfg, seed=s), home, "nations").extra for s in (0, 1)]
    assert ours[0]["entities"] == 14 and ours[0]["relations"] == 55
    theirs = []
    gc.freeze()  # PyKEEN collects garbage every epoch; freezing the imported heap keeps that cheap
    try:
        for s in (0, 1):
            result = pipeline(dataset="Nations", model="TransE", random_seed=s,
                              model_kwargs=dict(embedding_dim=32, scoring_fct_norm=1), loss="marginranking",
                              loss_kwargs=dict(margin=1.0), optimizer="Adam", optimizer_kwargs=dict(lr=0.01),
                              negative_sampler="basic", negative_sampler_kwargs=dict(num_negs_per_pos=1),
                              training_kwargs=dict(num_epochs=100, batch_size=128, use_tqdm=False),
                              evaluation_kwargs=dict(use_tqdm=False))
            theirs.append(result.metric_results.get_metric("both.realistic.inverse_harmonic_mean_rank"))
    finally:
        gc.unfreeze()
    ours_mrr = statistics.mean(o["mrr"] for o in ours)
    print(f"Nations filtered MRR: ours {[round(o['mrr'], 3) for o in ours]}, pykeen pipeline {[round(t, 3) for t in theirs]}")
    assert abs(ours_mrr - statistics.mean(theirs)) < 0.04, (ours, theirs)
    assert ours_mrr > 0.3  # and both are far above a random ranking of 14 nations (~0.12)
