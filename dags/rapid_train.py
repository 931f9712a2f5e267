"""rapid_train: shards -> CKCLIP + VAE -> latent diffusion, ESRGAN in parallel -> assembled pipeline.

Scheduled on the shard asset (``$RAPID_HOME/shards``). One mapped task group per domain (the
``domain`` param, else the domains named by the triggering shard events, else ``RAPID_DOMAINS``)::

    train_clip --\\
    train_vae ----+-> train_diffusion --\\
    train_sr ---------------------------+-> assemble  (emits models/pipeline/<domain>)

* GPU stages (``train_clip``, ``train_vae``, ``train_diffusion``, ``train_sr``) run in pool ``gpu``
  (one slot each: ``airflow pools set gpu <number of GPUs> "..."``) and queue ``gpu`` (a Celery worker
  started with ``--queues gpu`` on the GPU machine), as a child process (``accelerate launch``
  when the worker sees several GPUs). A retry resumes from the stage's own checkpoints.
* ``train_diffusion`` is given the exact CKCLIP and VAE folders this run trained (``--clip``,
  ``--vae``): without a trained VAE its latents would be those of a random autoencoder.
* ``assemble`` emits the per-domain model asset ``file://$RAPID_HOME/models/pipeline/<domain>``
  through the ``rapid_pipeline_models`` alias; its ``extra`` records the assembled run dir and the
  fingerprints of the shards, embeddings and configs the parts were trained on. ``rapid_evaluate``
  is scheduled on that asset.
* Multi-hour runs: keep ``retries`` > 0; each stage is resumable (``--resume auto``), so a task
  killed by a lost heartbeat picks up from the newest complete checkpoint.

Trigger by hand with ``{"preset": "small"}`` (``tiny`` = CPU seconds, ``paper`` = Table 6).
"""

from __future__ import annotations

import os
import sys

import pendulum
from airflow.sdk import Param, dag, get_current_context, task, task_group

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # Airflow does not always put dags/ on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402
from rapid_assets import CLIP_MODELS, MODELS_ALIAS, SHARDS, SR_MODELS, VAE_MODELS, model_asset  # noqa: E402


def _preset() -> str:
    return get_current_context()["params"]["preset"]


def trained(report: dict, part: str, kind: str) -> dict:
    """What the next task needs from a stage report: the run dir (under ``models/<kind>/``) and
    what it was trained on (input URIs + fingerprints, config)."""
    dirs = c.output_dirs(report, f"models/{kind}")
    run_dir = dirs[0] if dirs else c.latest_run_dir(kind, report.get("domain") or "")
    return {"part": part, "run_dir": run_dir, "run_id": report.get("run_id"), "status": report.get("status"),
            "config": report.get("config") or {},
            "inputs": [{"uri": i.get("uri"), "fingerprint": i.get("fingerprint")} for i in report.get("inputs") or []]}


def _gpu_stage(argv: list[str], part: str, kind: str) -> dict:
    report = c.call_stage(argv, gpu=True)
    print(c.summary(report))
    return trained(report, part, kind)


@task
def select_domains() -> list[str]:
    """The domains to train (``domain`` param, else the triggering shard events, else all)."""
    ctx = get_current_context()
    return c.chosen_domains(ctx["params"], ctx.get("triggering_asset_events"))


@task(outlets=[CLIP_MODELS], **c.GPU_TASK)
def train_clip(domain: str) -> dict:
    """Train the knowledge-enhanced Chinese CLIP (``rapid train clip``) on the domain's shards
    and TransE vectors. GPU, child process."""
    return _gpu_stage(["train", "clip", "--domain", domain, "--preset", _preset()], "ckclip", "ckclip")


@task(outlets=[VAE_MODELS], **c.GPU_TASK)
def train_vae(domain: str) -> dict:
    """Train the KL autoencoder (``rapid train vae``) on the domain's shard images, so the diffusion
    model gets a meaningful latent space. GPU, child process; independent of the text side."""
    return _gpu_stage(["train", "vae", "--domain", domain, "--preset", _preset()], "vae", "vae")


