"""Mining backends, dense/hybrid candidates, false-negative guards and bad input (tiny data, offline)."""

import json
import random

import numpy as np
import pytest

from embtune.data_prep.mining import Guards, bm25_ranking, dense_ranking, fuse, mine_negatives, normalized_hash
from embtune.retrieval.bm25 import BM25Tokenizer


def make_corpus(n=80, seed=0):
    rng = random.Random(seed)
    words = "apple banana cherry grape lemon mango melon olive peach pear plum".split() + [f"w{i}" for i in range(200)]
    corpus = {f"d{i}": {"title": "", "text": " ".join(rng.choice(words) for _ in range(12))} for i in range(n)}
    corpus["dup-a"] = {"title": "", "text": corpus["d0"]["text"].upper() + "!"}  # duplicate of a positive
    corpus["dup-b"] = {"title": "", "text": corpus["d5"]["text"] + " ."}  # duplicate of another document
    return corpus


def queries_and_qrels(corpus, n=20):
    queries = {f"q{i}": corpus[f"d{i}"]["text"][:40] for i in range(n)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n)}
    return queries, qrels


def random_embeddings(texts, dim=16, seed=0):
    """Bag-of-words random projections: similar texts get similar vectors, like a (bad) encoder."""
    rng = np.random.default_rng(seed)
    vocab: dict[str, np.ndarray] = {}
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        for token in text.lower().split():
            out[i] += vocab.setdefault(token, rng.standard_normal(dim).astype(np.float32))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def dense_setup(corpus, queries, qrels, depth=30):
    texts = {d: doc["text"] for d, doc in corpus.items()}
    doc_emb = random_embeddings(list(texts.values()))
    query_emb = random_embeddings([queries[q] for q in qrels])
    return texts, doc_emb, query_emb


def test_fast_backend_is_default_and_gives_the_reference_table():
    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries, qrels = queries_and_qrels(corpus)
    for sampling in ("top", "random"):
        fast, fast_report = mine_negatives(corpus, queries, qrels, texts, num_negatives=4, rank_start=2,
                                           rank_end=25, sampling=sampling)
        ref, ref_report = mine_negatives(corpus, queries, qrels, texts, num_negatives=4, rank_start=2,
                                         rank_end=25, sampling=sampling, bm25_backend="rank_bm25")
        assert fast == ref
        assert fast_report.to_dict(per_query=True) == ref_report.to_dict(per_query=True)


def test_bm25_guard_scores_match_between_backends():
    corpus = make_corpus()
    texts = [doc["text"] for doc in corpus.values()]
    tokenizer = BM25Tokenizer(token_pattern=r"\w+", stopwords="english", stemmer="english")
    fast = bm25_ranking(texts, ["apple pear w3", "plum"], 10, "fast", tokenizer)
    ref = bm25_ranking(texts, ["apple pear w3", "plum"], 10, "rank_bm25", tokenizer)
    assert (fast.indices == ref.indices).all()
    docs = np.array([0, 3, 7, 50, len(texts) - 1])
    for row in range(2):
        np.testing.assert_allclose(fast.score_docs(row, docs), ref.score_docs(row, docs), atol=1e-12)


@pytest.mark.parametrize("method", ["dense", "hybrid-rrf", "hybrid-weighted"])
def test_dense_and_hybrid_never_return_positives_or_duplicates(method):
    corpus = make_corpus()
    queries, qrels = queries_and_qrels(corpus)
    queries = {q: corpus[f"d{q[1:]}"]["text"] for q in queries}  # the whole positive: it and its duplicate rank top
    qrels["q5"] = {"d5": 1, "d6": 1}
    texts, doc_emb, query_emb = dense_setup(corpus, queries, qrels)
    ranking = dense_ranking(doc_emb, query_emb, 30)
    if method.startswith("hybrid"):
        bm25 = bm25_ranking(list(texts.values()), [queries[q] for q in qrels], 30)
        ranking = fuse(bm25, ranking, 30, fusion=method.split("-")[1])
    rows, report = mine_negatives(corpus, queries, qrels, texts, method="dense", num_negatives=5, rank_end=30,
                                  ranking=ranking)
    assert len(rows) == 21
    for row in rows:
        positives = set(qrels[row["query_id"]])
        positive_hashes = {normalized_hash(texts[p]) for p in positives}
        negative_hashes = set()
        for n in range(1, 6):
            neg = row[f"negative_{n}_id"]
            assert neg not in positives and normalized_hash(texts[neg]) not in positive_hashes
            negative_hashes.add(normalized_hash(texts[neg]))
        assert len(negative_hashes) == 5  # no two negatives of a row are the same passage
    # q0's positive d0 has a duplicate (dup-a); q5's d5 has one (dup-b): both are ranked near the top and dropped
    assert report.dropped["positive"] >= 20 and report.dropped["duplicate_of_positive"] >= 2


