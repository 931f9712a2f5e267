"""rapid_prepare: lake -> entity links -> TransE embeddings -> webdataset shards, per domain.

Scheduled on the ingest assets (``lake/pairs`` OR ``lake/kg_triples`` changed). The domains come
from the ``domain`` param, else from the triggering asset events (``extra["domains"]``), else all
of ``RAPID_DOMAINS``. Linking is mapped over (domain, pairs partitions) and the rest over domains,
with ``.expand``, so they run in parallel on as many workers as the executor has::

    select_domains -> select_partitions -> link[(d, days)] -> linked_domains -> coverage[d]
                                                                            -> transe[d] -> shard[d]

* ``rapid link --domain D --partition P ...`` links one chunk of the domain's ``pairs`` partitions
  (``links`` has one partition per ``pairs`` partition). Every committed partition is mapped: one
  whose pairs and KG are unchanged is a step-cache hit (nothing relinked), and a KG change relinks them
  all. At most ``RAPID_LINK_MAX_TASKS`` (64) tasks per domain; past that, each task takes a
  contiguous run of days. A domain with no pairs yet gets no link task and is not prepared;
* ``rapid kg transe --domain D --preset P`` trains the entity embeddings and moves ``CURRENT``;
* ``rapid shard --domain D --preset P`` writes ``shards/<domain>/`` + ``manifest.json``.

Every task passes ``RAPID_PARENT_RUN_ID`` so the stage's lineage rows point at the Airflow task,
and hands the stage's exact inputs/outputs to the OpenLineage provider. Trigger by hand with
``{"preset": "small", "domain": "demo"}``.
"""

from __future__ import annotations

import os
import sys

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # Airflow does not always put dags/ on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402
from rapid_assets import INGEST_ASSETS, LAKE_LINKS, REPORTS, SHARDS, TRANSE_EMBEDDINGS  # noqa: E402


def _preset() -> str:
    return get_current_context()["params"]["preset"]


def _emit(asset, domain: str, report: dict, **more) -> None:
    get_current_context()["outlet_events"][asset].extra = {
        "domains": [domain], "run_id": report.get("run_id"), "status": report.get("status"),
        "outputs": c.summary(report)["outputs"], **more,
    }


@task
def select_domains() -> list[str]:
    """The domains to prepare: the ``domain`` param, else those named by the triggering ingest
    asset events, else all of ``RAPID_DOMAINS``."""
    ctx = get_current_context()
    return c.chosen_domains(ctx["params"], ctx.get("triggering_asset_events"))


@task
def select_partitions(domains: list[str]) -> list[dict]:
    """The link tasks: every committed ``pairs`` partition of each domain, in at most
    ``RAPID_LINK_MAX_TASKS`` contiguous chunks per domain."""
    jobs = c.link_jobs({d: c.pair_partitions(d) for d in domains})
    if not jobs:
        c.skip(f"no pairs partitions in {', '.join(domains)}: run rapid_ingest (or `rapid ingest pairs`) first")
    return jobs


@task(outlets=[LAKE_LINKS])
def link(job: dict) -> str:
    """Link entity names in the captions of some ``pairs`` partitions of a domain to its KG
    (``rapid link --partition ...``), writing those ``links`` partitions."""
    domain, parts = job["domain"], job["partitions"]
    report = c.call_stage(["link", "--domain", domain, *[a for p in parts for a in ("--partition", p)]])
    _emit(LAKE_LINKS, domain, report, partitions=parts)
    print(report.get("text") or c.summary(report))
    return domain


@task
def linked_domains(domains: list[str]) -> list[str]:
    """Each domain once, after all of its link tasks succeeded."""
    return sorted(set(domains))


@task(outlets=[REPORTS])
def coverage(domain: str) -> dict:
    """Entity coverage report (``rapid coverage``): how many captions / KG entities are linked."""
    report = c.call_stage(["coverage", "--domain", domain])
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool, type(None)))}


@task(outlets=[TRANSE_EMBEDDINGS])
def transe(domain: str) -> str:
    """Train TransE entity embeddings for the domain's KG (``rapid kg transe``, preset param)."""
    report = c.call_stage(["kg", "transe", "--domain", domain, "--preset", _preset()])
    _emit(TRANSE_EMBEDDINGS, domain, report)
    print(c.summary(report))
    return domain


@task(outlets=[SHARDS])
def shard(domain: str) -> dict:
    """Write webdataset shards per split with entity annotations (``rapid shard``); the asset
    event's extra carries the shard/manifest fingerprints the training run will record."""
    report = c.call_stage(["shard", "--domain", domain, "--preset", _preset()])
    _emit(SHARDS, domain, report)
    return c.summary(report)


@dag(
    dag_id="rapid_prepare",
    schedule=INGEST_ASSETS[0] | INGEST_ASSETS[1],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # link/TransE/shards rewrite per-domain outputs: one run at a time
    default_args=c.DEFAULT_ARGS,
    tags=["rapid", "prepare"],
    params={"preset": Param(os.environ.get("RAPID_PRESET", "tiny"), enum=c.PRESETS, description="TransE / shard size preset"),
            "domain": Param("", type="string", description="prepare only this domain (empty = from the asset events / all)")},
    doc_md=__doc__,
)
def rapid_prepare():
    jobs = c.documented(select_partitions)(c.documented(select_domains)())
    linked = c.documented(linked_domains)(c.documented(link).expand(job=jobs))
    c.documented(coverage).expand(domain=linked)
    embedded = c.documented(transe).expand(domain=linked)
    c.documented(shard).expand(domain=embedded)


rapid_prepare_dag = rapid_prepare()
