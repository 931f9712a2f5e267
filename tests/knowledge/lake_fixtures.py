"""Tiny lake tables built in code for the knowledge-layer tests (kg_entities, kg_triples, pairs)."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from rapid_pipeline.core import lake

from .linking_gold import GOLD, KG, entity_id


def entities_table(domain: str) -> pa.Table:
    names = list(KG)
    return pa.table({
        "entity_id": [entity_id(n) for n in names], "name": names, "name_simplified": names,
        "aliases": [list(KG[n][0]) for n in names], "degree": [KG[n][1] for n in names], "domain": [domain] * len(names),
    })


def triples_table(domain: str, partition: str) -> pa.Table:
    facts = [("草莓", "颜色", "红色"), ("草莓", "形状", "心形"), ("香蕉", "颜色", "黄色"), ("苹果", "颜色", "红色"), ("葡萄", "颜色", "紫色")]
    n = len(facts)
    return pa.table({
        "domain": [domain] * n, "partition": [partition] * n, "head": [h for h, _, _ in facts],
        "relation": [r for _, r, _ in facts], "tail": [t for _, _, t in facts], "source_file": ["kg.tsv"] * n,
        "source_pos": list(range(1, n + 1)),
    })


def pairs_table(domain: str, partition: str, captions: list[str]) -> pa.Table:
    ids = [hashlib.sha256(c.encode()).hexdigest()[:16] for c in captions]
    n = len(captions)
    return pa.table({
        "domain": [domain] * n, "partition": [partition] * n, "pair_id": ids, "caption_raw": captions, "caption": captions,
        "caption_simplified": captions, "image_sha256": [i * 4 for i in ids], "width": [64] * n, "height": [64] * n,
        "split": ["train"] * n, "source_file": ["pairs.csv"] * n, "source_pos": list(range(n)),
    })


def build_lake(home, domain: str = "demo") -> dict[str, list[str]]:
    """Two pairs partitions (the gold captions split in halves) and one KG; returns captions per partition."""
    captions = [c for c, _ in GOLD]
    parts = {"2025-01-01": captions[: len(captions) // 2], "2025-01-02": captions[len(captions) // 2:]}
    lake.publish_table(home, "kg_entities", domain, "all", entities_table(domain), "test")
    lake.publish_table(home, "kg_triples", domain, "2025-01-01", triples_table(domain, "2025-01-01"), "test")
    for part, caps in parts.items():
        lake.publish_table(home, "pairs", domain, part, pairs_table(domain, part, caps), "test")
    return parts
