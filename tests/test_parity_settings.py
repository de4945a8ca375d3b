"""Measured = served outside the default configuration (issue 28): each setting eval ranks with reaches the bundle
and ``/search``, or the server refuses to start with one line naming it.

- a dot-product model (MiniLM without its ``Normalize``, ``similarity_fn_name: dot``) is served by its dot product,
  not renormalized into a cosine model;
- ``mining.include_title: false``, ``eval.max_seq_length`` and the rerank's ``max_length`` reach eval, the bundle
  and the server;
- a bundle names the encoder backend that embedded its index, and another one is refused;
- the embedding cache keeps a query-route encode apart from a plain one; the relative-margin guard holds for
  negative scores; Ray-engine BM25 resolves ``bm25.language: auto`` on the whole corpus; eval's fingerprint
  covers the probe's weights and the title handling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from embtune.dataio import document_text, load_corpus, load_queries
from embtune.eval.run import read_run, run_file_name
from embtune.eval.run import run as run_eval
from embtune.retrieval.spec import SPEC_FILE, Retriever, RetrieverSpec
from embtune.schema import load_config
from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app
from embtune.serve.bundle import MANIFEST_FILE, build_bundle, load_bundle


def dot_model(folder: Path) -> Path:
    """MiniLM with its Normalize module removed, scoring by dot product (as the issue's report built it)."""
    from sentence_transformers import SentenceTransformer

    from embtune.models import resolve_model

    minilm = SentenceTransformer(resolve_model("minilm"), device="cpu")
    modules = [module for module in minilm if type(module).__name__ != "Normalize"]
    SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="dot").save(str(folder))
    return folder


def eval_and_bundle(root: Path, tiny_beir: Path, model: str, overrides: list[str], **bundle_args):
    """eval on tiny BEIR's train split (54 queries) with its top 10 per row saved, and a bundle of the same model
    and corpus: (results.json, top 10 per row, bundle folder, queries by id)."""
    cfg = load_config(None, [f"run_dir={root / 'run'}", "data.format=beir", f"data.path={tiny_beir}",
                             f"train.base_model={model}", "eval.split=train", "eval.dims=[]",
                             "eval.hybrid=[weighted]", "eval.hybrid_weight=0.7", "eval.hybrid_depth=20",
                             "eval.significance_resamples=0", "eval.save_runs=10", *overrides])
    run_eval(cfg)
    results = json.loads((root / "run" / "eval" / "results.json").read_text())
    rankings = {row: read_run(root / "run" / "eval" / "runs" / run_file_name(row)) for row in results["results"]}
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    bundle = build_bundle(model, [{"_id": d, **doc} for d, doc in corpus.items()], root / "bundle", device="cpu",
                          **bundle_args)
    return results, rankings, bundle, load_queries(tiny_beir / "queries.jsonl")


def served_top10(bundle: Path, spec: RetrieverSpec, queries: dict[str, str], qids) -> dict[str, list[str]]:
    spec.save(bundle / SPEC_FILE)
    out = {}
    with TestClient(create_app(bundle, ServeConfig(threads=1, cache_size=0))) as client:
        for qid in qids:
            response = client.post("/search", json={"query": queries[qid], "k": 10})
            assert response.status_code == 200, response.text
            out[qid] = [hit["id"] for hit in response.json()["hits"]]
    return out


def mismatches(served: dict[str, list[str]], expected: dict[str, list[str]]) -> dict[str, tuple]:
    return {qid: (served[qid], expected[qid]) for qid in expected if served[qid] != expected[qid]}


@pytest.fixture(scope="module")
def dot_measured(tiny_beir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dot")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EMBTUNE_CACHE", str(root / "cache"))
    model = str(dot_model(root / "dot-minilm"))
    yield eval_and_bundle(root, tiny_beir, model, [])
    monkeypatch.undo()


