"""FastBM25 must rank and score exactly like rank_bm25.BM25Okapi (the reference for hard-negative mining)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from embtune.retrieval import bm25 as fast_bm25
from embtune.retrieval.bm25 import BM25Tokenizer, FastBM25, top_k_rank_bm25

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beir" / "scifact"


def seeded_corpus(seed: int, n_docs: int = 80, vocab_size: int = 40) -> list[list[str]]:
    """Documents with repeated terms, two terms in more than half of the documents, and an empty document."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    # Zipf-like frequencies so that some terms repeat within documents and a few are in most documents.
    probs = 1.0 / np.arange(1, vocab_size + 1)
    probs /= probs.sum()
    docs = [list(rng.choice(vocab, size=int(rng.integers(1, 25)), p=probs)) for _ in range(n_docs)]
    for doc in docs[: int(n_docs * 0.7)]:
        doc.extend(["common", "frequent", "frequent"])
    docs[5] = []
    docs[17] = list(docs[3])  # an exact duplicate: ties broken by doc index
    return docs


def seeded_queries(seed: int, n_queries: int = 60) -> list[list[str]]:
    rng = np.random.default_rng(seed + 1)
    vocab = [f"w{i}" for i in range(40)] + ["common", "frequent", "unknown_term"]
    queries = [list(rng.choice(vocab, size=int(rng.integers(1, 8)))) for _ in range(n_queries)]
    queries += [[], ["unknown_term"], ["w1", "w1", "w1", "w2"], ["common"], ["frequent", "w0"]]
    return queries