def test_rrf_and_weighted_fusion_orders():
    from embtune.data_prep.mining import Ranking

    def ranking(order, scores_by_doc):
        scores = np.array([[scores_by_doc[d] for d in order]])
        return Ranking(np.array([order]), scores, lambda row, docs: np.array([scores_by_doc[int(d)] for d in docs]),
                       "x")

    bm25 = ranking([0, 1, 2], {0: 9.0, 1: 5.0, 2: 4.0, 3: 0.0})
    dense = ranking([3, 1, 0], {0: 0.1, 1: 0.8, 2: 0.0, 3: 0.9})
    # RRF (k=60, weights .5): doc0 1/61 + 1/63 (.032266) > doc1 2/62 (.032258) > doc3 1/61 > doc2 1/63
    assert fuse(bm25, dense, 4, "rrf").indices[0].tolist() == [0, 1, 3, 2]
    # weighted: the core's formula (embtune.retrieval.fusion.weighted_fuse, corpus z-scores, weights .5/.5; a
    # document one list lacks gets that list's lowest). BM25 z over the 4 docs: 1.406, .156, -.156, (-1.406);
    # dense z: -.895, .895, (-1.151), 1.151. doc1 .525 > doc3 (1.151 - .156)/2 = .497 > doc0 .255 > doc2 -.525
    fused = fuse(bm25, dense, 4, "weighted")
    assert fused.indices[0].tolist() == [1, 3, 0, 2]
    np.testing.assert_allclose(fused.scores[0], [0.8, 0.9, 0.1, 0.0])  # guard scores are the dense ones


def test_ivf_recall_against_exact():
    from embtune.retrieval.index import search

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 32)).astype(np.float32)  # clustered, as real embeddings are
    docs = centers[rng.integers(0, 50, 4000)] + 0.5 * rng.standard_normal((4000, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:100] + 0.3 * rng.standard_normal((100, 32)).astype(np.float32)
    _, exact = search(docs, queries, 10, "flat")
    _, approx = search(docs, queries, 10, "ivf", nlist=64, nprobe=16)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    _, one_probe = search(docs, queries, 10, "ivf", nlist=64, nprobe=1)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(one_probe, exact)]) < recall


def test_margin_and_max_score_guards_drop_and_count():
    corpus = make_corpus()
    queries, qrels = queries_and_qrels(corpus)
    texts, doc_emb, query_emb = dense_setup(corpus, queries, qrels)
    ranking = dense_ranking(doc_emb, query_emb, 30)
    doc_ids = list(corpus)
    query_ids = list(qrels)
    for guards, name in [(Guards(margin=0.1), "margin"), (Guards(max_score=0.3), "max_score")]:
        rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=3, rank_end=30, ranking=ranking,
                                      guards=guards, on_short="drop")
        expected = 0
        for qi, q in enumerate(query_ids):
            pos = doc_ids.index(f"d{qi}")
            pos_score = float(doc_emb[pos] @ query_emb[qi])
            for index, score in zip(ranking.indices[qi], ranking.scores[qi]):
                same_text = normalized_hash(texts[doc_ids[index]]) == normalized_hash(texts[f"d{qi}"])
                if doc_ids[index] == f"d{qi}" or same_text:
                    continue
                bad = score >= pos_score * 0.9 if name == "margin" else score > 0.3
                expected += bad
        assert report.dropped[name] == expected > 0
        for row in rows:
            qi = query_ids.index(row["query_id"])
            pos_score = float(doc_emb[doc_ids.index(row["positive_id"])] @ query_emb[qi])
            for n in range(1, 4):
                score = float(doc_emb[doc_ids.index(row[f"negative_{n}_id"])] @ query_emb[qi])
                assert (score < pos_score * 0.9) if name == "margin" else (score <= 0.3)


def test_queries_left_without_negatives_are_dropped_or_filled():
    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries, qrels = queries_and_qrels(corpus, n=6)
    # BM25 scores are >= 0 and every window candidate scores above -1: max_score=-1 filters everything.
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=2, rank_end=10,
                                  guards=Guards(max_score=-1.0), on_short="drop")
    assert rows == [] and report.dropped_queries == 6 and report.short_queries == 6
    assert all(q["dropped"] and q["passed"] == 0 for q in report.per_query)
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=2, rank_end=10,
                                  guards=Guards(max_score=-1.0), on_short="random")
    assert len(rows) == 6 and report.filled_random == 12 and report.dropped_queries == 0


def test_empty_and_duplicate_documents_are_never_negatives():
    corpus = make_corpus(n=30)
    for i in range(5):
        corpus[f"empty{i}"] = {"title": "", "text": "  "}
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries, qrels = queries_and_qrels(corpus, n=10)
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=6, rank_end=len(corpus))
    assert report.empty_documents == 5 and report.duplicate_documents == 2
    assert report.dropped["empty_document"] == 50  # every empty document is in every full-corpus window
    for row in rows:
        negs = [row[f"negative_{n}_id"] for n in range(1, 7)]
        assert not any(n.startswith("empty") for n in negs)
        assert len({normalized_hash(texts[n]) for n in negs}) == 6


