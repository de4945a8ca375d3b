"""Experiment tracking: wandb (online with a key, offline without one) or any tracker the trainer's ``report_to``
knows (tensorboard, ...), plus the lineage the trainer does not record.

Configured by the recipe's own ``tracking`` section (:class:`TrackingConfig`), read by train, eval and export; no
stage's section switches another stage's logging, and no tracking key is part of a stage's fingerprint (logging
never changes what a stage writes, so changing it reruns nothing).

One pipeline run is one wandb *group* (the run directory's name) with a run per stage:

- ``train`` (job_type train): the full resolved config, the data-prep manifest (which corpus, queries and mined
  table, by content hash) as config and as a ``dataset`` artifact, the training curves (the trainer's own
  WandbCallback, which reuses this run), and the trained model folder as a ``model`` artifact.
- ``eval`` (job_type eval): the metric tables (per model and dim, and per query) as ``wandb.Table``s, and the
  train run's id and model artifact it scored.
- ``export``: the bundle as a ``model`` artifact.

Why separate runs and not one: eval and export are separate processes that may run days later or elsewhere;
appending to a finished run by id works online but not offline (an offline resume writes a second run folder),
while runs of one group are synced and shown together either way. Online, the eval and export runs also
``use_artifact`` the model, so wandb draws the lineage graph; offline (where ``use_artifact`` is refused) the
artifact's name and digest are in their config.

Offline runs land in ``<run_dir>/<stage>/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads them later.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    """Experiment tracking for train, eval and export (wandb runs of one group, or the trainer's other trackers)."""

    # "wandb" logs online with a key, offline without one (said once, in a log line); "none" turns logging off;
    # "tensorboard", "wandb,tensorboard" or any other tracker transformers' ``report_to`` knows also work. Only
    # wandb gets eval and export runs (tables, the bundle artifact); other trackers get the training curves.
    report_to: str = "wandb"
    wandb_project: str = "embtune"
    # Log the trained model folder as a wandb artifact (lineage: data-prep manifest -> run -> model).
    wandb_log_model: bool = True

    def validate(self) -> None:
        targets = [t.strip() for t in self.report_to.split(",") if t.strip()]
        if not targets:
            raise ValueError("tracking.report_to must name a tracker or be 'none'")
        if "none" in targets and len(targets) > 1:
            raise ValueError(f"tracking.report_to: 'none' cannot be combined with other trackers ({self.report_to!r})")


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def report_targets(tracking: TrackingConfig) -> list[str]:
    targets = [t.strip() for t in tracking.report_to.split(",") if t.strip()]
    return [] if targets == ["none"] else targets


def configure_reporting(tracking: TrackingConfig, stage_dir: Path) -> list[str] | str:
    """Return the trainer's ``report_to`` value, setting wandb's environment so it never prompts or blocks."""
    targets = report_targets(tracking)
    if not targets:
        return "none"
    if "wandb" in targets:
        os.environ.setdefault("WANDB_PROJECT", tracking.wandb_project)
        os.environ["WANDB_DIR"] = str(stage_dir)  # each stage's runs beside its other outputs
        Path(stage_dir).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb_has_key():
            os.environ["WANDB_MODE"] = "offline"
            logger.warning("wandb: no API key found, logging offline to %s/wandb (upload later with `wandb sync`)",
                           stage_dir)
    return targets


def start_run(cfg, stage_dir: Path, job_type: str, run_id: str | None = None, config: dict | None = None):
    """A wandb run of this pipeline's group, or None when wandb is not among ``tracking.report_to``."""
    if "wandb" not in report_targets(cfg.tracking):
        return None
    configure_reporting(cfg.tracking, stage_dir)
    import wandb

    group = Path(cfg.run_dir).resolve().name
    return wandb.init(project=cfg.tracking.wandb_project, group=group, job_type=job_type, name=f"{group}-{job_type}",
                      id=run_id, resume="allow" if run_id else None, dir=str(stage_dir), config=config or {},
                      reinit="finish_previous")


def is_offline(run) -> bool:
    if hasattr(run.settings, "_offline"):
        return bool(run.settings._offline)
    return os.environ.get("WANDB_MODE") == "offline"


def log_data_lineage(run, manifest_path: Path) -> dict[str, Any]:
    """Put the data-prep manifest's inputs, outputs and hashes in the run's config and log it as an artifact."""
    import wandb

    manifest = json.loads(Path(manifest_path).read_text())
    lineage = {key: manifest.get(key) for key in ("fingerprint", "inputs", "input_hashes", "outputs",
                                                   "output_hashes", "config")}
    run.config.update({"data_prep": lineage}, allow_val_change=True)
    artifact = wandb.Artifact(f"data-prep-{manifest['fingerprint']}", type="dataset", metadata=lineage)
    artifact.add_file(str(manifest_path), name="data_prep_manifest.json")
    if is_offline(run):
        run.log_artifact(artifact)  # offline wandb refuses use_artifact; the run still carries it
    else:
        run.use_artifact(artifact)  # an input of this run in the lineage graph
    return lineage


ARTIFACT_NAME_MAX = 128  # wandb.Artifact refuses longer names


def artifact_name(name: str) -> str:
    """``name`` as wandb accepts it: ``/`` and ``:`` (a path, a version) become ``-``, and a name over 128
    characters (a run folder named after its overrides) keeps its first 119 and a hash of the whole, so two long
    names that share a beginning stay two artifacts."""
    import hashlib

    name = name.replace("/", "-").replace(":", "-")
    if len(name) <= ARTIFACT_NAME_MAX:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:ARTIFACT_NAME_MAX - len(digest) - 1]}-{digest}"


