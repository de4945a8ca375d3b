"""End to end on a tiny BEIR set with a tiny model: stages, manifests, skip and rerun, export."""

import json
import shutil

import pytest
from sentence_transformers import SentenceTransformer

from embtune.pipeline import run as run_pipeline
from embtune.schema import load_config


def recipe(tmp_path, tiny_beir, tiny_model_dir, *extra):
    model_dir = tmp_path / "base"
    if not model_dir.exists():
        shutil.copytree(tiny_model_dir, model_dir)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.25",
                 f"train.base_model={model_dir}", "train.epochs=1", "train.batch_size=8", "tracking.report_to=none",
                 "train.matryoshka_dims=[32,16]", "train.max_seq_length=64", "train.use_cpu=true",
                 "mining.num_negatives=2", "mining.rank_end=20", "eval.dims=[32,16]", *extra]
    return load_config(None, overrides), overrides


def manifest(tmp_path, stage):
    return json.loads((tmp_path / "run" / stage / "manifest.json").read_text())


@pytest.mark.slow
def test_pipeline_runs_skips_and_reruns_downstream(tmp_path, tiny_beir, tiny_model_dir):
    cfg, overrides = recipe(tmp_path, tiny_beir, tiny_model_dir)
    run_pipeline(cfg, None, overrides)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["results"]) == {"base", "finetuned", "bm25"}
    assert set(results["results"]["finetuned"]["dims"]) == {"32", "16"}
    assert results["num_queries"] == 18  # every 4th of 72 queries is test

    from embtune.pipeline.report import check_report

    report = tmp_path / "run" / "report" / "index.html"  # every pipeline run ends with its report
    assert check_report(report) == [] and "finetuned vs base" in report.read_text()
    assert "train:" in (tmp_path / "run" / "config.yaml").read_text()

    bundle = tmp_path / "run" / "bundle"
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    assert bundle_manifest["dims"] == [32, 16] and bundle_manifest["num_docs"] == 72  # not the stage manifest
    assert (bundle / "index" / "corpus.faiss").is_file()
    model = SentenceTransformer(str(bundle / "model"), device="cpu")
    assert model.encode(["star planet"]).shape == (1, 32)
    card = (bundle / "model" / "README.md").read_text()
    assert "ndcg@10" in card and "matryoshka_dims" in card
    assert json.loads((bundle / "metrics.json").read_text())["results"]["finetuned"]
    # The bundle serves eval's best row of the exported model (dense or BM25 here: no hybrid rows were asked for).
    from embtune.retrieval.spec import RetrieverSpec

    served = json.loads((bundle / "manifest.json").read_text())["retriever_source"]["row"]
    assert served in ("finetuned", "bm25")
    assert RetrieverSpec.load(bundle / "retriever.json").to_dict() == {
        **results["specs"][served], **({"dense": {**results["specs"][served]["dense"], "model": "model"}}
                                       if served == "finetuned" else {})}

    table = manifest(tmp_path, "data_prep")["outputs"]["train_table"]
    from datasets import load_from_disk

    rows = load_from_disk(table)
    assert {"query", "positive", "negative_1", "negative_2", "negative_1_id", "query_id"} <= set(rows.column_names)
    dev = (tmp_path / "run" / "data_prep" / "qrels" / "dev.tsv").read_text().split("\n")[1:]
    dev_queries = {line.split("\t")[0] for line in dev if line}
    assert dev_queries and not dev_queries & set(rows["query_id"])  # dev queries never train

    before = {stage: manifest(tmp_path, stage)["finished_at"] + str(manifest(tmp_path, stage)["wall_seconds"])
              for stage in ("data_prep", "train", "eval", "export")}
    run_pipeline(cfg, None, overrides)  # everything up to date: nothing reruns
    after = {stage: manifest(tmp_path, stage)["finished_at"] + str(manifest(tmp_path, stage)["wall_seconds"])
             for stage in before}
    assert after == before

    cfg2, overrides2 = recipe(tmp_path, tiny_beir, tiny_model_dir, "train.learning_rate=1e-3")
    fingerprints = {s: manifest(tmp_path, s)["fingerprint"] for s in before}
    run_pipeline(cfg2, None, overrides2)
    changed = {s for s in before if manifest(tmp_path, s)["fingerprint"] != fingerprints[s]}
    assert changed == {"train", "eval", "export"}  # data_prep kept, everything after train reran
