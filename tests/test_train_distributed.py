"""`accelerate launch` with 2 CPU processes (gloo): the loss sees the global batch, the main process alone writes
checkpoints and runs the dev evaluator, and training matches one process on the same global batch."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from embtune.data_prep.run import run as data_prep_run
from embtune.schema import load_config
from embtune.train.recipe import run as train_run

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir):
    manifest = json.loads((Path(run_dir) / "train" / "manifest.json").read_text())
    return manifest, [row["loss"] for row in manifest["log_history"] if "loss" in row]


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_global_batch(tmp_path, tiny_beir, tiny_model_dir):
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # ranks draw different dropout masks
    (model / "config.json").write_text(json.dumps(config))
    # BATCH_SAMPLER shuffles rows once; process r takes batch 2k+r of 4, so the global batch of step k is rows
    # 8k..8k+7 of the shuffle: what one process with batch 8 takes.
    # Plain BM25 tokens for mining: with stemmed negatives the 3 steps move the weights less, and Adam's m/sqrt(v)
    # turns all-reduce rounding on near-zero gradients into ~1.5% of that movement, over the bound below.
    common = [f"data.path={tiny_beir}", "data.dev_fraction=0.25", f"train.base_model={model}", "train.max_steps=3",
              "train.use_cpu=true", "train.save_steps=1", "tracking.report_to=none", "train.matryoshka_dims=[32,16]",
              "train.no_duplicates=false", "train.learning_rate=1e-3", "train.eval_steps=2", "train.logging_steps=1",
              "train.warmup_ratio=0.0", "train.gather_across_devices=true", "bm25.stemmer=", "bm25.stopwords="]
    two, one = tmp_path / "two", tmp_path / "one"
    data_prep_run(load_config(None, [f"run_dir={two}", *common]))
    shutil.copytree(two / "data_prep", one / "data_prep")
    manifest = one / "data_prep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(str(two), str(one)))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    # `--cpu` alone starts one process; `--multi_gpu` on a machine without GPUs is accelerate's gloo CPU path.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "embtune.train", f"run_dir={two}", *common, "train.batch_size=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_run(load_config(None, [f"run_dir={one}", *common, "train.batch_size=8"]))

    two_manifest, two_losses = losses(two)
    _, one_losses = losses(one)
    assert two_manifest["world_size"] == 2 and two_manifest["global_batch_size"] == 8
    # The logged loss is the mean over processes; each process scores its 4 queries against all 8 positives and 8
    # negatives. Without the gather each would see only its own 4 + 4 and the loss would differ.
    assert len(two_losses) == 3 and np.allclose(two_losses, one_losses, rtol=1e-5, atol=1e-6), (two_losses, one_losses)
    a = load_file(str(two / "train" / "model" / "model.safetensors"))
    b = load_file(str(one / "train" / "model" / "model.safetensors"))
    moved = max(float(np.abs(b[k] - load_file(str(model / "model.safetensors"))[k]).max()) for k in b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-2 * moved  # same gradients, same steps

    checkpoint_dir = next((two / "train").glob("checkpoints-*"))
    saved = sorted(p.name for p in checkpoint_dir.glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-3"]  # save_total_limit=2, each written once
    assert {p.name for p in (checkpoint_dir / "checkpoint-3").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                         "rng_state_1.pth"}
    with open(checkpoint_dir / "eval" / "Information-Retrieval_evaluation_dev_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["steps"]) for r in rows]
    assert 2 in steps and len(steps) == len(set(steps))  # one row per evaluation: the main process alone wrote it
