"""The demo recipe trains on labelled pairs and synthetic questions, and a pipeline run ends with what to open next."""

from __future__ import annotations

import json
from pathlib import Path

from embtune.pipeline import STAGE_ORDER, next_steps
from embtune.schema import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_on_labelled_pairs_and_synthetic_questions_and_evaluates_on_held_out_test():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.data.format == "pydoc" and cfg.data.queries == "labelled+synthetic"
    assert cfg.data.train_split == "train" and cfg.eval.split == "test"
    assert cfg.eval.hybrid  # demo.json records a hybrid row


def test_a_run_ends_with_the_report_path_and_the_serve_command(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path}"])
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "manifest.json").write_text(
        json.dumps({"outputs": {"bundle": str(tmp_path / "run" / "bundle")}}))
    text = next_steps(cfg, STAGE_ORDER)
    assert f"report: {tmp_path / 'run' / 'report' / 'index.html'}" in text
    assert f"python -m serve up --bundle {tmp_path / 'run' / 'bundle'}" in text
    # Without the export stage there is nothing to serve yet.
    assert "serve" not in next_steps(cfg, ("data_prep", "train", "eval"))
