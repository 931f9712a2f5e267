"""Every Airflow Asset of rapid_pipeline, defined once, so producer and consumer URIs cannot drift.

Asset URIs are ``file://`` URIs under ``$RAPID_HOME`` (only ``file://`` assets become OpenLineage
datasets in the Airflow provider). Lake / shard / embedding assets name a whole table or folder;
the domain(s) a run touched travel in the asset event's ``extra`` (``{"domains": [...]}``). Models
are one asset per domain (``file://$RAPID_HOME/models/pipeline/<domain>``) because a model's
consumers (evaluation, serving) care about one domain.

Data arrival: each configured domain has a landing asset whose ``AssetWatcher`` runs a
``FileDeleteTrigger`` on ``landing/<domain>/_READY``. A producer copies its files into
``landing/<domain>/<YYYY-MM-DD>/`` and then touches ``_READY``; the triggerer sees the flag
(poll 5 s), deletes it and records an asset event, which starts ``rapid_ingest``. Needs the
triggerer (``airflow triggerer``, part of ``airflow standalone``).

This module reads only environment variables (``RAPID_HOME``, ``RAPID_DOMAINS``); it never imports
``rapid_pipeline``, so DAG parsing stays fast and free of torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from airflow.providers.standard.triggers.file import FileDeleteTrigger
from airflow.sdk import Asset, AssetAlias, AssetWatcher

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")  # same rule as rapid_pipeline.core.home.check_name
READY_FLAG = "_READY"
LANDING_PREFIX = "rapid_landing_"  # landing asset name = prefix + domain


def rapid_home() -> Path:
    """$RAPID_HOME as an absolute path (default ./rapid_home, resolved at parse time)."""
    return Path(os.environ.get("RAPID_HOME", "rapid_home")).expanduser().resolve()


def domains() -> list[str]:
    """Configured domains: comma-separated ``RAPID_DOMAINS`` (default ``demo``), validated."""
    names = [d.strip() for d in os.environ.get("RAPID_DOMAINS", "demo").split(",") if d.strip()]
    bad = [d for d in names if not _NAME.match(d)]
    if bad:
        raise ValueError(f"RAPID_DOMAINS has invalid domain names {bad}: use [A-Za-z0-9_-], starting with a letter or digit")
    return names or ["demo"]


def _uri(*parts: str) -> str:
    return "file://" + str(rapid_home().joinpath(*parts))


def _asset(name: str, *parts: str, **kwargs) -> Asset:
    return Asset(name=name, uri=_uri(*parts), group="rapid", **kwargs)


# ---- ingest outputs (partitioned by date inside the table folder) ----
LAKE_PAIRS = _asset("rapid_lake_pairs", "lake", "pairs")
LAKE_KG_TRIPLES = _asset("rapid_lake_kg_triples", "lake", "kg_triples")
LAKE_KG_ENTITIES = _asset("rapid_lake_kg_entities", "lake", "kg_entities")
LAKE_QUARANTINE = _asset("rapid_lake_quarantine", "lake", "quarantine")
INGEST_ASSETS = (LAKE_PAIRS, LAKE_KG_TRIPLES)  # what rapid_prepare listens to

# ---- prepare outputs ----
LAKE_LINKS = _asset("rapid_lake_links", "lake", "links")
TRANSE_EMBEDDINGS = _asset("rapid_transe_embeddings", "models", "transe")
SHARDS = _asset("rapid_shards", "shards")

# ---- train outputs: one asset per domain, emitted through an alias by the mapped tasks ----
MODELS_ALIAS = AssetAlias(name="rapid_pipeline_models", group="rapid")
CLIP_MODELS = _asset("rapid_models_ckclip", "models", "ckclip")
SR_MODELS = _asset("rapid_models_esrgan", "models", "esrgan")
VAE_MODELS = _asset("rapid_models_vae", "models", "vae")
COMPILED_MODELS = _asset("rapid_models_compiled", "models", "compiled")
REPORTS = _asset("rapid_reports", "reports")


def model_asset(domain: str) -> Asset:
    """The assembled pipeline of one domain: ``file://$RAPID_HOME/models/pipeline/<domain>``."""
    return _asset(f"rapid_model_pipeline_{domain}", "models", "pipeline", domain)


def landing_asset(domain: str) -> Asset:
    """``landing/<domain>``, watched for the ``_READY`` flag file (see module doc)."""
    flag = str(rapid_home() / "landing" / domain / READY_FLAG)
    watcher = AssetWatcher(name=f"rapid_landing_{domain}_ready", trigger=FileDeleteTrigger(filepath=flag))
    return _asset(LANDING_PREFIX + domain, "landing", domain, watchers=[watcher])


def model_assets() -> list[Asset]:
    return [model_asset(d) for d in domains()]


def landing_assets() -> list[Asset]:
    return [landing_asset(d) for d in domains()]
