"""RetrieverSpec (JSON round trip, errors that name the key) and the Retriever (same ranking for a query alone or in a
batch; members equal to the core pieces they wrap; filters; int8; rerank). Seeded data, no model."""

from __future__ import annotations

import numpy as np
import pytest

from embtune.config import ConfigError
from embtune.retrieval.bm25 import BM25Config, FastBM25, bm25_search, build_tokenizer
from embtune.retrieval.encoder import normalize
from embtune.retrieval.fusion import ScoreStats, fuse, ranked
from embtune.retrieval.index import exact_search, to_run
from embtune.retrieval.spec import DenseSpec, FusionSpec, RerankSpec, Retriever, RetrieverSpec

WORDS = "star planet orbit oven flour butter guitar melody chord bank loan price cell dose vaccine team goal".split()
WORDS += [f"w{i}" for i in range(300)]  # rare words, so that BM25 scores differ (few exact ties)
PLAIN = BM25Config(stemmer="", stopwords="")


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    doc_texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(400)]
    doc_ids = [f"d{i:03d}" for i in range(400)]
    doc_emb = normalize(rng.standard_normal((400, 32)).astype(np.float32))  # (docs, 32)
    query_texts = [" ".join(rng.choice(WORDS, 3)) for _ in range(40)]  # 40 > FAISS's BLAS threshold (20)
    query_emb = normalize(rng.standard_normal((40, 32)).astype(np.float32))
    return doc_ids, doc_texts, doc_emb, query_texts, query_emb


def hybrid(method="weighted", **fusion) -> RetrieverSpec:
    return RetrieverSpec(dense=DenseSpec(dim=32), bm25=PLAIN, fusion=FusionSpec(method=method, depth=50, **fusion))


def test_spec_json_round_trip(tmp_path):
    spec = hybrid(dense_weight=0.7).replace(rerank=RerankSpec(model="some/cross-encoder", top_k=20))
    assert RetrieverSpec.load(spec.save(tmp_path / "retriever.json")) == spec
    assert RetrieverSpec.from_dict(RetrieverSpec(dense=None, bm25=BM25Config()).to_dict()).dense is None
    assert spec.describe() == ("dense 32d fp32 + bm25, weighted (dense 0.7) @ 50, rerank top 20 with "
                               "some/cross-encoder")


@pytest.mark.parametrize("data, message", [
    ({"dense": {"dims": 64}}, "unknown key 'dense.dims'"),
    ({"fusion": {"method": "sum"}}, "key 'fusion.method' expects one of 'none' | 'weighted' | 'rrf'"),
    ({"bm25": {"k1": 1.2}}, "fusion.method must be 'weighted' or 'rrf', not 'none'"),
    ({"fusion": {"method": "rrf"}}, "fusion.method 'rrf' fuses dense with bm25, but only dense is set"),
    ({"dense": None}, "needs dense, bm25 or both"),
    ({"dense": {"precision": "int4"}}, "key 'dense.precision' expects one of 'fp32' | 'int8'"),
    ({"bm25": {"stopwords": "french"}, "dense": None}, "bm25.stopwords must be '' or 'english'"),
    ({"fusion": {"dense_weight": 1.5}}, "fusion.dense_weight must be in [0, 1]"),
])
def test_spec_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        RetrieverSpec.from_dict(data, "bundle/retriever.json")
    assert message in str(error.value) and "bundle/retriever.json" in str(error.value)


def test_spec_file_error_names_the_line(tmp_path):
    path = tmp_path / "retriever.json"
    path.write_text('{\n  "dense": {"dim": 32},\n  "fuse": {}\n}\n')
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown key 'fuse'"):
        RetrieverSpec.load(path)


@pytest.mark.parametrize("spec", [RetrieverSpec(dense=DenseSpec()), RetrieverSpec(dense=None, bm25=PLAIN),
                                  hybrid("weighted"), hybrid("rrf")], ids=["dense", "bm25", "weighted", "rrf"])
def test_a_query_alone_ranks_as_in_a_batch(corpus, spec):
    """What makes serve (one query per request) equal eval (all queries at once)."""
    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb)
    batch = retriever.search(query_texts, query_emb, 10)
    for i in range(len(query_texts)):
        alone = retriever.search(query_texts[i:i + 1], query_emb[i:i + 1], 10)["0"]
        assert list(alone.items()) == [(d, batch[str(i)][d]) for d in ranked(batch[str(i)])]


def test_members_are_the_core_pieces(corpus):
    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    qids = [f"q{i}" for i in range(len(query_texts))]
    retriever = Retriever(hybrid(dense_weight=0.6), doc_ids, doc_texts, doc_emb)
    dense = to_run(qids, doc_ids, *exact_search(doc_emb, query_emb, 50))
    sparse = to_run(qids, doc_ids, *bm25_search(doc_texts, query_texts, 50, PLAIN))
    got_bm25 = retriever.search(query_texts, None, 50, qids, spec=RetrieverSpec(dense=None, bm25=PLAIN))
    assert {q: ranked(r) for q, r in got_bm25.items()} == {q: ranked(r) for q, r in sparse.items()}
    got_dense = retriever.search(query_texts, query_emb, 10, qids, spec=RetrieverSpec())
    assert {q: ranked(r) for q, r in got_dense.items()} == {q: ranked(r, 10) for q, r in dense.items()}
    # The default normalization reads each query's scores over the whole corpus: a matrix product and FastBM25.
    tokenizer = build_tokenizer(PLAIN)
    index = FastBM25(tokenizer.tokenize_many(doc_texts), k1=PLAIN.k1, b=PLAIN.b)
    stats = {"dense": {q: ScoreStats.of(doc_emb @ e) for q, e in zip(qids, query_emb)},
             "sparse": {q: ScoreStats.of(index.get_scores(tokenizer(t))) for q, t in zip(qids, query_texts)}}
    expected = fuse("weighted", dense, sparse, dense_weight=0.6, depth=50, stats=stats)
    got = retriever.search(query_texts, query_emb, 10, qids)
    assert {q: ranked(r) for q, r in got.items()} == {q: ranked(r, 10) for q, r in expected.items()}
    # The BM25 index was built once for both specs that use these settings.
    assert len(retriever._bm25) == 1