def log_model_artifact(run, model_dir: Path, name: str, metadata: dict[str, Any]) -> str:
    """Log a model folder as a ``model`` artifact; returns its name (``name:latest``, ``name`` made valid by
    :func:`artifact_name`)."""
    import wandb

    name = artifact_name(name)
    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    artifact.add_dir(str(model_dir))
    run.log_artifact(artifact, aliases=["latest"])
    return f"{name}:latest"


def log_eval_results(cfg, results: dict[str, Any], per_query: dict[str, Any], split: str) -> None:
    """The eval stage's hook: metric tables of every model (and dim) and per-query nDCG@10, as wandb Tables."""
    if "wandb" not in report_targets(cfg.tracking):
        return
    stage_dir = Path(cfg.run_dir) / "eval"
    train = _train_manifest(cfg)
    run = start_run(cfg, stage_dir, "eval", config={"eval": _plain(cfg.eval), "split": split,
                                                   "train_wandb": train.get("wandb", {})})
    if run is None:
        return
    import wandb

    _use_model(run, train.get("wandb", {}).get("model_artifact"))
    metrics = sorted({m for r in results.values() for m in r if m not in ("dims", "dim")})
    table = wandb.Table(columns=["model", "dim", *metrics])
    for name, result in results.items():
        dims = result.get("dims") or {str(result.get("dim", "")): result}
        for dim, values in sorted(dims.items(), key=lambda kv: -int(kv[0] or 0)):
            table.add_data(name, int(dim) if dim else None, *[values.get(m) for m in metrics])
    rows = [[name, query, scores.get("ndcg@10")] for name, queries in per_query.items()
            for query, scores in sorted(queries.items())]
    run.log({"eval/metrics": table,
             "eval/per_query": wandb.Table(columns=["model", "query_id", "ndcg@10"], data=rows)})
    for name, result in results.items():
        run.summary.update({f"{name}/{m}": result[m] for m in metrics if m in result})
    run.finish()


def log_export_artifact(cfg, bundle_dir: Path) -> None:
    """The export stage's hook: the bundle as a ``model`` artifact of an ``export`` run in the pipeline's group."""
    if "wandb" not in report_targets(cfg.tracking):
        return
    train = _train_manifest(cfg)
    run = start_run(cfg, Path(cfg.run_dir) / "export", "export",
                    config={"export": _plain(cfg.export), "train_wandb": train.get("wandb", {})})
    if run is None:
        return
    _use_model(run, train.get("wandb", {}).get("model_artifact"))
    log_model_artifact(run, bundle_dir, f"bundle-{Path(cfg.run_dir).resolve().name}", {"path": str(bundle_dir)})
    run.finish()


def _use_model(run, artifact_name: str | None) -> None:
    if artifact_name and not is_offline(run):
        try:
            run.use_artifact(artifact_name)
        except Exception as err:  # the model may have been logged to another project or never synced
            logger.warning("wandb: could not link model artifact %s: %s", artifact_name, err)


def _train_manifest(cfg) -> dict[str, Any]:
    path = Path(cfg.run_dir) / "train" / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _plain(section) -> Any:
    from embtune.config import to_dict

    return to_dict(section)


# wandb >= 0.19 reads its .wandb files in its Go core only; this reader of their framing (LevelDB's log format:
# 32 KiB blocks, 7-byte record headers, records split FIRST/MIDDLE/LAST at block ends) lets a test or a person
# inspect an offline run without uploading it. Records are wandb_internal_pb2.Record protobufs.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_records(wandb_file: str | Path) -> Iterator[Any]:
    """Yield each ``Record`` (``record.WhichOneof("record_type")``: run, history, artifact, ...) of a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    data = Path(wandb_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{wandb_file} is not a wandb run file (header {data[:4]!r})")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # block trailer padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        position += _HEADER
        if kind == 0 and length == 0:  # zero-filled rest of a block
            position += left - _HEADER
            continue
        chunk = data[position:position + length]
        position += length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{wandb_file}: unknown record type {kind} at byte {position - length - _HEADER}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record