@task(**c.GPU_TASK)
def train_diffusion(domain: str, clip: dict | None, vae: dict | None) -> dict:
    """Fine-tune the latent-diffusion U-Net with the CKCLIP text tower from ``train_clip`` and the
    frozen VAE from ``train_vae`` (``rapid train diffusion --clip DIR --vae DIR``). GPU, child process."""
    clip_dir = (clip or {}).get("run_dir") or c.latest_run_dir("ckclip", domain)
    vae_dir = (vae or {}).get("run_dir")  # none: the stage's own --vae auto (newest *published* VAE)
    argv = ["train", "diffusion", "--domain", domain, "--preset", _preset()] + (["--clip", clip_dir] if clip_dir else [])
    argv += ["--vae", vae_dir] if vae_dir else []
    return _gpu_stage(argv, "diffusion", "pipeline")  # it writes a (pre-SR) pipeline folder


@task(outlets=[SR_MODELS], **c.GPU_TASK)
def train_sr(domain: str) -> dict:
    """Fine-tune ESRGAN x4 on the domain's images (``rapid train sr``). GPU, child process;
    independent of the text side, so it runs in parallel with CKCLIP + diffusion."""
    return _gpu_stage(["train", "sr", "--domain", domain, "--preset", _preset()], "esrgan", "esrgan")


@task(outlets=[MODELS_ALIAS])
def assemble(domain: str, clip: dict | None, vae: dict | None, diffusion: dict | None, sr: dict | None) -> dict:
    """Assemble CKCLIP + U-Net + VAE + ESRGAN + knowledge table into one diffusers folder
    (``rapid pipeline assemble``) and emit ``models/pipeline/<domain>`` with the run dir and the
    fingerprints of everything it was trained on in the event's ``extra``."""
    report = c.call_stage(["pipeline", "assemble", "--domain", domain, *_assemble_args(diffusion, sr)])
    built = trained(report, "assembled", "pipeline")
    extra = model_extra(domain, built, [p for p in (clip, vae, diffusion, sr) if p])
    get_current_context()["outlet_events"][MODELS_ALIAS].add(model_asset(domain), extra=extra)
    return extra


def _assemble_args(diffusion: dict | None, sr: dict | None) -> list[str]:
    """Name the exact folders this run trained (without them assemble takes the newest ones)."""
    args = []
    for flag, part in (("--pipeline", diffusion), ("--sr", sr)):
        if part and part.get("run_dir"):
            args += [flag, part["run_dir"]]
    return args


def model_extra(domain: str, built: dict, parts: list[dict]) -> dict:
    """Asset-event extra of a model: run dir + the data/config fingerprints it came from."""
    inputs = {i["uri"]: i["fingerprint"] for p in parts + [built] for i in p.get("inputs", []) if i.get("uri")}
    return {"domains": [domain], "domain": domain, "run_dir": built["run_dir"], "run_id": built["run_id"],
            "parts": {p["part"]: {"run_dir": p.get("run_dir"), "run_id": p.get("run_id"),
                                  "config": p.get("config")} for p in parts},
            "trained_on": inputs}


@task_group
def train_domain(domain: str):
    """Everything one domain needs, mapped per domain (indices stay aligned inside the group)."""
    clip = c.documented(train_clip)(domain)
    vae = c.documented(train_vae)(domain)
    diffusion = c.documented(train_diffusion)(domain, clip, vae)
    sr = c.documented(train_sr)(domain)
    c.documented(assemble)(domain, clip, vae, diffusion, sr)


@dag(
    dag_id="rapid_train",
    schedule=SHARDS,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # GPU work: one training run at a time per deployment
    default_args=c.DEFAULT_ARGS,
    tags=["rapid", "train", "gpu"],
    params={"preset": Param(os.environ.get("RAPID_PRESET", "tiny"), enum=c.PRESETS, description="model size preset: tiny (CPU seconds), small, paper (Table 6)"),
            "domain": Param("", type="string", description="train only this domain (empty = from the asset events / all)")},
    doc_md=__doc__,
)
def rapid_train():
    train_domain.expand(domain=c.documented(select_domains)())


rapid_train_dag = rapid_train()