@pytest.mark.parametrize("row", ["base", "base+bm25_weighted"])
def test_a_dot_product_model_is_served_by_its_dot_product(dot_measured, row):
    results, rankings, bundle, queries = dot_measured
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["similarity_fn_name"] == manifest["metric"] == "dot"
    served = served_top10(bundle, RetrieverSpec.from_dict(results["specs"][row]), queries, sorted(rankings[row]))
    bad = mismatches(served, rankings[row])
    assert not bad, f"{len(bad)} of {len(served)} queries differ, e.g. {next(iter(bad.items()))}"


def test_the_dot_product_check_can_fail(dot_measured):
    """The cosine ranking of the same model (what the bundle used to serve) differs from eval's dot ranking for
    some query, so the parity above is not the cosine one by accident."""
    from embtune.retrieval.encoder import normalize

    results, rankings, bundle, queries = dot_measured
    loaded = load_bundle(bundle)
    docs = loaded.index.reconstruct_n(0, loaded.index.ntotal)  # (n_docs, dim), the served vectors
    assert np.abs(np.linalg.norm(docs, axis=1) - 1).max() > 0.1  # not normalized
    qids = sorted(rankings["base"])
    cosine = normalize(loaded.encode([queries[q] for q in qids])) @ normalize(docs).T  # (n_queries, n_docs)
    ids = [d["_id"] for d in loaded.docs]
    cosine_top = {q: [ids[i] for i in np.argsort(-row, kind="stable")[:10]] for q, row in zip(qids, cosine)}
    assert mismatches(cosine_top, rankings["base"])


@pytest.fixture(scope="module")
def untitled_measured(tiny_beir, tmp_path_factory):
    """eval without titles, at 24 tokens, with the hybrid row reranked by a tiny cross-encoder."""
    from tests.test_hybrid import build_tiny_cross_encoder

    root = tmp_path_factory.mktemp("untitled")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EMBTUNE_CACHE", str(root / "cache"))
    cross = build_tiny_cross_encoder(root / "ce")
    from embtune.models import resolve_model

    yield eval_and_bundle(root, tiny_beir, resolve_model("minilm"),
                          ["mining.include_title=false", "eval.max_seq_length=24", f"eval.reranker={cross}",
                           "eval.rerank_on=[base+bm25_weighted]", "eval.rerank_top_k=5"],
                          include_title=False, max_seq_length=24)
    monkeypatch.undo()


def test_eval_reads_the_corpus_without_titles_when_mining_does(untitled_measured, tiny_beir):
    """tiny BEIR's titles are the topic names: with mining.include_title=false eval's BM25 row is BM25 over the
    text alone (it ranked titled documents before)."""
    results, rankings, _, queries = untitled_measured
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    qids = sorted(rankings["bm25"])
    spec = RetrieverSpec.from_dict(results["specs"]["bm25"])
    for include_title, equal in ((False, True), (True, False)):
        texts = [document_text(doc, include_title) for doc in corpus.values()]
        run = Retriever(spec, list(corpus), texts).search([queries[q] for q in qids], None, 10, qids)
        top = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in run.items()}
        assert (not mismatches(top, rankings["bm25"])) is equal


@pytest.mark.parametrize("row", ["base", "base+bm25_weighted", "base+bm25_weighted>rerank"])
def test_untitled_truncated_reranked_rows_are_served_as_measured(untitled_measured, row):
    results, rankings, bundle, queries = untitled_measured
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert (manifest["include_title"], manifest["max_seq_length"]) == (False, 24)
    spec = RetrieverSpec.from_dict(results["specs"][row])
    if spec.rerank is not None:
        assert spec.rerank.max_length == 24  # eval's cross-encoder truncation, recorded for the server
    served = served_top10(bundle, spec, queries, sorted(rankings[row]))
    bad = mismatches(served, rankings[row])
    assert not bad, f"{len(bad)} of {len(served)} queries differ, e.g. {next(iter(bad.items()))}"


