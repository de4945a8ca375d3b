"""Search a sharded corpus: each shard searched on its own (Ray tasks), the per-shard top-k merged exactly.

Dense: each shard's exact top-k (``embtune.retrieval.index.exact_search``, FAISS ``IndexFlatIP``, whose score of a
(query, document) pair does not depend on the other documents) with its rows offset to corpus rows; merging keeps
the k best by score, then lower row: one process's exact search of the whole matrix, with rows of equal score in row
order (FAISS's heap returns those in no fixed order). The driver holds the queries and the running top-k, never the
corpus matrix.

BM25: rank-bm25's BM25Okapi needs corpus-wide statistics (document frequencies, their mean idf, the average document
length). A first pass over the shards counts them per shard (terms in order of first appearance, so that the
merged vocabulary is the one ``FastBM25`` builds over the whole corpus); the driver sums them and computes each
query term's idf; a second pass scores each shard's documents with those (``FastBM25.from_weights``, the same
float64 arithmetic in the same order) and the per-shard top-k are merged by ``rank_order``. The driver holds the
vocabulary with its frequencies: its size, not the corpus's, is the limit (docs/scale.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from embtune.compute import ComputeConfig
from embtune.compute.shards import ShardSet, apply_overrides, read_shard_file, read_source
from embtune.retrieval.bm25 import BM25Config, FastBM25, build_tokenizer, rank_order, resolve_language
from embtune.retrieval.fusion import ScoreStats

logger = logging.getLogger(__name__)


def map_shards(function: Callable, calls: Sequence[tuple], compute: ComputeConfig,
               shared: dict[str, Any] | None = None) -> Iterator[Any]:
    """``function(*call, **shared)`` for each call, in any order: Ray tasks (``compute.workers`` in flight, each
    with ``threads_per_worker`` CPUs; ``shared`` put in the object store once) or, locally, one after another."""
    shared = shared or {}
    if compute.engine != "ray":
        for call in calls:
            yield function(*call, **shared)
        return
    import ray

    from embtune.compute.shards import connect

    connect(compute)
    remote = ray.remote(function).options(num_cpus=compute.threads_per_worker)
    refs = {name: ray.put(value) for name, value in shared.items()}
    pending, queue = [], list(calls)
    while queue or pending:
        while queue and len(pending) < 2 * compute.workers:  # one queued behind each running task
            pending.append(remote.remote(*queue.pop(0), **refs))
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


# --- dense ----------------------------------------------------------------------------------------------------------

def _dense_shard(path: str, start: int, k: int, overrides: tuple[np.ndarray, np.ndarray] | None, queries: np.ndarray,
                 threads: int, dim: int = 0, one_at_a_time: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from embtune.retrieval.index import exact_search, faiss

    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    _, vectors = read_shard_file(path)
    vectors = apply_overrides(vectors, overrides)
    if one_at_a_time or dim:
        # The core DenseIndex's arithmetic (eval and serve search through it): truncation to ``dim`` row by row and
        # one query per FAISS call, so a (query, document) score is the one a single process computes.
        from embtune.retrieval.spec import DenseIndex

        scores, indices = DenseIndex(vectors, dim, "fp32").search(queries, k)
    else:
        scores, indices = exact_search(vectors, queries, k)  # (n_queries, min(k, rows)) each
    return scores, np.where(indices >= 0, indices + start, -1)


def merge_dense(best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, indices: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two top lists per query: score descending, then lower row (-1 = no document, last)."""
    if best is not None:
        scores = np.concatenate([best[0], scores], axis=1)
        indices = np.concatenate([best[1], indices], axis=1)
    key = np.where(indices >= 0, -scores, np.inf)
    order = np.lexsort((indices, key), axis=1)[:, :k]  # (n_queries, k)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def dense_search(shards: ShardSet, query_emb: np.ndarray, k: int, compute: ComputeConfig, dim: int = 0,
                 one_at_a_time: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product over every shard: (scores float32, corpus rows int64), each
    (n_queries, min(k, rows)), as ``embtune.retrieval.index.exact_search`` over the whole matrix returns them
    (``one_at_a_time`` or ``dim``: as the core ``DenseIndex`` at that Matryoshka dim returns them)."""
    from tqdm.auto import tqdm

    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)  # (n_queries, dim)
    calls = [(str(shards.path(start)), start, k, shards.shard_overrides(start))
             for start in shards.starts]
    shared = {"queries": query_emb, "threads": compute.threads_per_worker, "dim": dim, "one_at_a_time": one_at_a_time}
    best = None
    for scores, indices in tqdm(map_shards(_dense_shard, calls, compute, shared), total=len(calls),
                                desc="dense search", unit="shard", disable=len(calls) < 10):
        best = merge_dense(best, scores, indices, k)
    return best


def _stats_shard(path: str, start: int, overrides: tuple[np.ndarray, np.ndarray] | None, queries: np.ndarray,
                 dim: int) -> tuple[int, np.ndarray]:
    """Per query: (count, mean, sum of squared deviations, min, max) of its scores over one shard, (n_queries, 5)."""
    from embtune.retrieval.encoder import truncate

    _, vectors = read_shard_file(path)
    vectors = apply_overrides(vectors, overrides)
    if dim and dim < vectors.shape[1]:
        vectors, queries = truncate(vectors, dim), truncate(queries, dim)
    out = np.empty((len(queries), 5))
    for row, query in enumerate(queries):
        scores = (vectors @ query).astype(np.float64)  # (rows,), float32 products as DenseIndex.all_scores
        mean = scores.mean()
        out[row] = (len(scores), mean, float(((scores - mean) ** 2).sum()), scores.min(), scores.max())
    return start, out


def dense_score_stats(shards: ShardSet, query_emb: np.ndarray, compute: ComputeConfig,
                      dim: int = 0) -> np.ndarray:
    """Each query's score statistics over every shard, (n_queries, 4): low, high, mean, std (population), merged
    from the shards' counts, means and squared deviations (Chan et al.): ``ScoreStats.of`` over the whole corpus
    to float64 rounding."""
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    calls = [(str(shards.path(start)), start, shards.shard_overrides(start))
             for start in shards.starts]
    parts = dict(map_shards(_stats_shard, calls, compute, {"queries": query_emb, "dim": dim}))
    count = np.zeros(len(query_emb))
    mean = np.zeros(len(query_emb))
    squares = np.zeros(len(query_emb))
    low = np.full(len(query_emb), np.inf)
    high = np.full(len(query_emb), -np.inf)
    for start in shards.starts:  # in row order, so the result does not depend on which task finished first
        n, m, m2, lo, hi = parts[start].T
        total = count + n
        delta = m - mean
        mean = mean + delta * n / total
        squares = squares + m2 + delta ** 2 * count * n / total
        count = total
        low, high = np.minimum(low, lo), np.maximum(high, hi)
    return np.stack([low, high, mean, np.sqrt(squares / np.maximum(count, 1))], axis=1)


class ShardedDenseIndex:
    """The core ``Retriever``'s dense member over a :class:`ShardSet` (``ShardSet.dense_index``): exact search and
    whole-corpus score statistics computed shard by shard on the engine, with ``embtune.retrieval.spec.DenseIndex``'s
    arithmetic, so this process holds the queries and the running top-k, never the matrix.

    Only exact fp32 (an int8 index's quantizer is trained on the whole matrix) and no row filter (``allowed``,
    a served request's metadata filter).
    """

    def __init__(self, shards: ShardSet, dim: int, precision: str, compute: ComputeConfig) -> None:
        if precision != "fp32":
            raise ValueError(f"dense.precision {precision!r} on a sharded corpus (compute.engine: ray): only fp32 is "
                             "searched shard by shard; use the local engine for an int8 index")
        if dim > shards.dim:
            raise ValueError(f"dense.dim {dim} is larger than the embeddings' dimension {shards.dim}")
        self.shards = shards
        self.full_dim = shards.dim
        self.dim = dim or shards.dim
        self.compute = compute

    def _dim(self) -> int:
        return self.dim if self.dim < self.full_dim else 0

    def search(self, query_emb: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return dense_search(self.shards, query_emb, min(k, self.shards.num_rows), self.compute, dim=self._dim(),
                            one_at_a_time=True)

    def score_stats(self, query_emb: np.ndarray, allowed: np.ndarray | None = None) -> list[ScoreStats]:
        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return [ScoreStats(*map(float, row))
                for row in dense_score_stats(self.shards, query_emb, self.compute, dim=self._dim())]


def dense_candidates(model_name: str, doc_texts: list[str], query_texts: list[str], depth: int,
                     compute: ComputeConfig, batch_size: int = 64, max_seq_length: int = 0,
                     ) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """Mining's dense candidates on the engine: the corpus encoded into shards (cached as ``encode`` caches it),
    searched shard by shard; ``(scores, rows, score_docs)`` with ``score_docs(query_row, rows)`` the inner products
    of any documents (guards read a positive's), read from their shards."""
    from embtune.compute.shards import encode_texts
    from embtune.retrieval.encoder import cache_stem, encode, load_encoder

    model, key = load_encoder(model_name, max_seq_length)
    shards = encode_texts(model, doc_texts, cache_stem(model, key, doc_texts), compute, desc="mining corpus")
    query_emb = encode(model, query_texts, batch_size, desc="mining query")  # (n_queries, dim)
    scores, indices = dense_search(shards, query_emb, depth, compute)

    def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
        return (shards.vectors(docs) @ query_emb[row]).astype(np.float64)  # (len(docs),)

    return scores, indices, score_docs


# --- BM25 -----------------------------------------------------------------------------------------------------------

def _bm25_counts(start: int, source: str, settings: BM25Config) -> tuple[list[str], np.ndarray, int, int]:
    """One shard's (terms in first-appearance order, their document frequencies, tokens, documents)."""
    import json

    tokenizer = build_tokenizer(settings)
    _, texts = read_source(json.loads(source), start)
    first_seen: dict[str, int] = {}
    doc_freq: list[int] = []
    tokens = 0
    for document in tokenizer.tokenize_many(texts):
        tokens += len(document)
        for term in dict.fromkeys(document):  # distinct, in order
            position = first_seen.setdefault(term, len(first_seen))
            if position == len(doc_freq):
                doc_freq.append(0)
            doc_freq[position] += 1
    return list(first_seen), np.asarray(doc_freq, dtype=np.int64), tokens, len(texts)


@dataclass
class BM25Stats:
    """Corpus-wide BM25Okapi statistics summed over shards; the idf of each term as ``FastBM25`` floors it."""

    vocab: dict[str, int]  # term -> position in first-appearance order over the whole corpus
    idf: np.ndarray  # (vocab,) floored as rank-bm25 does
    avgdl: float
    corpus_size: int

    @classmethod
    def merge(cls, counts: Iterable[tuple[list[str], np.ndarray, int, int]], epsilon: float = 0.25) -> "BM25Stats":
        """From every shard's counts, in shard order (which makes the vocabulary order the whole corpus's)."""
        vocab: dict[str, int] = {}
        doc_freq: list[int] = []
        tokens = documents = 0
        for terms, frequencies, shard_tokens, shard_documents in counts:
            for term, frequency in zip(terms, frequencies.tolist()):
                position = vocab.setdefault(term, len(vocab))
                if position == len(doc_freq):
                    doc_freq.append(0)
                doc_freq[position] += frequency
            tokens += shard_tokens
            documents += shard_documents
        df = np.asarray(doc_freq, dtype=np.float64)
        # FastBM25's arithmetic, in its order (embtune/retrieval/bm25.py)
        idf = np.log(documents - df + 0.5) - np.log(df + 0.5)
        average_idf = sum(idf.tolist()) / len(idf) if len(idf) else 0.0
        idf[idf < 0] = epsilon * average_idf
        return cls(vocab, idf, float(tokens) / documents, documents)

    def query_terms(self, query_tokens: Sequence[Sequence[str]]) -> list[str]:
        """The known query terms, in corpus vocabulary order (so a shard sums a query's terms in FastBM25's order)."""
        return sorted({t for query in query_tokens for t in query if t in self.vocab}, key=self.vocab.__getitem__)


def _bm25_shard(start: int, source: str, settings: BM25Config, k: int, terms: list[str], idf: np.ndarray,
                avgdl: float, query_tokens: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top-``k`` per query under corpus-wide statistics: (scores float64, corpus rows)."""
    import json

    import scipy.sparse as sp

    tokenizer = build_tokenizer(settings)
    _, texts = read_source(json.loads(source), start)
    term_of = {term: i for i, term in enumerate(terms)}
    rows, cols, doc_len = [], [], []
    for doc, document in enumerate(tokenizer.tokenize_many(texts)):
        doc_len.append(len(document))
        for token in document:
            term = term_of.get(token)
            if term is not None:
                rows.append(term)
                cols.append(doc)
    doc_len = np.asarray(doc_len, dtype=np.float64)
    term_freq = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (np.asarray(rows, dtype=np.int32),
                                                                      np.asarray(cols, dtype=np.int32))),
                              shape=(len(terms), len(texts)))
    term_freq.sum_duplicates()
    # FastBM25.__init__'s weights, with the corpus's idf and average length
    doc_of_entry = term_freq.indices
    tf = term_freq.data.astype(np.float64)
    length_norm = settings.k1 * (1 - settings.b + settings.b * doc_len[doc_of_entry] / avgdl)
    term_of_entry = np.repeat(np.arange(len(terms)), np.diff(term_freq.indptr))
    term_freq.data = idf[term_of_entry] * (tf * (settings.k1 + 1) / (tf + length_norm))
    index = FastBM25.from_weights(term_of, term_freq, np.diff(term_freq.indptr), k1=settings.k1, b=settings.b)
    scores, indices = index.search(query_tokens, k)  # ties by lower row within the shard
    return scores, indices + start


def merge_bm25(best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, indices: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two top lists per query in ``rank_order`` (rounded score descending, then lower row)."""
    if best is not None:
        scores = np.concatenate([best[0], scores], axis=1)
        indices = np.concatenate([best[1], indices], axis=1)
    k = min(k, scores.shape[1])
    out_scores = np.empty((len(scores), k))
    out_indices = np.empty((len(scores), k), dtype=np.int64)
    for row in range(len(scores)):
        top = rank_order(scores[row], indices[row], k)
        out_scores[row], out_indices[row] = scores[row][top], indices[row][top]
    return out_scores, out_indices


def bm25_stats(items: list[dict[str, Any]], settings: BM25Config, compute: ComputeConfig) -> BM25Stats:
    """Corpus-wide statistics from every shard (``embtune.compute.shards.plan_*`` items)."""
    calls = [(item["start"], item["source"]) for item in items]
    counts = dict(map_shards(_bm25_counts_with_start, calls, compute, {"settings": settings}))  # start -> counts
    return BM25Stats.merge(counts[item["start"]] for item in items)


def _bm25_counts_with_start(start: int, source: str, settings: BM25Config):
    return start, _bm25_counts(start, source, settings)


def bm25_search(items: list[dict[str, Any]], query_texts: Sequence[str], k: int, settings: BM25Config,
                compute: ComputeConfig, stats: BM25Stats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` BM25Okapi documents per query over sharded texts, equal to ``FastBM25.search`` over the whole
    corpus: (scores float64, corpus rows int64), each (n_queries, min(k, rows))."""
    stats = stats or bm25_stats(items, settings, compute)
    tokenizer = build_tokenizer(settings)
    query_tokens = [list(q) for q in tokenizer.tokenize_many(query_texts)]
    terms = stats.query_terms(query_tokens)
    idf = stats.idf[[stats.vocab[t] for t in terms]] if terms else np.zeros(0)
    calls = [(item["start"], item["source"]) for item in items]
    best = None
    for scores, indices in map_shards(_bm25_shard, calls, compute,
                                      {"settings": settings, "k": k, "terms": terms, "idf": idf,
                                       "avgdl": stats.avgdl, "query_tokens": query_tokens}):
        best = merge_bm25(best, scores, indices, k)
    return best


def bm25_candidates(doc_texts: list[str], query_texts: list[str], depth: int, settings: BM25Config,
                    compute: ComputeConfig) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """Mining's BM25 candidates on the engine: ``(scores, rows, score_docs)``, as ``data_prep.mining.bm25_ranking``
    returns them (``score_docs`` sums each query token's weight in each document, in query token order)."""
    from embtune.compute.shards import plan_texts

    # bm25.language: auto is resolved here, on the whole corpus, as one process's build_tokenizer(settings, texts)
    # resolves it: the workers see one shard each, and without the texts auto would mean English.
    settings = replace(settings, language=resolve_language(settings, doc_texts))
    items = plan_texts(doc_texts, compute.shard_rows)
    stats = bm25_stats(items, settings, compute)
    scores, indices = bm25_search(items, query_texts, depth, settings, compute, stats)
    tokenizer = build_tokenizer(settings)
    query_tokens = [list(q) for q in tokenizer.tokenize_many(query_texts)]
    k1, b = settings.k1, settings.b

    def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
        out = np.zeros(len(docs))
        documents = [tokenizer(doc_texts[int(d)]) for d in docs]
        counts = [Counter(document) for document in documents]
        for token in query_tokens[row]:
            term = stats.vocab.get(token)
            if term is None:
                continue
            for j, (document, count) in enumerate(zip(documents, counts)):
                tf = float(count.get(token, 0))
                if tf:
                    length_norm = k1 * (1 - b + b * len(document) / stats.avgdl)
                    out[j] += stats.idf[term] * (tf * (k1 + 1) / (tf + length_norm))
        return out

    return scores, indices, score_docs
