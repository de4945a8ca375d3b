"""An asymmetric model (a sentence-transformers Router, as label-free training saves it) is scored through its query
route everywhere queries are encoded: eval.choose and the RAG check, not only eval and serve."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, tiny_model_dir):
    """A Router whose query route is another tiny model (seed 1) and whose document route is ``tiny_model_dir``:
    the two routes rank the corpus differently, so a query encoded through the wrong route shows."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.router import Router

    folder = tmp_path_factory.mktemp("router")
    other = SentenceTransformer(str(build_tiny_model(folder / "query_side", seed=1)), device="cpu")
    base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    router = Router.for_query_document(query_modules=[other[i] for i in range(len(other))],
                                       document_modules=[base[i] for i in range(len(base))])
    SentenceTransformer(modules=[router], device="cpu").save(str(folder / "model"))
    return folder / "model"


def expected_rankings(router_dir, doc_texts, query_texts, k):
    """(ranking through the query route, ranking through the document route), doc rows per query."""
    from sentence_transformers import SentenceTransformer

    from embtune.retrieval.encoder import encode

    model = SentenceTransformer(str(router_dir), device="cpu")
    doc_emb = encode(model, doc_texts, role="document")  # (n_docs, dim)
    out = []
    for role in ("query", "document"):
        scores = encode(model, query_texts, role=role) @ doc_emb.T  # (n_queries, n_docs)
        out.append([list(np.argsort(-row, kind="stable")[:k]) for row in scores])
    return out


def test_rag_retrieves_through_the_query_route(tmp_path, tiny_beir, router_dir, monkeypatch):
    from embtune.dataio import document_text, load_corpus
    from embtune.eval.rag import retrieve

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    queries = ["star planet orbit", "flour butter sugar", "guitar melody chord", "bank loan market"]
    by_query_route, by_document_route = expected_rankings(router_dir, doc_texts, queries, k=5)
    assert by_query_route != by_document_route  # the routes disagree, so the test can tell them apart
    got = retrieve(str(router_dir), doc_ids, doc_texts, queries, k=5)
    assert got == [[doc_ids[i] for i in rows] for rows in by_query_route]


def test_choose_scores_a_router_through_its_query_route(tmp_path, tiny_beir, router_dir):
    from embtune.dataio import document_text, load_corpus, load_qrels, load_queries, split_dev
    from embtune.eval.choose import choose
    from embtune.schema import load_config

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.5",
                             "eval.choose.timing_documents=8", "eval.choose.resamples=100",
                             "eval.choose.bm25=false", "eval.choose.hybrid=[]",
                             f"eval.choose.out={tmp_path / 'choose.json'}"])
    result = choose(cfg, [str(router_dir)])
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    queries = load_queries(tiny_beir / "queries.jsonl")
    _, dev = split_dev(load_qrels(tiny_beir / "qrels" / "train.tsv", corpus, queries), 0.5, cfg.seed)
    query_ids = sorted(dev)
    doc_ids = list(corpus)
    by_query_route, by_document_route = expected_rankings(
        router_dir, [document_text(corpus[d]) for d in doc_ids], [queries[q] for q in query_ids], k=10)
    from embtune.retrieval.metrics import score_run

    def ndcg(rankings):
        run = {q: {doc_ids[i]: float(10 - r) for r, i in enumerate(rows)} for q, rows in zip(query_ids, rankings)}
        return score_run(dev, run)[1]

    expected, wrong = ndcg(by_query_route), ndcg(by_document_route)
    assert any(abs(expected[q]["ndcg@10"] - wrong[q]["ndcg@10"]) > 1e-9 for q in query_ids)
    got = result["per_query"][str(router_dir)]
    assert got == pytest.approx({q: expected[q]["ndcg@10"] for q in query_ids})