def test_filter_returns_only_allowed_documents_in_unfiltered_order(corpus):
    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    allowed = np.arange(0, 400, 3)
    allowed_ids = {doc_ids[i] for i in allowed}
    for spec in (RetrieverSpec(), RetrieverSpec(dense=None, bm25=PLAIN)):
        retriever = Retriever(spec, doc_ids, doc_texts, doc_emb)
        full = retriever.search(query_texts, query_emb, 400)
        got = retriever.search(query_texts, query_emb, 10, allowed=allowed)
        for qid, docs in got.items():
            expected = [d for d in ranked(full[qid]) if d in allowed_ids][:10]
            assert [docs[d] for d in ranked(docs)] == [full[qid][d] for d in expected]
            # Documents tied at the 10th score may be others (each member cuts ties in its own order).
            cut = full[qid][expected[-1]]
            assert [d for d in ranked(docs) if docs[d] > cut] == [d for d in expected if full[qid][d] > cut]


def test_int8_keeps_most_of_the_fp32_top10(corpus):
    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    retriever = Retriever(RetrieverSpec(), doc_ids, doc_texts, doc_emb)
    fp32 = retriever.search(query_texts, query_emb, 10)
    int8 = retriever.search(query_texts, query_emb, 10, spec=RetrieverSpec(dense=DenseSpec(precision="int8")))
    overlap = np.mean([len(set(fp32[q]) & set(int8[q])) / 10 for q in fp32])
    assert overlap >= 0.9, overlap


def liked(text: str) -> bool:
    return any(word in text.split() for word in WORDS[:17])


class Oracle:
    def predict(self, pairs, batch_size=32, **kwargs):
        return np.array([1.0 if liked(doc) else 0.0 for _, doc in pairs])


def test_rerank_promotes_within_top_k(corpus):
    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    spec = RetrieverSpec(rerank=RerankSpec(model="oracle", top_k=20))
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb, scorer=Oracle())
    first = retriever.search(query_texts, query_emb, 20, spec=RetrieverSpec())
    got = retriever.search(query_texts, query_emb, 10)
    text = dict(zip(doc_ids, doc_texts))
    moved = 0
    for qid, docs in got.items():
        head = ranked(first[qid])
        promoted = [d for d in head if liked(text[d])]
        # Equal cross-encoder scores tie-break by id, descending (pytrec_eval's order, fusion.ranked).
        expected = sorted(promoted, reverse=True) + sorted(set(head) - set(promoted), reverse=True)
        assert ranked(docs) == expected[:10]
        moved += ranked(docs) != head[:10]
    assert moved > len(got) / 2


def test_duplicate_document_ids_are_refused(corpus):
    doc_ids, doc_texts, doc_emb, *_ = corpus
    with pytest.raises(ValueError, match="'d000' occurs more than once"):
        Retriever(RetrieverSpec(), ["d000", *doc_ids[1:-1], "d000"], doc_texts, doc_emb)


class _Held:
    """Embeddings that only implement ``ShardedEmbeddings`` (as the Ray engine's ``ShardSet`` does), over a matrix:
    the core takes them without naming the engine that keeps them."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix, self.built = matrix, []

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def dense_index(self, dim: int, precision: str):
        from embtune.retrieval.spec import DenseIndex

        self.built.append((dim, precision))
        return DenseIndex(self.matrix, dim, precision)

    def with_rows(self, rows, vectors) -> "_Held":
        out = self.matrix.copy()
        out[list(rows)] = vectors
        return _Held(out)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.matrix[rows]


def test_sharded_embeddings_are_searched_through_their_own_index(corpus, tmp_path):
    from embtune.retrieval.encoder import save_matrix
    from embtune.retrieval.spec import replace_rows, row_vectors

    doc_ids, doc_texts, doc_emb, query_texts, query_emb = corpus
    held = replace_rows(_Held(doc_emb), [5], doc_emb[[6]])
    assert isinstance(held, _Held) and np.array_equal(row_vectors(held, [5, 6]), doc_emb[[6, 6]])
    want = replace_rows(doc_emb, [5], doc_emb[[6]])
    for spec in (RetrieverSpec(dense=DenseSpec(dim=16)), hybrid()):
        assert (Retriever(spec, doc_ids, doc_texts, held).search(query_texts, query_emb, 10)
                == Retriever(spec, doc_ids, doc_texts, want).search(query_texts, query_emb, 10))
    assert held.built == [(16, "fp32"), (32, "fp32")]

    class Shards(_Held):  # save_matrix reads what is not a matrix shard by shard: (start, ids, vectors)
        def __iter__(self):
            yield from ((start, [], self.matrix[start:start + 150]) for start in range(0, len(self.matrix), 150))

    np.testing.assert_array_equal(np.load(save_matrix(Shards(doc_emb), tmp_path / "m.npy")), doc_emb)