def test_the_server_reranks_with_the_recorded_max_length(tmp_path):
    from tests.test_hybrid import build_tiny_cross_encoder

    cross = build_tiny_cross_encoder(tmp_path / "ce")
    spec = RetrieverSpec.from_dict({"dense": None, "bm25": {}, "rerank": {"model": str(cross), "top_k": 5,
                                                                        "max_length": 24}})
    retriever = Retriever(spec, ["a", "b"], ["alpha text", "beta text"])
    assert retriever._scorer(spec.rerank).max_length == 24


def test_a_bundle_is_served_only_with_the_backend_that_built_its_index(tiny_model_dir, tmp_path, capsys):
    from embtune.serve.__main__ import main

    bundle = build_bundle(tiny_model_dir, [{"_id": "a", "text": "alpha"}], tmp_path / "bundle", device="cpu")
    assert json.loads((bundle / MANIFEST_FILE).read_text())["encoder_backend"] == "torch"
    with pytest.raises(ValueError, match="encoder_backend='torch'"):  # BundleMismatch, before loading the model
        load_bundle(bundle, backend="onnx-int8")
    capsys.readouterr()
    # No serve key picks the backend (the bundle's own is used); the removed key is one line naming its replacement.
    assert main(["up", "--bundle", str(bundle), "serve.backend=onnx-int8", "serve.port=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.backend" in err[0], err
    assert load_bundle(bundle).manifest["encoder_backend"] == "torch"  # no backend given: the bundle's own


def test_the_cache_keeps_a_query_route_apart_from_a_plain_encode(tiny_model_dir, tmp_path, monkeypatch):
    """A model with a query prompt: its query-route embedding of a text is not its plain embedding, and the cache
    must not hand one out for the other."""
    from sentence_transformers import SentenceTransformer

    from embtune.retrieval.encoder import encode

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    model = SentenceTransformer(str(tiny_model_dir), device="cpu",
                                prompts={"query": "alpha beta gamma ", "document": ""})
    texts = ["delta epsilon", "zeta eta"]
    query = encode(model, texts, cache_key="k", role="query")
    plain = encode(model, texts, cache_key="k")
    assert not np.allclose(query, plain)
    np.testing.assert_array_equal(plain, encode(model, texts))
    np.testing.assert_array_equal(query, encode(model, texts, cache_key="k", role="query"))


def test_the_relative_margin_guard_holds_for_negative_scores():
    """Dot-product scores can be negative: a candidate scoring above the positive is within any margin of it."""
    from embtune.data_prep.mining import Guards, Ranking, mine_negatives

    corpus = {d: {"title": "", "text": f"document {d}"} for d in ("pos", "above", "close", "far")}
    texts = {d: document_text(doc) for d, doc in corpus.items()}
    scores_of = np.array([-10.0, -9.8, -10.3, -20.0])  # pos, above, close (within 5%), far

    ranking = Ranking(np.array([[1, 0, 2, 3]]), np.array([[-9.8, -10.0, -10.3, -20.0]]),
                      lambda row, docs: scores_of[np.asarray(docs)], "dot", 4)
    rows, report = mine_negatives(corpus, {"q": "query"}, {"q": {"pos": 1}}, texts, num_negatives=1, rank_end=4,
                                  ranking=ranking, guards=Guards(margin=0.05), on_short="drop")
    assert report.dropped["margin"] == 2  # "above" and "close"
    assert rows[0]["negative_1_id"] == "far"
    from embtune.data_prep.mining import margin_floor

    assert margin_floor(-10.0, 0.05) == pytest.approx(-10.5) and margin_floor(10.0, 0.05) == pytest.approx(9.5)


def test_eval_fingerprints_the_probe_weights_and_the_title_handling(tiny_beir):
    from embtune.eval.run import stage_config

    common = ["data.format=beir", f"data.path={tiny_beir}", "data.queries=labelfree"]
    base = stage_config(load_config(None, common), {})
    for override in ("labelfree.probe_weights=[0.5,1.0]", "mining.include_title=false"):
        assert stage_config(load_config(None, [*common, override]), {}) != base, override
