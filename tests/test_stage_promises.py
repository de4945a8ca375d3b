"""Promises the docs make about the stages, run through the stages on tiny data: a changed input file reruns its
stage and the ones after it; ``eval.split: dev`` scores the dev queries data_prep held out; ``data.format: hf_disk``
reads a ``datasets`` table from disk."""

import json
import shutil
from pathlib import Path

import pytest

from embtune.data_prep.run import run as data_prep_run
from embtune.eval.run import run as eval_run
from embtune.pipeline import run as run_pipeline
from embtune.schema import load_config

STAGES = ("data_prep", "train", "eval", "export")


def manifests(run_dir: Path) -> dict[str, dict]:
    return {stage: json.loads((run_dir / stage / "manifest.json").read_text()) for stage in STAGES}


def written_at(run_dir: Path) -> dict[str, int]:
    """When each stage last wrote its manifest, in ns: a stage that ran rewrote it, a skipped one did not."""
    return {stage: (run_dir / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}


@pytest.mark.slow
def test_a_changed_input_file_reruns_its_stage_and_those_after(tmp_path, tiny_beir, tiny_model_dir):
    beir = tmp_path / "beir"
    shutil.copytree(tiny_beir, beir)
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={beir}", f"train.base_model={model}", "train.max_steps=2",
                 "train.batch_size=8", "train.use_cpu=true", "tracking.report_to=none",
                 "train.matryoshka_dims=[32,16]", "eval.dims=[32,16]", "eval.significance_resamples=0",
                 "export.targets=[]"]
    cfg = load_config(None, overrides)
    run_pipeline(cfg, None, overrides)
    first = written_at(tmp_path / "run")

    # The test qrels are read by eval only: eval reruns, and export after it; data_prep and train do not.
    test_qrels = beir / "qrels" / "test.tsv"
    test_qrels.write_text("\n".join(test_qrels.read_text().splitlines()[:-1]) + "\n")  # one judgement fewer
    run_pipeline(cfg, None, overrides)
    # (finished_at has whole seconds: on tiny data a rerun of export within the same second, with the same rounded
    # wall time, read as no rerun; CI met that once)
    reran = {s for s, ns in written_at(tmp_path / "run").items() if ns != first[s]}
    assert reran == {"eval", "export"}
    second = manifests(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["num_queries"] == 17

    # The train qrels are data_prep's input: every stage reruns, each on its upstream's new output.
    train_qrels = beir / "qrels" / "train.tsv"
    train_qrels.write_text("\n".join(train_qrels.read_text().splitlines()[:-1]) + "\n")
    run_pipeline(cfg, None, overrides)
    third = manifests(tmp_path / "run")
    assert all(third[s]["fingerprint"] != second[s]["fingerprint"] for s in STAGES)
    assert third["data_prep"]["input_hashes"]["train_qrels"] != second["data_prep"]["input_hashes"]["train_qrels"]


def test_eval_on_the_dev_split_scores_the_held_out_queries(tmp_path, tiny_beir, tiny_model_dir):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.25",
                             f"train.base_model={tiny_model_dir}", "eval.split=dev", "eval.dims=[32]",
                             "eval.significance_resamples=0", "tracking.report_to=none"])
    outputs = data_prep_run(cfg)
    dev_lines = Path(outputs["dev_qrels"]).read_text().splitlines()[1:]
    dev_queries = {line.split("\t")[0] for line in dev_lines}
    assert len(dev_queries) == 14  # a quarter of the 54 train queries, never the 18 test ones
    eval_run(cfg)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["split"] == "dev" and results["num_queries"] == len(dev_queries)
    assert set(results["per_query"]["base"]) == dev_queries
    manifest = json.loads((tmp_path / "run" / "eval" / "manifest.json").read_text())
    assert manifest["inputs"]["qrels"] == outputs["dev_qrels"]


def test_hf_disk_pairs_through_data_prep_and_eval(tmp_path, tiny_model_dir):
    from datasets import Dataset, load_from_disk

    topics = {"astronomy": "star planet orbit telescope galaxy", "cooking": "recipe oven flour butter dough",
              "music": "guitar melody chord rhythm piano", "sport": "team goal match ball coach"}
    rows = [{"query": f"{words.split()[i % 5]} {words.split()[(i + 1) % 5]}",
             "positive": f"{topic} {i}: {words} {words.split()[i % 5]}"}
            for topic, words in topics.items() for i in range(5)]  # 20 distinct queries and passages
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=hf_disk",
                             f"data.pairs_file={tmp_path / 'pairs'}",
                             "data.dev_fraction=0.25", f"train.base_model={tiny_model_dir}", "mining.rank_end=10",
                             "eval.split=dev", "eval.dims=[32]", "eval.significance_resamples=0",
                             "tracking.report_to=none"])
    outputs = data_prep_run(cfg)
    table = load_from_disk(outputs["train_table"])
    assert len(table) == 15 and {"query", "positive", "negative_1"} <= set(table.column_names)  # 20 pairs - 5 dev
    assert set(table["positive"]) <= {row["positive"] for row in rows}
    assert all(n != p for n, p in zip(table["negative_1"], table["positive"]))
    corpus = (Path(outputs["eval_dataset"]) / "corpus.jsonl").read_text().splitlines()
    assert len(corpus) == 20  # every distinct positive is a document eval searches
    eval_run(cfg)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["num_queries"] == 5 and results["num_documents"] == 20
    assert json.loads((tmp_path / "run" / "data_prep" / "manifest.json").read_text())["inputs"]["pairs"] == str(
        (tmp_path / "pairs").resolve())
