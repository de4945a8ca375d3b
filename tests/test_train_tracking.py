"""wandb offline lineage read back from the run files: config, data manifest, curves, model artifact, eval tables;
and tensorboard through the same tracking.report_to."""

import json
import shutil
from pathlib import Path

import pytest

from embtune.data_prep.run import run as data_prep_run
from embtune.eval.run import run as eval_run
from embtune.schema import load_config
from embtune.tracking import offline_records
from embtune.train.recipe import run as train_run


def read_run(stage_dir):
    files = list(Path(stage_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = {"config": {}, "history": [], "artifacts": [], "files": []}
    for record in offline_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "artifact":
            out["artifacts"].append(record.artifact)
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
    return out


@pytest.mark.slow
def test_offline_wandb_lineage_and_tensorboard(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", f"train.base_model={model}",
                             "train.max_steps=3", "train.batch_size=8", "train.use_cpu=true", "train.logging_steps=1",
                             "tracking.report_to=wandb,tensorboard", "train.matryoshka_dims=[32,16]",
                             "eval.dims=[32,16]"])
    data_prep_run(cfg)
    train_run(cfg)
    eval_run(cfg)

    train = read_run(tmp_path / "run" / "train")
    assert train["run"].run_group == "run" and train["run"].job_type == "train"
    assert train["config"]["train"]["matryoshka_dims"] == [32, 16]  # the whole resolved config
    assert train["config"]["data"]["path"] == str(tiny_beir)
    data_prep = json.loads((tmp_path / "run" / "data_prep" / "manifest.json").read_text())
    assert train["config"]["data_prep"]["input_hashes"] == data_prep["input_hashes"]  # corpus/queries/qrels by hash
    assert train["config"]["data_prep"]["output_hashes"] == data_prep["output_hashes"]  # the mined table
    losses = [row["train/loss"] for row in train["history"] if "train/loss" in row]
    assert len(losses) == 3  # the trainer's curves, logged into this run
    kinds = {a.type: a for a in train["artifacts"]}
    assert kinds["dataset"].name == f"data-prep-{data_prep['fingerprint']}"
    assert "data_prep_manifest.json" in {e.path for e in kinds["dataset"].manifest.contents}
    assert "model.safetensors" in {e.path for e in kinds["model"].manifest.contents}
    manifest = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["wandb"]["id"] == train["run"].run_id and manifest["wandb"]["model_artifact"] == "model-run:latest"

    evaluation = read_run(tmp_path / "run" / "eval")
    assert evaluation["run"].run_group == "run" and evaluation["run"].job_type == "eval"
    assert evaluation["config"]["train_wandb"]["id"] == train["run"].run_id  # which training run it scored
    tables = {row_key for row in evaluation["history"] for row_key in row if row_key.startswith("eval/")}
    assert {"eval/metrics/_type", "eval/per_query/_type"} <= tables
    assert sum(a.type == "run_table" for a in evaluation["artifacts"]) == 2
    table_file = next((tmp_path / "run" / "eval").glob("wandb/offline-run-*/files/media/table/eval/metrics_*.json"))
    table = json.loads(table_file.read_text())
    assert {row[0] for row in table["data"]} == {"base", "finetuned", "bm25"}
    assert "ndcg@10" in table["columns"]

    events = list((tmp_path / "run" / "train").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
