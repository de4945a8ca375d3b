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

import json
import logging
from dataclasses import asdict, dataclass, replace
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
    return merge_stats([parts[start] for start in shards.starts], len(query_emb))


class Recent:
    """The last few results of a pass over every shard, by query: eval's deploy choice searches the same queries
    at each fusion weight (eval/deploy.py ``DEV_WEIGHTS``), and each weight would read the whole corpus again."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.results: dict[Any, Any] = {}

    @staticmethod
    def key(queries: Any) -> str:
        import hashlib

        if isinstance(queries, np.ndarray):
            return hashlib.sha256(np.ascontiguousarray(queries).tobytes() + str(queries.shape).encode()).hexdigest()
        return hashlib.sha256("\x00".join(queries).encode()).hexdigest() + str(len(queries))

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self.results:
            if len(self.results) >= self.size:
                self.results.pop(next(iter(self.results)))
            self.results[key] = compute()
        return self.results[key]


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
        self._recent = Recent()

    def _dim(self) -> int:
        return self.dim if self.dim < self.full_dim else 0

    def search(self, query_emb: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return self._recent.get(("search", k, Recent.key(query_emb)), lambda: dense_search(
            self.shards, query_emb, min(k, self.shards.num_rows), self.compute, dim=self._dim(), one_at_a_time=True))

    def score_stats(self, query_emb: np.ndarray, allowed: np.ndarray | None = None) -> list[ScoreStats]:
        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return self._recent.get(("stats", Recent.key(query_emb)), lambda: [
            ScoreStats(*map(float, row)) for row in dense_score_stats(self.shards, query_emb, self.compute,
                                                                      dim=self._dim())])


def dense_candidates(model_name: str, doc_texts: list[str], query_texts: list[str], depth: int,
                     compute: ComputeConfig, batch_size: int = 64, max_seq_length: int = 0, index: str = "flat",
                     nlist: int = 0, nprobe: int = 16,
                     ) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """Mining's dense candidates on the engine: the corpus encoded into shards (cached as ``encode`` caches it),
    searched shard by shard (``index``: ``flat`` exact, ``ivf`` a :class:`ShardedIVF` with ``nlist`` lists probed
    ``nprobe`` at a time); ``(scores, rows, score_docs)`` with ``score_docs(query_row, rows)`` the inner products
    of any documents (guards read a positive's), read from their shards."""
    from embtune.compute.shards import encode_texts
    from embtune.retrieval.encoder import cache_stem, load_encoder

    model, key = load_encoder(model_name, max_seq_length)
    shards = encode_texts(model, doc_texts, cache_stem(model, key, doc_texts), compute, desc="mining corpus")
    return shard_candidates(model, shards, query_texts, depth, compute, batch_size, index, nlist, nprobe)


def shard_candidates(model, shards: ShardSet, query_texts: list[str], depth: int, compute: ComputeConfig,
                     batch_size: int = 64, index: str = "flat", nlist: int = 0, nprobe: int = 16,
                     ) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """``dense_candidates`` over shards already encoded (e.g. from a corpus file the driver never read)."""
    from embtune.retrieval.encoder import encode

    query_emb = encode(model, query_texts, batch_size, desc="mining query")  # (n_queries, dim)
    if index == "ivf":
        scores, indices = ShardedIVF(shards, compute, nlist).search(query_emb, depth, nprobe)
    elif index == "flat":
        scores, indices = dense_search(shards, query_emb, depth, compute)
    else:
        raise ValueError(f"mining.faiss_index must be 'flat' or 'ivf', got {index!r}")

    def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
        return (shards.vectors(docs) @ query_emb[row]).astype(np.float64)  # (len(docs),)

    return scores, indices, score_docs


# --- IVF (approximate dense search for mining) -----------------------------------------------------------------

def _ivf_train(shards: ShardSet, rows: np.ndarray, nlist: int, seed: int, threads: int, path: str) -> str:
    """Train an empty ``IndexIVFFlat`` (inner product) on the given sampled corpus rows and save it: one task, so the
    sample never passes through the driver."""
    import faiss

    faiss.omp_set_num_threads(threads)
    sample = np.ascontiguousarray(shards.vectors(rows), dtype=np.float32)  # (train rows, dim)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(shards.dim), shards.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(sample)
    _write_index_atomically(index, path)
    return path


def _write_index_atomically(index, path: str) -> None:
    import os
    import uuid

    import faiss

    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def _ivf_fill(shard_path: str, start: int, trained: str, out: str, threads: int) -> int:
    """One shard's vectors added (with their corpus rows as ids) to a copy of the trained index, saved beside it."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(trained)
    _, vectors = read_shard_file(shard_path)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                       np.arange(start, start + len(vectors), dtype=np.int64))
    _write_index_atomically(index, out)
    return start


def _ivf_shard(path: str, k: int, nprobe: int, queries: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """One shard's approximate top-``k`` per query: (scores float32, corpus rows; -1 past the lists probed)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP)
    index.nprobe = nprobe
    return index.search(queries, k)


class ShardedIVF:
    """An IVF index over a :class:`ShardSet`, the FAISS recipe for corpora past one machine (autofaiss's): the
    coarse quantizer trained once, by one task, on a seeded sample of rows drawn from every shard; each shard then
    added to a copy of it by its own task and saved beside the shards (``ivf<nlist>_seed<seed>/<start>.faiss``,
    ids = corpus rows); a search runs each shard's index in a task (``nprobe`` lists) and merges the top-k as
    :func:`dense_search` does. Every shard shares the quantizer, so a query probes the same lists in each.

    Approximate: its recall against :func:`dense_search` is measured (``scripts/bench_scale.py --pipeline``), not
    assumed. A rerun reuses the trained quantizer and the filled shards it finds.
    """

    def __init__(self, shards: ShardSet, compute: ComputeConfig, nlist: int = 0, train_rows: int = 0,
                 seed: int = 42) -> None:
        import math

        if shards.overrides:
            raise ValueError("an IVF index over shards with replaced rows: the saved lists hold the stored vectors")
        self.shards, self.compute = shards, compute
        self.nlist = min(nlist or max(1, int(4 * math.sqrt(shards.num_rows))), shards.num_rows)
        self.directory = shards.directory / f"ivf{self.nlist}_seed{seed}"
        self.directory.mkdir(exist_ok=True)
        trained = self.directory / "trained.faiss"
        if not trained.is_file():
            rng = np.random.default_rng(seed)
            count = min(shards.num_rows, train_rows or 64 * self.nlist)
            rows = np.sort(rng.choice(shards.num_rows, size=count, replace=False))
            list(map_shards(_ivf_train, [(shards, rows, self.nlist, seed, compute.threads_per_worker, str(trained))],
                            compute))
            logger.info("IVF: %d lists trained on %d sampled rows", self.nlist, count)
        missing = [(str(shards.path(start)), start, str(trained), str(self._path(start)), compute.threads_per_worker)
                   for start in shards.starts if not self._path(start).is_file()]
        self.filled = sorted(map_shards(_ivf_fill, missing, compute))

    def _path(self, start: int):
        return self.directory / f"{start:012d}.faiss"

    def search(self, query_emb: np.ndarray, k: int, nprobe: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` by inner product: (scores float32, corpus rows int64, -1 where fewer were found),
        each (n_queries, k)."""
        query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)  # (n_queries, dim)
        calls = [(str(self._path(start)),) for start in self.shards.starts]
        shared = {"k": k, "nprobe": min(nprobe, self.nlist), "queries": query_emb,
                  "threads": self.compute.threads_per_worker}
        best = None
        for scores, indices in map_shards(_ivf_shard, calls, self.compute, shared):
            best = merge_dense(best, scores, indices, k)
        return best


# --- BM25 -----------------------------------------------------------------------------------------------------------

BM25_DIR_SUFFIX = ".bm25"


def _bm25_build_shard(start: int, source: str, settings: BM25Config, directory: str) -> int:
    """Tokenize one shard once and save its term-frequency matrix beside the others: ``<start>.bm25/`` holds
    ``indptr``/``indices``/``data`` of the (shard terms, shard docs) CSR counts (float32, docs ascending within a
    term, as FastBM25 builds them), ``doc_len``, and the shard's terms sorted (``terms``) with their ids in
    first-appearance order (``term_ids``), so a search looks a query term up by binary search in a memory map."""
    import json
    import os
    import shutil
    import uuid
    from array import array
    from pathlib import Path

    import scipy.sparse as sp

    tokenizer = build_tokenizer(settings)
    _, texts = read_source(json.loads(source), start)
    vocab: dict[str, int] = {}
    term_ids = array("i")
    doc_len: list[int] = []
    for document in tokenizer.tokenize_many(texts):
        term_ids.extend(vocab.setdefault(token, len(vocab)) for token in document)
        doc_len.append(len(document))
    lengths = np.asarray(doc_len, dtype=np.int64)
    docs = np.repeat(np.arange(len(texts), dtype=np.int32), lengths)
    term_freq = sp.csr_matrix((np.ones(len(term_ids), dtype=np.float32),
                               (np.frombuffer(term_ids, dtype=np.int32), docs)), shape=(len(vocab), len(texts)))
    term_freq.sum_duplicates()  # (shard terms, shard docs)
    terms = np.asarray(list(vocab), dtype=str) if vocab else np.zeros(0, dtype="<U1")
    order = np.argsort(terms, kind="stable")
    final = Path(directory) / f"{start:012d}{BM25_DIR_SUFFIX}"
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    np.save(tmp / "indptr.npy", term_freq.indptr.astype(np.int64))
    np.save(tmp / "indices.npy", term_freq.indices.astype(np.int32))
    np.save(tmp / "data.npy", term_freq.data.astype(np.float32))
    np.save(tmp / "doc_len.npy", lengths)
    np.save(tmp / "terms.npy", terms[order])
    np.save(tmp / "term_ids.npy", order.astype(np.int64))
    try:
        os.replace(tmp, final)
    except OSError:  # another task wrote the same shard first: its files are the same
        shutil.rmtree(tmp, ignore_errors=True)
    return start


def _shard_counts(path) -> tuple[list[str], np.ndarray, int, int]:
    """A saved shard's (terms in first-appearance order, document frequencies, tokens, documents)."""
    terms = np.load(path / "terms.npy")
    first_seen = np.empty(len(terms), dtype=np.int64)
    first_seen[np.load(path / "term_ids.npy")] = np.arange(len(terms))
    doc_len = np.load(path / "doc_len.npy")
    doc_freq = np.diff(np.load(path / "indptr.npy", mmap_mode="r"))
    return terms[first_seen].tolist(), doc_freq, int(doc_len.sum()), len(doc_len)


def _lookup(path, terms: np.ndarray) -> np.ndarray:
    """The shard's ids of ``terms`` (-1: not in the shard), by binary search in its sorted terms."""
    sorted_terms = np.load(path / "terms.npy", mmap_mode="r")
    if not len(sorted_terms) or not len(terms):
        return np.full(len(terms), -1, dtype=np.int64)
    position = np.minimum(np.searchsorted(sorted_terms, terms), len(sorted_terms) - 1)
    found = sorted_terms[position] == terms
    return np.where(found, np.load(path / "term_ids.npy", mmap_mode="r")[position], -1)


def _term_rows(path, local: np.ndarray, docs: int):
    """The (len(local), docs) CSR of the saved counts for these shard term ids (-1: an empty row), read from
    the memory-mapped postings of those terms only."""
    import scipy.sparse as sp

    indptr = np.load(path / "indptr.npy", mmap_mode="r")
    indices = np.load(path / "indices.npy", mmap_mode="r")
    data = np.load(path / "data.npy", mmap_mode="r")
    begin = np.where(local >= 0, indptr[np.maximum(local, 0)], 0)
    end = np.where(local >= 0, indptr[np.maximum(local, 0) + 1], 0)
    out_indptr = np.concatenate([[0], np.cumsum(end - begin)])
    out_indices = np.concatenate([indices[b:e] for b, e in zip(begin, end)] or [np.zeros(0, np.int32)])
    out_data = np.concatenate([data[b:e] for b, e in zip(begin, end)] or [np.zeros(0, np.float32)])
    return sp.csr_matrix((out_data, out_indices, out_indptr), shape=(len(local), docs))


def _bm25_shard(directory: str, start: int, k: int, k1: float, b: float, terms: np.ndarray, idf: np.ndarray,
                avgdl: float, query_tokens: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """One saved shard's top-``k`` per query under corpus-wide statistics: (scores float64, corpus rows). Reads
    only the postings of the query terms; no text is read or tokenized."""
    index = _shard_index(directory, start, k1, b, terms, idf, avgdl)
    scores, indices = index.search(query_tokens, k)  # ties by lower row within the shard
    return scores, indices + start


def _bm25_stats_shard(directory: str, start: int, k1: float, b: float, terms: np.ndarray, idf: np.ndarray,
                      avgdl: float, query_tokens: list[list[str]]) -> tuple[int, np.ndarray]:
    """Per query: (count, mean, sum of squared deviations, min, max) of its BM25 scores over one saved shard."""
    index = _shard_index(directory, start, k1, b, terms, idf, avgdl)
    out = np.empty((len(query_tokens), 5))
    for row, tokens in enumerate(query_tokens):
        scores = index.get_scores(tokens)  # (shard docs,) float64, FastBM25's sum in query-token order
        mean = scores.mean()
        out[row] = (len(scores), mean, float(((scores - mean) ** 2).sum()), scores.min(), scores.max())
    return start, out


def merge_stats(parts: Sequence[np.ndarray], n_queries: int) -> np.ndarray:
    """Per-shard (count, mean, squared deviations, min, max) rows merged in shard order (Chan et al.):
    (n_queries, 4) low, high, mean, std, ``ScoreStats.of`` over the whole corpus to float64 rounding."""
    count = np.zeros(n_queries)
    mean = np.zeros(n_queries)
    squares = np.zeros(n_queries)
    low = np.full(n_queries, np.inf)
    high = np.full(n_queries, -np.inf)
    for part in parts:  # in row order, so the result does not depend on which task finished first
        n, m, m2, lo, hi = part.T
        total = count + n
        delta = m - mean
        mean = mean + delta * n / np.maximum(total, 1)
        squares = squares + m2 + delta ** 2 * count * n / np.maximum(total, 1)
        count = total
        low, high = np.minimum(low, lo), np.maximum(high, hi)
    return np.stack([low, high, mean, np.sqrt(squares / np.maximum(count, 1))], axis=1)


def _bm25_merge(directory: str, starts: list[int], target: str, vocab: list[str], idf: np.ndarray, avgdl: float,
                k1: float, b: float) -> int:
    """Write the (vocab, docs) CSR of BM25 weights of every saved shard as ``BM25Index.save`` lays it out: a
    term's postings are its postings in each shard in shard order, so each shard's entries land in one run per
    term. Run as a task: the output arrays are memory-mapped in that process, not the driver."""
    from pathlib import Path

    from numpy.lib.format import open_memmap

    position = {term: i for i, term in enumerate(vocab)}
    shards = [Path(directory) / f"{start:012d}{BM25_DIR_SUFFIX}" for start in starts]
    global_of = []
    doc_freq = np.zeros(len(vocab), dtype=np.int64)
    docs = 0
    for path in shards:
        terms, frequencies, _, shard_docs = _shard_counts(path)
        ids = np.fromiter((position[t] for t in terms), dtype=np.int64, count=len(terms))
        global_of.append(ids)
        np.add.at(doc_freq, ids, frequencies)
        docs += shard_docs
    indptr = np.concatenate([[0], np.cumsum(doc_freq)]).astype(np.int64)
    target = Path(target)
    np.save(target / "indptr.npy", indptr)
    np.save(target / "doc_freq.npy", doc_freq.astype(np.float64))
    data = open_memmap(target / "data.npy", mode="w+", dtype=np.float64, shape=(int(indptr[-1]),))
    indices = open_memmap(target / "indices.npy", mode="w+", dtype=np.int32, shape=(int(indptr[-1]),))
    cursor = indptr[:-1].copy()
    for path, start, ids in zip(shards, starts, global_of):
        local_indptr = np.load(path / "indptr.npy")
        counts = np.diff(local_indptr)
        term_of_entry = np.repeat(ids, counts)
        # each entry's place: its term's cursor, plus its rank among that term's entries in this shard
        destination = np.repeat(cursor[ids] - local_indptr[:-1], counts) + np.arange(int(local_indptr[-1]))
        doc = np.load(path / "indices.npy")
        tf = np.load(path / "data.npy").astype(np.float64)
        doc_len = np.load(path / "doc_len.npy").astype(np.float64)
        length_norm = k1 * (1 - b + b * doc_len[doc] / avgdl)
        data[destination] = idf[term_of_entry] * (tf * (k1 + 1) / (tf + length_norm))  # _bm25_shard's arithmetic
        indices[destination] = doc + start
        cursor[ids] += counts
    data.flush()
    indices.flush()
    return docs


def _shard_index(directory: str, start: int, k1: float, b: float, terms: np.ndarray, idf: np.ndarray,
                 avgdl: float) -> FastBM25:
    """A saved shard as a ``FastBM25`` over the query terms only, with corpus-wide idf and average length."""
    from pathlib import Path

    path = Path(directory) / f"{start:012d}{BM25_DIR_SUFFIX}"
    doc_len = np.load(path / "doc_len.npy").astype(np.float64)
    term_freq = _term_rows(path, _lookup(path, terms), len(doc_len))  # (query terms, shard docs)
    # FastBM25.__init__'s weights, with the corpus's idf and average length
    doc_of_entry = term_freq.indices
    tf = term_freq.data.astype(np.float64)
    length_norm = k1 * (1 - b + b * doc_len[doc_of_entry] / avgdl)
    term_of_entry = np.repeat(np.arange(len(terms)), np.diff(term_freq.indptr))
    term_freq.data = idf[term_of_entry] * (tf * (k1 + 1) / (tf + length_norm))
    term_of = {str(term): i for i, term in enumerate(terms)}
    return FastBM25.from_weights(term_of, term_freq, np.diff(term_freq.indptr), k1=k1, b=b)


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


class ShardedBM25:
    """BM25Okapi over a sharded corpus, built once: each shard tokenized by one task and its term counts saved as
    memory-mapped arrays (``_bm25_build_shard``) under the embedding cache; the corpus-wide statistics merged once
    in the driver from those files; each search scores the shards from their saved postings (Ray tasks) and merges
    the per-shard top-k by ``rank_order``. Equal to ``FastBM25`` over the whole corpus, score for score.

    The driver holds the vocabulary with its idf (one entry per distinct term), never the texts. A rerun finds the
    shard folders and tokenizes only the missing ones.
    """

    def __init__(self, items: list[dict[str, Any]], corpus_hash: str, settings: BM25Config,
                 compute: ComputeConfig) -> None:
        import json
        from hashlib import sha256

        from embtune.retrieval.encoder import cache_dir

        self.settings, self.compute = settings, compute
        self.starts = [item["start"] for item in items]
        tokenizer_hash = sha256(json.dumps(build_tokenizer(settings).describe(), sort_keys=True).encode()).hexdigest()
        shard_rows = max((item["rows"] for item in items), default=0)
        self.directory = cache_dir() / f"bm25_{corpus_hash}_{tokenizer_hash[:12]}.shards{shard_rows}"
        self.directory.mkdir(parents=True, exist_ok=True)
        missing = [(item["start"], item["source"]) for item in items if not self._path(item["start"]).is_dir()]
        logger.info("BM25 index %s: %d shards, %d to build", self.directory, len(items), len(missing))
        self.built = sorted(map_shards(_bm25_build_shard, missing, compute,
                                       {"settings": settings, "directory": str(self.directory)}))
        self.stats = BM25Stats.merge(_shard_counts(self._path(start)) for start in self.starts)
        self.tokenizer = build_tokenizer(settings)

    def _path(self, start: int):
        return self.directory / f"{start:012d}{BM25_DIR_SUFFIX}"

    def tokenize(self, query_texts: Sequence[str]) -> list[list[str]]:
        return [list(q) for q in self.tokenizer.tokenize_many(query_texts)]

    def search(self, query_texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: (scores float64, corpus rows int64), each (n_queries, min(k, rows))."""
        shared = {"k": k, **self._shared(query_texts)}
        best = None
        calls = [(str(self.directory), start) for start in self.starts]
        for scores, indices in map_shards(_bm25_shard, calls, self.compute, shared):
            best = merge_bm25(best, scores, indices, k)
        return best

    def _shared(self, query_texts: Sequence[str]) -> dict[str, Any]:
        query_tokens = self.tokenize(query_texts)
        terms = self.stats.query_terms(query_tokens)
        idf = self.stats.idf[[self.stats.vocab[t] for t in terms]] if terms else np.zeros(0)
        return {"k1": self.settings.k1, "b": self.settings.b, "terms": np.asarray(terms, dtype=str), "idf": idf,
                "avgdl": self.stats.avgdl, "query_tokens": query_tokens}

    def score_stats(self, query_texts: Sequence[str]) -> np.ndarray:
        """Each query's BM25 score statistics over every document, (n_queries, 4): low, high, mean, std
        (population), merged from the shards as :func:`dense_score_stats` merges them."""
        calls = [(str(self.directory), start) for start in self.starts]
        parts = dict(map_shards(_bm25_stats_shard, calls, self.compute, self._shared(query_texts)))
        return merge_stats([parts[start] for start in self.starts], len(query_texts))

    def save(self, directory, settings: BM25Config):
        """The whole corpus's index as ``embtune.retrieval.spec.BM25Index.save`` writes it (weights, doc_freq,
        vocabulary, the resolved tokenizer), merged from the saved shards by one task, so ``BM25Index.load``
        serves it memory-mapped. ``settings``: the section as asked (``language: auto`` kept, as a bundle records
        it)."""
        from pathlib import Path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        call = [(str(self.directory), self.starts, str(directory))]
        shared = {"vocab": list(self.stats.vocab), "idf": self.stats.idf, "avgdl": self.stats.avgdl,
                  "k1": self.settings.k1, "b": self.settings.b}
        (total,) = map_shards(_bm25_merge, call, self.compute, shared)
        meta = {"settings": asdict(settings), "tokenizer": self.tokenizer.describe(), "num_docs": total,
                "k1": self.settings.k1, "b": self.settings.b, "epsilon": 0.25}
        (directory / "bm25.json").write_text(json.dumps(meta, indent=1))
        (directory / "vocab.json").write_text(json.dumps(list(self.stats.vocab), ensure_ascii=False))
        logger.info("BM25 index of %d documents merged from %d shards into %s", total, len(self.starts), directory)
        return directory

    def doc_scores(self, query_tokens: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """BM25 scores of some corpus rows for one tokenized query (float64, (len(rows),)), from the saved
        counts: each query token's weight summed in query token order, as ``BM25Okapi.get_scores``."""
        rows = np.asarray(rows, dtype=np.int64)
        k1, b, avgdl = self.settings.k1, self.settings.b, self.stats.avgdl
        known = [token for token in query_tokens if token in self.stats.vocab]
        out = np.zeros(len(rows))
        if not known or not len(rows):
            return out
        bounds = np.asarray(self.starts, dtype=np.int64)
        shard_of = np.searchsorted(bounds, rows, side="right") - 1
        distinct = np.asarray(sorted(set(known)), dtype=str)
        tf = np.zeros((len(rows), len(distinct)))  # (rows, distinct known query terms)
        doc_len = np.zeros(len(rows))
        for shard in np.unique(shard_of):
            mine = np.flatnonzero(shard_of == shard)
            path = self._path(int(bounds[shard]))
            lengths = np.load(path / "doc_len.npy", mmap_mode="r")
            counts = _term_rows(path, _lookup(path, distinct), len(lengths)).T.tocsr()  # (shard docs, terms)
            local = rows[mine] - bounds[shard]
            tf[mine] = counts[local].toarray()
            doc_len[mine] = lengths[local]
        column = {term: i for i, term in enumerate(distinct.tolist())}
        length_norm = k1 * (1 - b + b * doc_len / avgdl)
        for token in known:
            freq = tf[:, column[token]]
            hit = freq > 0
            idf = self.stats.idf[self.stats.vocab[token]]
            out[hit] += idf * (freq[hit] * (k1 + 1) / (freq[hit] + length_norm[hit]))
        return out


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


def texts_hash(texts: Sequence[str]) -> str:
    """The content hash of texts held in memory (``encoder.cache_stem``'s)."""
    import hashlib

    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def bm25_search(items: list[dict[str, Any]], query_texts: Sequence[str], k: int, settings: BM25Config,
                compute: ComputeConfig, corpus_hash: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` BM25Okapi documents per query over sharded texts (``embtune.compute.shards.plan_*`` items whose
    content hashes to ``corpus_hash``), equal to ``FastBM25.search`` over the whole corpus: (scores float64, corpus
    rows int64), each (n_queries, min(k, rows)). The index is built on the first call and reused after."""
    return ShardedBM25(items, corpus_hash, settings, compute).search(query_texts, k)


def bm25_candidates(doc_texts: list[str], query_texts: list[str], depth: int, settings: BM25Config,
                    compute: ComputeConfig) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """Mining's BM25 candidates on the engine: ``(scores, rows, score_docs)``, as ``data_prep.mining.bm25_ranking``
    returns them (``score_docs`` sums each query token's weight in each document, in query token order)."""
    from embtune.compute.shards import plan_texts

    # bm25.language: auto is resolved here, on the whole corpus, as one process's build_tokenizer(settings, texts)
    # resolves it: the workers see one shard each, and without the texts auto would mean English.
    settings = replace(settings, language=resolve_language(settings, doc_texts))
    index = ShardedBM25(plan_texts(doc_texts, compute.shard_rows), texts_hash(doc_texts), settings, compute)
    return bm25_index_candidates(index, query_texts, depth)


def bm25_index_candidates(index: ShardedBM25, query_texts: list[str], depth: int,
                          ) -> tuple[np.ndarray, np.ndarray, Callable[[int, np.ndarray], np.ndarray]]:
    """``bm25_candidates`` from a built index: the guards' scores come from its saved counts, not from texts."""
    scores, indices = index.search(query_texts, depth)
    query_tokens = index.tokenize(query_texts)

    def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
        return index.doc_scores(query_tokens[row], docs)

    return scores, indices, score_docs
