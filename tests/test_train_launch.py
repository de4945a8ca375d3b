"""The real `accelerate launch -m embtune.train` on CPU for 2 steps: the weights change and the model loads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embtune.data_prep.run import run as data_prep_run
from embtune.schema import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerate_launch_trains_two_steps(tmp_path, tiny_beir, tiny_model_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", f"train.base_model={base}",
                 "train.max_steps=2", "train.batch_size=4", "train.learning_rate=1e-3", "tracking.report_to=wandb",
                 "train.matryoshka_dims=[32,16]", "train.use_cpu=true", "train.save_steps=1"]
    data_prep_run(load_config(None, overrides))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "embtune.train", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    trained_dir = tmp_path / "run" / "train" / "model"
    trained = SentenceTransformer(str(trained_dir), device="cpu")
    original = SentenceTransformer(str(base), device="cpu")
    a = trained[0].auto_model.encoder.layer[0].attention.self.query.weight.detach().numpy()
    b = original[0].auto_model.encoder.layer[0].attention.self.query.weight.detach().numpy()
    assert np.abs(a - b).max() > 1e-6  # the optimizer stepped
    manifest = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert max(row["step"] for row in manifest["log_history"]) == 2  # exactly the 2 requested steps
    checkpoints = list((tmp_path / "run" / "train").glob("checkpoints-*/checkpoint-*"))
    assert checkpoints, "a checkpoint is written"
    assert list((tmp_path / "run" / "train" / "wandb").glob("offline-run-*")), "wandb ran offline"
