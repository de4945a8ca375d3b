"""Every entry point answers an input problem (bad recipe, bad data, a missing input file) with one line that names
the file and exit code 2, never a traceback: the pipeline, each stage's ``python -m``, and the ``embtune`` CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def beir_without_train_qrels(tmp_path, tiny_beir) -> Path:
    folder = tmp_path / "beir"
    shutil.copytree(tiny_beir, folder)
    (folder / "qrels" / "train.tsv").unlink()
    return folder


def error_lines(err: str) -> list[str]:
    """The lines that are not log records (the logging format starts with HH:MM:SS) or import-time noise (faiss
    tries its AVX builds first and prints each ModuleNotFoundError)."""
    return [line for line in err.splitlines() if line.strip() and not (line[:2].isdigit() and line[2] == ":")
            and not line.startswith("ModuleNotFoundError(")]


@pytest.mark.slow
def test_pipeline_on_a_data_error_prints_one_line_and_exits_2(tmp_path, tiny_beir):
    folder = beir_without_train_qrels(tmp_path, tiny_beir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "embtune.pipeline", f"run_dir={tmp_path / 'run'}",
                           f"data.path={folder}", "tracking.report_to=none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert error_lines(done.stderr) == [f"data error: {folder / 'qrels' / 'train.tsv'}: file not found"]


@pytest.mark.parametrize("entry", ["data_prep", "embtune data_prep", "pipeline"])
def test_bad_data_line_names_file_and_line(entry, tmp_path, tiny_beir, capsys):
    folder = tmp_path / "beir"
    shutil.copytree(tiny_beir, folder)
    with open(folder / "corpus.jsonl", "a") as handle:
        handle.write("{not json\n")
    line = len((folder / "corpus.jsonl").read_text().splitlines())
    args = [f"run_dir={tmp_path / 'run'}", f"data.path={folder}", "tracking.report_to=none"]
    assert main_of(entry)(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"data error: {folder / 'corpus.jsonl'}:{line}:"), lines


@pytest.mark.parametrize("entry, missing", [
    ("train", "data_prep/manifest.json"),
    ("eval", "data_prep/manifest.json"),
    ("serve", "train/manifest.json"),
    ("embtune train", "data_prep/manifest.json"),
])
def test_stage_without_its_upstream_names_the_missing_file(entry, missing, tmp_path, capsys):
    # eval with non-BEIR data has no folder to read until data_prep has run.
    args = [f"run_dir={tmp_path / 'run'}", "data.format=pydoc", "tracking.report_to=none"]
    assert main_of(entry)(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("missing input:") and str(tmp_path / "run" / missing) in lines[0]


def test_cli_exits_2_on_a_config_error(tmp_path, capsys):
    from embtune.pipeline.cli import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  path: /x\ntrain:\n  lerning_rate: 0.1\n")
    for stage in ("data_prep", "train", "eval", "serve", "pipeline"):
        assert main([stage, str(recipe)]) == 2, stage
        lines = error_lines(capsys.readouterr().err)
        assert lines == [f"config error: {recipe}:4: unknown key 'train.lerning_rate'; did you mean "
                         "'train.learning_rate'? (known keys here: "
                         + lines[0].split("(known keys here: ")[1]], (stage, lines)
    assert main(["nosuchstage"]) == 2


def test_eval_split_missing_qrels_names_the_file(tmp_path, tiny_beir, capsys):
    from embtune.eval.__main__ import main

    args = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "eval.split=validation",
            "tracking.report_to=none", "eval.compare_base=false"]
    assert main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"missing input: {tiny_beir / 'qrels' / 'validation.tsv'}: file not found "
                     "(eval.split=validation needs judged queries)"]


def main_of(entry: str):
    if entry.startswith("embtune "):
        from embtune.pipeline.cli import main

        return lambda args: main([entry.split()[1], *args])
    if entry == "pipeline":
        from embtune.pipeline import main

        return main
    module = __import__(f"{entry}.__main__", fromlist=["main"])
    return module.main


def test_pipeline_stage_failure_under_a_launcher_keeps_its_exit_code(tmp_path, capsys):
    """With --launch, the train stage runs in its own processes; its exit code is the pipeline's."""
    from embtune.pipeline import main

    run_dir = tmp_path / "run"
    (run_dir / "data_prep").mkdir(parents=True)
    (run_dir / "data_prep" / "manifest.json").write_text(json.dumps({"outputs": {}}))
    code = main([f"run_dir={run_dir}", "data.format=pydoc", "--stages", "train",
                 "--launch", f"{sys.executable} -c 'import sys; sys.exit(3)'"])
    assert code == 3
    assert "stage train:" in capsys.readouterr().err