def assert_same_ranking(reference: BM25Okapi, fast: FastBM25, queries, k: int, **search_kwargs) -> None:
    ref_scores, ref_indices = top_k_rank_bm25(reference, queries, k)
    fast_scores, fast_indices = fast.search(queries, k, **search_kwargs)
    np.testing.assert_array_equal(fast_indices, ref_indices)
    np.testing.assert_allclose(fast_scores, ref_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_rank_bm25_on_every_document(seed):
    docs = seeded_corpus(seed)
    reference, fast = BM25Okapi(docs), FastBM25(docs)
    # The epsilon floor must be exercised: terms in >half the documents have a negative raw idf.
    assert fast.idf[fast.vocab["common"]] == pytest.approx(0.25 * reference.average_idf)
    assert reference.average_idf == pytest.approx(fast.average_idf, abs=1e-12)
    for query in seeded_queries(seed):
        np.testing.assert_allclose(fast.get_scores(query), reference.get_scores(query), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_top_k_equals_rank_bm25(seed, k):
    docs = seeded_corpus(seed)
    assert_same_ranking(BM25Okapi(docs), FastBM25(docs), seeded_queries(seed), k, batch_size=7)


@pytest.mark.parametrize("params", [dict(k1=0.9, b=0.4, epsilon=0.1), dict(k1=2.0, b=1.0, epsilon=0.5),
                                    dict(k1=1.2, b=0.0, epsilon=0.0)])
def test_non_default_parameters(params):
    docs = [doc for doc in seeded_corpus(3) if doc]  # b == 1 makes rank-bm25 score empty documents nan
    assert_same_ranking(BM25Okapi(docs, **params), FastBM25(docs, **params), seeded_queries(3), 10)


def test_empty_and_unknown_queries_score_zero_and_rank_by_index():
    docs = seeded_corpus(0)
    scores, indices = FastBM25(docs).search([[], ["unknown_term", "another"]], k=4)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(scores, np.zeros((2, 4)))


def test_ties_are_broken_by_doc_index():
    docs = [["b"], ["a", "x"], ["c"], ["a", "x"], ["a", "x"]]
    scores, indices = FastBM25(docs).search([["a"]], k=5)
    # Documents 1, 3 and 4 tie; the non-matching ones follow with score 0, in corpus order.
    np.testing.assert_array_equal(indices[0], [1, 3, 4, 0, 2])
    assert scores[0, 0] == scores[0, 1] == scores[0, 2] > 0 == scores[0, 3]


def test_fewer_matches_than_k_and_negative_scores_rank_like_rank_bm25():
    # Most terms are in more than half of the documents, so average_idf < 0 and the floored idf is negative:
    # matching documents score below the zero-score ones.
    common = ["a", "b", "c", "f", "g"]  # in 5 of 6 documents: idf = log(1.5 / 5.5) < 0
    docs = [common, common[:4], list(common), common + ["d"], ["e", "a", "b", "c", "f", "g"], ["e"]]
    reference, fast = BM25Okapi(docs), FastBM25(docs)
    assert reference.average_idf < 0 and fast.idf[fast.vocab["a"]] < 0
    for k in (1, 2, 6):  # k=1, 2: the sparse row has k entries, but zero-score documents outrank them
        assert_same_ranking(reference, fast, [["a"], ["d"], ["a", "d"], ["e", "e"]], k=k)
    assert_same_ranking(reference, fast, [["a"], ["d"]], k=100)  # k beyond the corpus is clipped


def test_zero_idf_term_ties_with_non_matching_documents():
    # df == N / 2 gives idf == log(2.5) - log(2.5) == 0: not floored, so its documents score exactly 0 and tie
    # with the documents that do not contain it.
    docs = [["x"], ["y"], ["z", "y"], ["z", "x"]]
    reference, fast = BM25Okapi(docs), FastBM25(docs)
    assert reference.idf["z"] == 0
    _, indices = fast.search([["z"]], k=1)
    assert indices[0, 0] == 0
    assert_same_ranking(reference, fast, [["z"], ["z", "x"]], k=2)


def test_batches_split_by_posting_budget_give_the_same_result(monkeypatch):
    docs = seeded_corpus(4)
    queries = seeded_queries(4)
    fast = FastBM25(docs)
    expected = fast.search(queries, k=10)
    monkeypatch.setattr(fast_bm25, "MAX_BATCH_POSTINGS", 50)  # forces batches of one or a few queries
    got = fast.search(queries, k=10, batch_size=1000)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_generator_corpus_is_read_once_and_indexed_like_a_list():
    docs = seeded_corpus(5)
    from_list, from_generator = FastBM25(docs), FastBM25(iter(docs))
    query = ["w1", "common", "w7"]
    np.testing.assert_array_equal(from_list.get_scores(query), from_generator.get_scores(query))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        FastBM25([])
    with pytest.raises(ValueError, match="k1"):
        FastBM25([["a"]], k1=0)
    with pytest.raises(ValueError, match="k must be"):
        FastBM25([["a"]]).search([["a"]], k=0)
    with pytest.raises(ValueError, match="stopwords"):
        BM25Tokenizer(stopwords="klingon")
    with pytest.raises(ValueError, match="stemmer"):
        BM25Tokenizer(stemmer="klingon")


def test_default_tokenizer_is_lower_split():
    text = "The Cells, the CELLS.\tand\nrunning"
    assert BM25Tokenizer()(text) == text.lower().split()


def test_tokenizer_options():
    text = "The cells are Running; the cell runs."
    assert BM25Tokenizer(token_pattern=r"\w+")(text) == ["the", "cells", "are", "running", "the", "cell", "runs"]
    assert BM25Tokenizer(token_pattern=r"\w+", stopwords="english")(text) == ["cells", "running", "cell", "runs"]
    assert BM25Tokenizer(token_pattern=r"\w+", stopwords="english", stemmer="english")(text) == [
        "cell", "run", "cell", "run"]
    assert BM25Tokenizer(token_pattern=r"\w+", stopwords=["cells", "cell"])(text) == [
        "the", "are", "running", "the", "runs"]
    assert BM25Tokenizer(lowercase=False, token_pattern=r"\w+")(text)[:2] == ["The", "cells"]


def test_stemming_lets_inflected_queries_match():
    tokenizer = BM25Tokenizer(token_pattern=r"\w+", stopwords="english", stemmer="english")
    texts = ["a dog sleeps", "the runner is running", "cells divide"]
    fast = FastBM25(tokenizer.tokenize_many(texts))
    scores, indices = fast.search([tokenizer("runs")], k=1)
    assert indices[0, 0] == 1 and scores[0, 0] > 0
    plain = FastBM25(BM25Tokenizer().tokenize_many(texts))
    assert plain.search([BM25Tokenizer()("runs")], k=1)[0][0, 0] == 0


@pytest.mark.skipif(not SCIFACT.exists(), reason="BEIR SciFact not available")
@pytest.mark.parametrize("tokenizer", [
    BM25Tokenizer(), BM25Tokenizer(token_pattern=r"\w+", stopwords="english", stemmer="english")])
def test_real_text_parity_on_a_scifact_slice(tokenizer):
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as handle:
        texts = [f"{row['title']} {row['text']}" for row in map(json.loads, (next(handle) for _ in range(400)))]
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as handle:
        queries = [json.loads(next(handle))["text"] for _ in range(40)]
    docs = [tokenizer(text) for text in texts]
    query_tokens = [tokenizer(query) for query in queries]
    assert_same_ranking(BM25Okapi(docs), FastBM25(docs), query_tokens, k=10)
