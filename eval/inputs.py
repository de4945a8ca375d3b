"""What the eval stage reads: upstream stages' outputs, the judged split's files, the models to compare and their
encoders (``eval.backend``, or a remote ``openai:`` endpoint). Shared by the stage (``run.py``), its deploy choice
(``deploy.py``) and ``choose.py``."""

from __future__ import annotations

import json
from pathlib import Path

from embtune.eval.endpoint import EndpointEncoder, is_endpoint_spec
from embtune.models import resolve_model
from embtune.retrieval.encoder import load_encoder as load_core_encoder


def upstream(cfg, name: str) -> dict[str, str]:
    manifest = Path(cfg.run_dir) / name / "manifest.json"
    return json.loads(manifest.read_text())["outputs"] if manifest.is_file() else {}


def eval_inputs(cfg) -> dict[str, str]:
    """The BEIR folder files and qrels this evaluation reads."""
    data_out = upstream(cfg, "data_prep")
    split = cfg.eval.split
    folder = data_out.get("eval_dataset") or (cfg.data.path if cfg.data.format == "beir" else None)
    if not folder:
        raise FileNotFoundError(f"no eval dataset: run data_prep first (no {cfg.run_dir}/data_prep/manifest.json)")
    folder = Path(folder)
    if split == "dev":
        if "dev_qrels" not in data_out:
            raise FileNotFoundError("eval.split=dev needs data.dev_fraction > 0 and a data_prep run")
        qrels = Path(data_out["dev_qrels"])
    else:
        qrels = folder / "qrels" / f"{split}.tsv"
    return {"corpus": str(folder / "corpus.jsonl"), "queries": str(folder / "queries.jsonl"), "qrels": str(qrels)}


def models_to_evaluate(cfg) -> dict[str, str]:
    models: dict[str, str] = {}
    if cfg.eval.compare_base:
        models["base"] = resolve_model(cfg.train.base_model)
    trained = upstream(cfg, "train").get("model")
    train_manifest = Path(cfg.run_dir) / "train" / "manifest.json"
    if trained and json.loads(train_manifest.read_text()).get("trained", True):  # label-free may train no student
        models["finetuned"] = trained
    for name, path in cfg.eval.extra_models.items():
        models[name] = path if is_endpoint_spec(path) else resolve_model(path)
    return models


def load_encoder(model_path: str, cfg, calibration_texts: list[str] | None = None):
    """The core encoder on ``eval.backend`` (``embtune.retrieval.encoder.BACKENDS``; ``openvino-int8`` calibrates
    on ``calibration_texts``, the corpus), or an :class:`EndpointEncoder` for ``openai:<model>[@<base_url>]``
    specs."""
    if is_endpoint_spec(model_path):
        return EndpointEncoder.from_spec(model_path, api_key_env=cfg.eval.endpoint_api_key_env,
                                         batch_size=cfg.eval.endpoint_batch_size, retry=cfg.llm)
    model, _ = load_core_encoder(model_path, cfg.eval.max_seq_length, backend=cfg.eval.backend,
                                 threads=cfg.eval.threads, calibration_texts=calibration_texts)
    return model

