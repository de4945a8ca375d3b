"""Bad input at every entry point, run as a user runs it (a subprocess): one line that names what is wrong and how to
fix it, exit code 2, no traceback; ``--debug`` shows the traceback instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false"}


def run_entry(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def problem_lines(err: str) -> list[str]:
    """stderr without log records (HH:MM:SS ...) and faiss's import-time noise."""
    return [line for line in err.splitlines() if line.strip() and not (line[:2].isdigit() and line[2] == ":")
            and not line.startswith("ModuleNotFoundError(")]


def recipes(tmp: Path) -> dict[str, Path]:
    (tmp / "bad_yaml.yaml").write_text("data:\n  path: x\n   format: [beir\n")
    (tmp / "typo.yaml").write_text("data:\n  path: x\ntrain:\n  lerning_rate: 0.1\n")
    (tmp / "bad_value.yaml").write_text("train:\n  batch_size: many\n")
    half = tmp / "half_bundle"
    (half / "model").mkdir(parents=True)
    return {"half_bundle": half}


CASES = {
    "embtune unknown command": (["embtune.pipeline.cli", "trian", "x.yaml"], "did you mean 'embtune train'"),
    "data_prep missing config": (["embtune.data_prep", "nope.yaml"], "config file not found: nope.yaml"),
    "data_prep malformed yaml": (["embtune.data_prep", "bad_yaml.yaml"], "bad_yaml.yaml:3: invalid YAML"),
    "train unknown key": (["embtune.train", "typo.yaml"], "did you mean 'train.learning_rate'?"),
    "eval bad value": (["embtune.eval", "bad_value.yaml"], "key 'train.batch_size' expects an integer"),
    "pipeline missing data path": (["embtune.pipeline", "data.path=/no/such/corpus", "run_dir=run"],
                                   "data.path /no/such/corpus: no such file or folder"),
    "serve up missing bundle": (["embtune.serve", "up", "--bundle", "/nonexistent-bundle"],
                                "bundle /nonexistent-bundle: no such folder"),
    "serve up half-written bundle": (["embtune.serve", "up", "--bundle", "half_bundle"],
                                     "no manifest.json, so its export did not finish"),
    "eval.choose bad value": (["embtune.eval.choose", "data.path=.", "eval.choose.hybrid=[rfr]"],
                              "eval.choose.hybrid: unknown ['rfr']"),
    "eval.rag offline model": (["embtune.eval.rag", "data.path=.", "run_dir=run",
                                "--base", "no-such-org/no-such-model"],
                               "model 'no-such-org/no-such-model' is not on disk and the hub is offline"),
    "pipeline.report missing run": (["embtune.pipeline.report", "no_run"], "run directory no_run does not exist"),
    "serve export unknown section": (["embtune.serve", "exprot.targets=[]"], "did you mean 'export'?"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entry_point_answers_bad_input_with_one_line_and_exit_2(case, tmp_path):
    recipes(tmp_path)
    args, expected = CASES[case]
    done = run_entry(args, tmp_path)
    assert done.returncode == 2, (case, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = problem_lines(done.stderr)
    assert len(lines) == 1 and expected in lines[0], lines


def test_debug_shows_the_traceback(tmp_path):
    done = run_entry(["embtune.serve", "up", "--bundle", "/nonexistent-bundle", "--debug"], tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr and "InputError" in done.stderr


def test_a_model_not_on_disk_is_refused_where_it_would_be_loaded(monkeypatch):
    """Naming a model (a fingerprint, a report) checks nothing; loading one that is neither a folder nor in the
    offline hub cache is one line naming the fix, and an OSError as transformers' own failure is."""
    from huggingface_hub import constants

    from embtune.models import ModelNotFoundError, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("no-such-org/no-such-model") == "no-such-org/no-such-model"
    for name, reason in (("no-such-org/no-such-model", "not on disk and the hub is offline"),
                         ("/no/such/model/folder", "no such folder")):
        with pytest.raises(ModelNotFoundError, match=reason) as err:
            resolve_model(name, must_exist=True)
        assert isinstance(err.value, OSError)