def write_beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as handle:
        for doc_id, doc in corpus.items():
            handle.write(json.dumps({"_id": doc_id, **doc}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for qid, text in queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / "train.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for doc_id, rel in docs.items():
                handle.write(f"{qid}\t{doc_id}\t{rel}\n")


def test_stage_with_bad_input_finishes_and_reports(tmp_path):
    from embtune.data_prep.run import run
    from embtune.schema import load_config

    corpus = make_corpus(n=30)
    corpus["empty"] = {"title": "a title only", "text": ""}  # empty once titles are left out
    queries, qrels = queries_and_qrels(corpus, n=8)
    queries["qx"] = "zzz unknown words"
    qrels["qx"] = {"d9": 1}
    write_beir(tmp_path / "beir", corpus, queries, qrels)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'beir'}", "mining.num_negatives=2",
                             "mining.rank_end=5", "mining.margin=0.0", "mining.on_short=drop",
                             "mining.include_title=false"])
    outputs = run(cfg)
    report = json.loads(open(outputs["mining_report"]).read())
    # qx matches no document: every candidate scores 0 >= its positive's 0, so the margin guard empties its window
    assert report["queries_dropped"] >= 1
    assert {"query_id": "qx", "window": 5, "passed": 0, "chosen": 0, "random_fill": 0,
            "dropped": True} in report["per_query"]
    assert report["dropped"]["margin"] > 0 and report["empty_documents"] == 1
    assert report["duplicate_documents"] == 2
    from datasets import load_from_disk

    table = load_from_disk(outputs["train_table"])
    assert "qx" not in table["query_id"] and len(table) == 9 - report["queries_dropped"]


@pytest.mark.parametrize("override, key, reason", [
    ("mining.method=faiss", "mining.method", "expects one of"),
    ("mining.margin=1.5", "mining.margin", "must be in [0, 1)"),
    ("bm25.stopwords=french", "bm25.stopwords", "must be '' or 'english'"),
    ("mining.teacher_margin=1.0", "mining.teacher_margin", "need mining.teacher to be set"),
    ("mining.fusion=max", "mining.fusion", "expects one of"),
    ("mining.candidate_depth=5", "mining.candidate_depth", "must be 0 or >= mining.rank_end"),
])
def test_config_rejects_bad_mining_values(override, key, reason):
    from embtune.config import ConfigError
    from embtune.schema import load_config

    # data.path is set, so the error is the override's own and not the missing BEIR folder's.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", override])
    assert err.value.key == key and reason in err.value.reason
    assert f"override '{override}'" in str(err.value)  # where the bad value came from


def test_exact_search_without_faiss_matches_faiss(monkeypatch):
    from embtune.retrieval import index

    rng = np.random.default_rng(1)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    scores, indices = index.search(docs, queries, 10)
    monkeypatch.setattr(index, "faiss", None)
    fallback_scores, fallback_indices = index.search(docs, queries, 10)
    np.testing.assert_array_equal(fallback_indices, indices)
    np.testing.assert_allclose(fallback_scores, scores, rtol=1e-5)
    with pytest.raises(ImportError, match="needs faiss"):
        index.search(docs, queries, 10, index="ivf")


def test_exact_search_without_faiss_says_so_once(monkeypatch, caplog):
    from embtune.retrieval import index

    monkeypatch.setattr(index, "faiss", None)
    index._say_no_faiss.cache_clear()
    docs = np.eye(4, dtype=np.float32)
    with caplog.at_level("WARNING", logger="embtune.retrieval.index"):
        for _ in range(3):
            index.search(docs, docs[:1], 2)
    assert [r.message for r in caplog.records].count("faiss is not installed: exact search with numpy") == 1


def test_retriever_dense_index_without_faiss_matches_faiss(monkeypatch):
    """eval and serve search through spec.DenseIndex: without faiss (a slim GPU box) it must rank as faiss does."""
    from embtune.retrieval import index
    from embtune.retrieval.spec import DenseIndex

    rng = np.random.default_rng(2)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    allowed = np.sort(rng.choice(300, 40, replace=False)).astype(np.int64)
    with_faiss = DenseIndex(docs, 8, "fp32")
    expected = [with_faiss.search(queries, 10), with_faiss.search(queries, 10, allowed=allowed)]
    monkeypatch.setattr(index, "faiss", None)
    fallback = DenseIndex(docs, 8, "fp32")
    for (scores, indices), got in zip(expected, [fallback.search(queries, 10),
                                                 fallback.search(queries, 10, allowed=allowed)]):
        np.testing.assert_array_equal(got[1], indices)
        np.testing.assert_allclose(got[0], scores, rtol=1e-5)
    with pytest.raises(ImportError, match="needs faiss"):
        DenseIndex(docs, 8, "int8")
