"""A stage killed while it rewrites its outputs is redone by the next run, never accepted half-written.

Each test runs the pipeline on tiny data, makes one stage rerun (its output removed, as a user would), kills that
run between two of its writes (an exception no stage catches, raised from inside the stage's own code), then runs the
pipeline again: the stage must run again and leave complete outputs. Before manifests were invalidated at the start
of a stage and checked against the files they list, the old manifest still matched and the broken output was kept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from embtune.manifest import Stage, hash_path
from embtune.pipeline import run as run_pipeline
from embtune.schema import load_config


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` in a stage can swallow it."""


def overrides_for(tmp_path: Path, tiny_beir: Path, tiny_model_dir: Path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", f"train.base_model={tiny_model_dir}",
            "train.max_steps=2", "train.batch_size=8", "train.use_cpu=true", "tracking.report_to=none",
            "train.matryoshka_dims=[32,16]", "eval.dims=[32,16]", "eval.significance_resamples=0"]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.fixture
def finished_run(tmp_path, tiny_beir, tiny_model_dir):
    """A complete pipeline run on tiny data: (config, overrides, run_dir)."""
    overrides = overrides_for(tmp_path, tiny_beir, tiny_model_dir)
    cfg = load_config(None, overrides)
    run_pipeline(cfg, None, overrides)
    return cfg, overrides, tmp_path / "run"


def largest_file(path: Path) -> Path:
    return path if path.is_file() else max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_export_killed_after_the_index_before_metrics_is_redone(finished_run, monkeypatch):
    """The issue's case: the bundle folder removed, the re-export killed after the model and index were written and
    before metrics.json; the next run must not call that bundle up to date."""
    from embtune import serve
    from embtune.serve import bundle as _bundle  # noqa: F401 (binds serve.bundle)

    cfg, overrides, run_dir = finished_run
    bundle = Path(manifest(run_dir, "export")["outputs"]["bundle"])
    complete = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    shutil.rmtree(bundle)
    build_bundle = serve.bundle.build_bundle

    def build_then_die(*args, **kwargs):
        build_bundle(*args, **kwargs)
        raise Killed("export killed after build_bundle")

    monkeypatch.setattr(serve.bundle, "build_bundle", build_then_die)
    with pytest.raises(Killed):
        run_pipeline(cfg, None, overrides, stages=("export",))
    assert not (bundle / "metrics.json").exists()  # the half-written bundle the next run finds
    monkeypatch.setattr(serve.bundle, "build_bundle", build_bundle)

    run_pipeline(cfg, None, overrides, stages=("export",))
    assert (bundle / "metrics.json").is_file()
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == complete


@pytest.mark.slow  # a tiny pipeline run each; the export case above and the bookkeeping test below stay fast-suite
@pytest.mark.parametrize("stage, output", [("data_prep", "train_table"), ("train", "model"), ("eval", "results")])
def test_stage_killed_while_writing_its_last_output_is_redone(finished_run, monkeypatch, stage, output):
    """The stage's output removed, the rerun killed while its last bytes were being written (the largest output
    file cut to half when the stage was about to record it), then the pipeline again: the stage runs again."""
    cfg, overrides, run_dir = finished_run
    path = Path(manifest(run_dir, stage)["outputs"][output])
    victim = largest_file(path)
    complete_size = victim.stat().st_size
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    finish = Stage.finish

    def die_mid_write(self, outputs, extra=None):
        if self.name == stage:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
            raise Killed(f"{stage} killed while writing {victim}")
        return finish(self, outputs, extra)

    monkeypatch.setattr(Stage, "finish", die_mid_write)
    with pytest.raises(Killed):
        run_pipeline(cfg, None, overrides, stages=(stage,))
    monkeypatch.setattr(Stage, "finish", finish)

    assert victim.stat().st_size == complete_size // 2
    run_pipeline(cfg, None, overrides, stages=(stage,))
    assert victim.stat().st_size == complete_size  # written whole again (training's bytes vary, not its size)
    assert manifest(run_dir, stage)["output_hashes"][output] == hash_path(path)


@pytest.mark.slow
def test_an_output_changed_after_its_stage_finished_reruns_the_stage(finished_run):
    """No crash needed: a results file truncated after eval finished is not accepted on the next run."""
    cfg, overrides, run_dir = finished_run
    results = Path(manifest(run_dir, "eval")["outputs"]["results"])
    whole = json.loads(results.read_text())
    results.write_bytes(results.read_bytes()[: results.stat().st_size // 2])
    run_pipeline(cfg, None, overrides, stages=("eval",))
    rerun = json.loads(results.read_text())  # whole again (a timing field may differ, the scores do not)
    assert rerun["results"] == whole["results"] and set(rerun) == set(whole)


def test_manifest_vouches_only_for_what_the_stage_finished(tmp_path):
    """Stage's bookkeeping alone, fast: begin() withdraws the manifest, a rewritten or truncated output is not up
    to date, files added beside the outputs are, and an output that is the stage's own input folder is only checked
    for existence (its files are the input's, followed by the fingerprint)."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n')
    stage = Stage("s", tmp_path / "run", config={"k": 1}, inputs={"corpus": source / "corpus.jsonl"})
    out = stage.dir / "table"
    out.mkdir(parents=True)
    (out / "part-0").write_text("complete rows\n")
    stage.finish({"table": out, "dataset": source})
    assert stage.up_to_date()

    (out / "cache-123.arrow").write_text("written by a reader later")  # an extra file: allowed
    assert stage.up_to_date()
    (source / "notes.txt").write_text("x")  # inside the passed-through folder, not an input: not a reason to rerun
    assert stage.up_to_date()

    stage.begin()
    assert not stage.manifest_path.exists() and not stage.up_to_date()
    stage.finish({"table": out, "dataset": source})
    time.sleep(0.05)  # file timestamps tick with the kernel's clock (milliseconds), not per write
    (out / "part-0").write_text("complete rows\n")  # same bytes, rewritten: the stage did not finish this write
    assert not stage.up_to_date()
    stage.finish({"table": out, "dataset": source})
    (out / "part-0").write_text("compl")
    assert not stage.up_to_date()
