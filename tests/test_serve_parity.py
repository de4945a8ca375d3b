"""Serve/eval parity: ``/search`` returns, for every query, the top 10 that eval ranked for the same spec.

eval runs on the tiny BEIR fixture with MiniLM (dense, BM25 and weighted hybrid rows) and writes its rankings
(``eval.save_runs``) and each row's spec; a bundle of the same model and documents then serves each spec through
the real app, one HTTP request per query, as a user would call it.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from embtune.dataio import load_corpus, load_queries
from embtune.eval.run import read_run, run_file_name
from embtune.eval.run import run as run_eval
from embtune.retrieval.spec import SPEC_FILE, FusionSpec, RetrieverSpec
from embtune.schema import load_config
from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app
from embtune.serve.bundle import build_bundle


@pytest.fixture(scope="module")
def measured(tiny_beir, tmp_path_factory):
    """(eval results.json, eval's top-10 per row, the bundle folder, the queries by id)."""
    from embtune.models import resolve_model

    root = tmp_path_factory.mktemp("parity")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EMBTUNE_CACHE", str(root / "cache"))
    minilm = resolve_model("minilm")
    # The train split: 54 queries (the test split has 18).
    cfg = load_config(None, [f"run_dir={root / 'run'}", "data.format=beir", f"data.path={tiny_beir}",
                             f"train.base_model={minilm}", "eval.split=train", "eval.dims=[]",
                             "eval.hybrid=[weighted]", "eval.hybrid_weight=0.7", "eval.hybrid_depth=20",
                             "eval.significance_resamples=0", "eval.save_runs=10"])
    run_eval(cfg)
    results = json.loads((root / "run" / "eval" / "results.json").read_text())
    rankings = {row: read_run(root / "run" / "eval" / "runs" / run_file_name(row)) for row in results["results"]}
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    bundle = build_bundle(minilm, [{"_id": d, **doc} for d, doc in corpus.items()], root / "bundle", device="cpu")
    queries = load_queries(tiny_beir / "queries.jsonl")
    yield results, rankings, bundle, queries
    monkeypatch.undo()


def served_top10(bundle, spec: RetrieverSpec, queries: dict[str, str], qids) -> dict[str, list[str]]:
    """Serve ``spec`` as the bundle's retriever.json; each query's top 10 ids from ``POST /search``."""
    spec.save(bundle / SPEC_FILE)
    with TestClient(create_app(bundle, ServeConfig(threads=1))) as client:
        assert client.get("/health").json()["retriever"] == json.loads((bundle / SPEC_FILE).read_text())
        out = {}
        for qid in qids:
            response = client.post("/search", json={"query": queries[qid], "k": 10})
            assert response.status_code == 200, response.text
            out[qid] = [hit["id"] for hit in response.json()["hits"]]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("row", ["base", "base+bm25_weighted"])
def test_served_top10_equals_eval_ranking(measured, row):
    results, rankings, bundle, queries = measured
    spec = RetrieverSpec.from_dict(results["specs"][row])
    assert (spec.fusion.method, spec.bm25 is not None) == (("weighted", True) if "+" in row else ("none", False))
    expected = rankings[row]
    assert len(expected) == results["num_queries"] == 54
    served = served_top10(bundle, spec, queries, sorted(expected))
    mismatched = {qid: (served[qid], expected[qid]) for qid in expected if served[qid] != expected[qid]}
    assert not mismatched, f"{len(mismatched)} of {len(expected)} queries differ, e.g. {next(iter(mismatched.items()))}"


@pytest.mark.slow
def test_the_parity_check_can_fail(measured):
    """The check separates fusions: RRF over the same members (the old server's hybrid) serves another top 10
    for some query, and the hybrid ranking is not the dense one."""
    results, rankings, bundle, queries = measured
    spec = RetrieverSpec.from_dict(results["specs"]["base+bm25_weighted"])
    rrf = spec.replace(fusion=FusionSpec(method="rrf", rrf_k=60, depth=spec.fusion.depth))
    served = served_top10(bundle, rrf, queries, sorted(rankings["base+bm25_weighted"]))
    assert any(served[q] != rankings["base+bm25_weighted"][q] for q in served)
    assert any(rankings["base"][q] != rankings["base+bm25_weighted"][q] for q in served)


def test_eval_records_specs_and_recommends_the_best_row(measured):
    results, _, _, _ = measured
    rows = results["results"]
    assert set(results["specs"]) == set(rows) == {"base", "bm25", "base+bm25_weighted"}
    assert RetrieverSpec.from_dict(results["specs"]["bm25"]).dense is None
    # no dev split and no label-free probe: nothing but the reported split could choose, and it must not
    recommended = results["recommended"]
    assert recommended["chosen_by"] == "default" and recommended["row"] == "base"
    assert "no dev split" in recommended["why"]
    on_split = recommended["best_on_split"]  # for reference only
    best = max(rows, key=lambda r: rows[r]["ndcg@10"])
    assert on_split["row"] == best and on_split["spec"] == results["specs"][best]
    single = max(("base", "bm25"), key=lambda r: rows[r]["ndcg@10"])
    assert on_split["best_single"] == {"row": single, "ndcg@10": rows[single]["ndcg@10"]}
    assert best in on_split["why"] and single in on_split["why"]


def test_export_serves_the_recommended_spec_of_the_exported_model(caplog):
    from embtune.serve.export import bundle_spec

    dense = {"dense": {"model": "runs/x/train/model", "dim": 384}}
    base = {"dense": {"model": "minilm-path", "dim": 384}}
    fused = {"bm25": {}, "fusion": {"method": "weighted", "dense_weight": 0.7}}
    specs = {"base": base, "finetuned": dense, "bm25": {"dense": None, "bm25": {}},
             "base+bm25_weighted": {**base, **fused}, "finetuned+bm25_weighted": {**dense, **fused},
             "finetuned>rerank": {**dense, "rerank": {"model": "ce", "top_k": 10}}}
    ndcg = {"base": 0.64, "finetuned": 0.70, "bm25": 0.68, "base+bm25_weighted": 0.73,
            "finetuned+bm25_weighted": 0.72, "finetuned>rerank": 0.80}
    results = {"split": "dev", "results": {row: {"ndcg@10": v} for row, v in ndcg.items()}, "specs": specs,
               "recommended": {"row": "finetuned+bm25_weighted", "ndcg@10": 0.72}}
    spec, source = bundle_spec(results, "runs/x/train/model")
    assert source["row"] == "finetuned+bm25_weighted" and spec.fusion.dense_weight == 0.7
    # eval recommends a row of the base model: the bundle (the fine-tuned model) serves its own best row, and says so
    results["recommended"] = {"row": "base+bm25_weighted", "ndcg@10": 0.73}
    spec, source = bundle_spec(results, "runs/x/train/model")
    assert source == {"row": "finetuned+bm25_weighted", "ndcg@10": 0.72, "split": "dev",
                      "eval_recommended": "base+bm25_weighted"}
    assert "another model than the exported one" in caplog.text
    assert bundle_spec({"results": {}}, "runs/x/train/model") == (None, {})  # a results.json from before specs
