"""Eval parity on a tiny fixed case: FAISS + pytrec_eval equal a brute-force search scored by hand; the library's
evaluation entry (``embtune.eval.evaluate``) reproduces the eval stage's results.json to the last digit."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embtune.dataio import document_text, load_beir
from embtune.retrieval.encoder import encode, truncate
from embtune.retrieval.index import exact_search, to_run
from embtune.retrieval.metrics import score_run


def hand_ndcg10(qrels: dict[str, int], ranked: list[str]) -> float:
    dcg = sum(qrels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(qrels.values(), reverse=True)[:10]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


@pytest.fixture(scope="module")
def encoded(tiny_beir):
    """MiniLM embeddings of the tiny BEIR test split, computed once for the module."""
    from embtune.models import resolve_model

    data = load_beir(tiny_beir, "test")
    model = SentenceTransformer(resolve_model("minilm"), device="cpu")
    doc_ids = list(data.corpus)
    query_ids = sorted(data.qrels)
    docs = encode(model, [document_text(data.corpus[d]) for d in doc_ids])
    queries = encode(model, [data.queries[q] for q in query_ids])
    return data, doc_ids, query_ids, docs, queries


@pytest.mark.slow
@pytest.mark.parametrize("dim", [None, 64])
def test_faiss_and_pytrec_match_brute_force(encoded, dim):
    data, doc_ids, query_ids, docs, queries = encoded
    if dim:
        docs, queries = truncate(docs, dim), truncate(queries, dim)
        assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    scores, indices = exact_search(docs, queries, k=len(doc_ids))
    mean, per_query = score_run(data.qrels, to_run(query_ids, doc_ids, scores, indices))

    brute = queries @ docs.T  # (n_queries, n_docs)
    expected = []
    for i, qid in enumerate(query_ids):
        # score desc, then id desc: pytrec_eval's tie order
        ranked = sorted(doc_ids, key=lambda d: (round(float(brute[i][doc_ids.index(d)]), 5), d), reverse=True)
        expected.append(hand_ndcg10(data.qrels[qid], ranked))
        assert per_query[qid]["ndcg@10"] == pytest.approx(expected[-1], abs=1e-4)
    assert mean["ndcg@10"] == pytest.approx(np.mean(expected), abs=1e-4)


def test_minilm_ranks_the_matching_passage_first(minilm_dir):
    """The PyPI-shipped all-MiniLM-L6-v2 loads offline and retrieves sensibly on a hand-made case."""
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model.max_seq_length = 64
    docs = ["The mitochondria produce ATP for the cell.", "Paris is the capital of France.",
            "Python lists are mutable sequences."]
    queries = ["What is the powerhouse of the cell?", "Which city is France's capital?", "Can a Python list change?"]
    scores, indices = exact_search(encode(model, docs), encode(model, queries), k=3)
    assert indices[:, 0].tolist() == [0, 1, 2]
    mean, _ = score_run({f"q{i}": {f"d{i}": 1} for i in range(3)},
                       to_run([f"q{i}" for i in range(3)], [f"d{i}" for i in range(3)], scores, indices))
    assert mean["ndcg@10"] == 1.0


def test_the_evaluation_entry_gives_the_eval_stages_numbers(tiny_beir, minilm_dir, tmp_path, monkeypatch):
    """A script that evaluates a retriever through ``embtune.eval.evaluate`` gets the very numbers (mean and per
    query, to the last digit) that the eval stage wrote for the same rows: dense at full and a Matryoshka dim, BM25,
    and the fused rows with the weights eval chose."""
    from embtune.eval import Queries, evaluate, score
    from embtune.eval.run import run as run_eval
    from embtune.retrieval.encoder import load_encoder
    from embtune.retrieval.spec import BM25Index, DenseSpec, Retriever, RetrieverSpec
    from embtune.schema import load_config

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=beir", f"data.path={tiny_beir}",
                             f"train.base_model={minilm_dir}", "eval.dims=[384,64]", "eval.hybrid=[rrf,weighted]",
                             "eval.hybrid_weight=0.3", "tracking.report_to=none"])
    results = json.loads(Path(run_eval(cfg)["results"]).read_text())
    assert set(results["results"]) == {"base", "bm25", "base+bm25_rrf", "base+bm25_weighted"}

    data = load_beir(tiny_beir, "test")
    doc_ids = list(data.corpus)
    doc_texts = [document_text(data.corpus[d]) for d in doc_ids]
    model, key = load_encoder(str(minilm_dir))
    doc_emb = encode(model, doc_texts, 64, cache_key=key, role="document")
    queries = {q: data.queries[q] for q in sorted(data.qrels)}
    specs = {row: RetrieverSpec.from_dict(spec) for row, spec in results["specs"].items()}
    retriever = Retriever(specs["base"], doc_ids, doc_texts, doc_emb, bm25=BM25Index(doc_texts, cfg.bm25))
    encoded = Queries.of(queries, model)  # one query per batch, role query: eval's encode
    for row, spec in specs.items():
        got = evaluate(retriever, encoded, data.qrels, spec=spec, name=row, k=cfg.eval.top_k)
        expected = {k: v for k, v in results["results"][row].items() if k not in ("dims", "dim")}
        assert got.metrics == expected, row
        assert got.per_query == results["per_query"][row], row
        assert got.spec == spec and got.name == row and set(got.run) == set(queries)
    # the 64-dim row: the same retriever at another dense dim
    at_64 = evaluate(retriever, queries, data.qrels, model=model, k=cfg.eval.top_k,
                     spec=specs["base"].replace(dense=DenseSpec(model=specs["base"].dense.model, dim=64)))
    assert at_64.metrics == results["results"]["base"]["dims"]["64"]
    # a run made elsewhere scores the same through score()
    assert score(data.qrels, at_64.run).metrics == at_64.metrics
    assert at_64.percent()["ndcg@10"] == round(100 * at_64.metrics["ndcg@10"], 2)


def test_evaluate_refuses_a_dense_spec_without_a_query_encoder(tiny_beir):
    from embtune.eval import evaluate
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    retriever = Retriever(RetrieverSpec(dense=DenseSpec()), ["a", "b"], ["x", "y"], np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="pass model="):
        evaluate(retriever, {"q": "x"}, {"q": {"a": 1}})
