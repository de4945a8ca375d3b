"""Exact resume: a run restarted from a checkpoint ends where an uninterrupted one does, and a corrupt or partial
newest checkpoint is detected and skipped for the one before it."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from embtune.data_prep.run import run as data_prep_run
from embtune.schema import load_config
from embtune.train.checkpoints import checkpoint_problem, last_checkpoint
from embtune.train.recipe import run as train_run

ROOT = Path(__file__).resolve().parents[1]


def overrides(run_dir, beir, model, *extra):
    # 40 rows, batch 8: 5 steps per epoch, so 7 steps cross an epoch boundary. Dropout stays on (the model's
    # 0.1), and the NO_DUPLICATES sampler is the default: both must replay exactly.
    return [f"run_dir={run_dir}", f"data.path={beir}", f"train.base_model={model}", "train.max_steps=7",
            "train.batch_size=8", "train.use_cpu=true", "train.save_steps=1", "train.save_total_limit=10",
            "tracking.report_to=none", "train.matryoshka_dims=[32,16]", "train.learning_rate=1e-3", *extra]


def weights(run_dir):
    return load_file(str(Path(run_dir) / "train" / "model" / "model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_beir, tiny_model_dir):
    """An uninterrupted 7-step run, and its data_prep output for the other runs to reuse."""
    root = tmp_path_factory.mktemp("resume")
    model = root / "base"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(None, overrides(root / "reference", tiny_beir, model))
    data_prep_run(cfg)
    train_run(cfg)
    return root, model, weights(root / "reference")


def fresh_run(root, name, beir, model, *extra):
    """A run directory whose data_prep output is the reference's (same table, so the same fingerprint)."""
    run_dir = root / name
    shutil.copytree(root / "reference" / "data_prep", run_dir / "data_prep")
    manifest = run_dir / "data_prep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(str(root / "reference"), str(run_dir)))
    return run_dir, overrides(run_dir, beir, model, *extra)


def checkpoints(run_dir):
    return sorted((Path(run_dir) / "train").glob("checkpoints-*/checkpoint-*"), key=lambda p: int(p.name[11:]))


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_checkpoint_and_matches(reference, tiny_beir, caplog):
    root, model, expected = reference
    run_dir, args = fresh_run(root, "fallback", tiny_beir, model)
    cfg = load_config(None, args)
    train_run(cfg)
    # As if killed while writing checkpoint-6: drop what came after, truncate its weights.
    for checkpoint in checkpoints(run_dir):
        if int(checkpoint.name[11:]) > 6:
            shutil.rmtree(checkpoint)
    weights_file = checkpoints(run_dir)[-1] / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    shutil.rmtree(run_dir / "train" / "model")
    (run_dir / "train" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="train.checkpoints"):
        train_run(cfg)
    assert any("checkpoint-6 is not usable" in r.message and "model.safetensors" in r.message for r in caplog.records)
    assert max_abs_diff(weights(run_dir), expected) <= 1e-6


def test_checkpoint_problems_are_named(reference):
    root, _, _ = reference
    good = checkpoints(root / "reference")[-1]
    assert checkpoint_problem(good) is None
    broken = good.parent / "checkpoint-99"
    shutil.copytree(good, broken)
    state = json.loads((broken / "trainer_state.json").read_text())
    assert "step 7" in checkpoint_problem(broken)  # copied folder name disagrees with its state
    state["global_step"] = 99
    (broken / "trainer_state.json").write_text(json.dumps(state))
    assert "has" in checkpoint_problem(broken)  # size differs from the seal
    (broken / "trainer_state.json").write_text("{\"global_step\": 9")
    assert "trainer_state.json" in checkpoint_problem(broken)
    (broken / "optimizer.pt").unlink()
    assert "optimizer.pt is missing" in checkpoint_problem(broken)
    (broken / "embtune_complete.json").unlink()
    assert "did not finish" in checkpoint_problem(broken)
    assert last_checkpoint(good.parent) == str(good)  # the broken newer one is passed over
    shutil.rmtree(broken)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_uninterrupted(reference, tiny_beir):
    """The real thing: `python -m embtune.train` killed with SIGKILL after step 3, then the same command again."""
    root, model, expected = reference
    run_dir, args = fresh_run(root, "killed", tiny_beir, model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "embtune.train", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(int(c.name[11:]) >= 3 for c in checkpoints(run_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(c.name[11:]) for c in checkpoints(run_dir))
    assert killed_at < 7 and not (run_dir / "train" / "model").exists()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert max_abs_diff(weights(run_dir), expected) <= 1e-6


@pytest.mark.slow
def test_force_retrains_from_scratch_not_from_the_last_checkpoint(reference, tiny_beir, caplog):
    """`python -m embtune.train CONFIG --force` on a finished run trains every step again from the base model."""
    from safetensors.numpy import save_file

    from embtune.train.checkpoints import seal

    root, model, expected = reference
    run_dir, args = fresh_run(root, "forced", tiny_beir, model)
    cfg = load_config(None, args)
    train_run(cfg)
    # Mark every checkpoint (resealed, so each still counts as complete): a run that resumes from one ends with
    # these weights, a run from scratch ends with the reference's.
    for checkpoint in checkpoints(run_dir):
        tensors = load_file(str(checkpoint / "model.safetensors"))
        save_file({k: v + 1.0 for k, v in tensors.items()}, str(checkpoint / "model.safetensors"))
        seal(checkpoint)
    with caplog.at_level(logging.INFO, logger="train.recipe"):
        train_run(cfg, force=True)
    assert not any("resuming from" in r.message for r in caplog.records)
    assert max_abs_diff(weights(run_dir), expected) <= 1e-6
