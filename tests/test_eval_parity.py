"""Eval parity on a tiny fixed case: FAISS + pytrec_eval equal a brute-force search scored by hand."""

import math

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embtune.dataio import document_text, load_beir
from embtune.eval.metrics import evaluate
from embtune.retrieval.encoder import encode, truncate
from embtune.retrieval.index import exact_search, to_run


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
    mean, per_query = evaluate(data.qrels, to_run(query_ids, doc_ids, scores, indices))

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
    mean, _ = evaluate({f"q{i}": {f"d{i}": 1} for i in range(3)},
                       to_run([f"q{i}" for i in range(3)], [f"d{i}" for i in range(3)], scores, indices))
    assert mean["ndcg@10"] == 1.0
