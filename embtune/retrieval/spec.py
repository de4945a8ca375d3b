"""What retrieval system eval measured and serve serves: a ``RetrieverSpec``, and the one ``Retriever`` that runs it.

A spec names the members (dense embeddings at a dim and precision; BM25 with its tokenizer and parameters), how
they are fused, and an optional cross-encoder rerank. It round-trips through JSON (``retriever.json`` in an export
bundle; ``specs`` and ``recommended`` in eval's ``results.json``)::

    {"dense": {"model": "model", "dim": 384, "precision": "fp32"},
     "bm25": {"backend": "fast", "lowercase": true, "token_pattern": "\\\\w+", "stopwords": "english", ...},
     "fusion": {"method": "weighted", "dense_weight": 0.7, "rrf_k": 60, "depth": 100,
                "normalization": "corpus_zscore"},
     "rerank": null}

``dense: null`` or ``bm25: null`` leaves that member out; ``fusion.method`` is ``none`` for one member and
``weighted`` or ``rrf`` (``embtune.retrieval.fusion``) for two.

:class:`Retriever` is built once from a spec, the document ids and texts and the document embeddings, and answers
``search(query_texts, query_emb, k) -> Run``. eval's rows and the server's ``/search`` both call it, so the served
ranking is the measured one by construction (tests/test_serve_parity.py, scripts/bench_serve_parity.py). What makes
a query's ranking independent of who asks and with how many other queries:

- the dense index is searched one query at a time: FAISS scores a batch of 20 or more queries with a BLAS matrix
  product and a smaller one with its own SIMD loop, and the two round differently in the last bit;
- each member is searched to exactly ``fusion.depth`` before fusing (never to ``k``), so both callers fuse the
  same candidates, and a single member to ``k`` only, with ties at every cut broken by the member's own order;
- the BM25 index is built once per spec's ``bm25`` settings and shared by every spec that uses them;
- a whole-corpus fusion normalization reads each member's scores of every document, one query at a time
  (``Retriever.score_stats``).

Example::

    spec = RetrieverSpec(dense=DenseSpec(dim=384), bm25=BM25Config(),
                         fusion=FusionSpec(method="weighted", dense_weight=0.7, depth=100))
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb)  # doc_emb (n_docs, 384), normalized
    run = retriever.search(query_texts, query_emb, k=10, query_ids=query_ids)  # {qid: {doc id: score}}
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from embtune.retrieval.bm25 import BM25Config, FastBM25, build_tokenizer, rank_order
from embtune.retrieval.encoder import truncate
from embtune.retrieval.fusion import (
    DEFAULT_NORMALIZATION,
    NORMALIZATIONS,
    MemberRun,
    Run,
    ScoreStats,
    fuse,
    needs_stats,
    ranked,
)
from embtune.retrieval.index import to_run
from embtune.retrieval.rerank import rerank

logger = logging.getLogger(__name__)

FUSION_METHODS = ("none", "weighted", "rrf")
PRECISIONS = ("fp32", "int8")
SPEC_FILE = "retriever.json"


@dataclass
class DenseSpec:
    """The dense member: inner product of normalized embeddings (cosine)."""

    model: str = ""  # the embedding model (folder, hub name or alias) as eval saw it; "model" inside a bundle
    dim: int = 0  # Matryoshka dim searched (truncate + renormalize); 0 = the model's full dim
    # fp32: exact IndexFlatIP; int8: IndexScalarQuantizer(QT_8bit), trained per dimension, float query.
    precision: Literal["fp32", "int8"] = "fp32"

    def validate(self) -> None:
        if self.dim < 0:
            raise ValueError(f"dense.dim must be >= 0 (0 = the model's full dim), got {self.dim}")


@dataclass
class FusionSpec:
    """How the dense and BM25 runs are fused (``embtune.retrieval.fusion.fuse``)."""

    method: Literal["none", "weighted", "rrf"] = "none"
    dense_weight: float = 0.5  # weighted: dense share of the per-query normalized scores
    rrf_k: int = 60  # rrf: the constant in 1 / (k + rank)
    depth: int = 100  # top documents taken from each member before fusing
    # weighted: how each member's scores are normalized per query (embtune.retrieval.fusion.NORMALIZATIONS)
    normalization: Literal["corpus_zscore", "corpus_minmax", "topk_zscore", "topk_minmax"] = DEFAULT_NORMALIZATION

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"fusion.normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(f"fusion.dense_weight must be in [0, 1], got {self.dense_weight}")
        if self.rrf_k < 1 or self.depth < 1:
            raise ValueError(f"fusion.rrf_k and fusion.depth must be >= 1, got {self.rrf_k}, {self.depth}")


@dataclass
class RerankSpec:
    """Cross-encoder rescoring of the first stage's top ``top_k`` (``embtune.retrieval.rerank.rerank``)."""

    model: str = ""  # CrossEncoder folder, hub name or alias
    top_k: int = 100
    # Truncation of each (query, document) pair in tokens, as eval scored it (eval.max_seq_length); 0 = the model's.
    max_length: int = 0

    def validate(self) -> None:
        if not self.model:
            raise ValueError("rerank.model must name a CrossEncoder (or set rerank to null)")
        if self.top_k < 1:
            raise ValueError(f"rerank.top_k must be >= 1, got {self.top_k}")
        if self.max_length < 0:
            raise ValueError(f"rerank.max_length must be >= 0 (0 = the model's own), got {self.max_length}")


@dataclass
class RetrieverSpec:
    """A retrieval system: its members, their fusion and an optional rerank. See the module docstring."""

    dense: DenseSpec | None = field(default_factory=DenseSpec)
    bm25: BM25Config | None = None
    fusion: FusionSpec = field(default_factory=FusionSpec)
    rerank: RerankSpec | None = None

    def validate(self) -> None:
        members = [name for name in ("dense", "bm25") if getattr(self, name) is not None]
        if not members:
            raise ValueError("a retriever spec needs dense, bm25 or both")
        if self.fusion.method == "none" and len(members) == 2:
            raise ValueError("dense and bm25 are both set: fusion.method must be 'weighted' or 'rrf', not 'none'")
        if self.fusion.method != "none" and len(members) == 1:
            raise ValueError(f"fusion.method {self.fusion.method!r} fuses dense with bm25, but only {members[0]} "
                             "is set: set fusion.method to 'none' or add the other member")

    @property
    def hybrid(self) -> bool:
        return self.fusion.method != "none"

    def describe(self) -> str:
        """One line for logs and tables, e.g. ``dense 384d fp32 + bm25 (stemmed), weighted 0.7 @ 100``."""
        parts = []
        if self.dense is not None:
            parts.append(f"dense {self.dense.dim or 'full'}d {self.dense.precision}")
        if self.bm25 is not None:
            parts.append("bm25" + (" (stemmed)" if self.bm25.stemmer else ""))
        text = " + ".join(parts)
        if self.fusion.method == "weighted":
            normalization = ("" if self.fusion.normalization == DEFAULT_NORMALIZATION
                             else f", {self.fusion.normalization}")
            text += f", weighted (dense {self.fusion.dense_weight:g}{normalization}) @ {self.fusion.depth}"
        elif self.fusion.method == "rrf":
            text += f", rrf (k {self.fusion.rrf_k}) @ {self.fusion.depth}"
        if self.rerank is not None:
            text += f", rerank top {self.rerank.top_k} with {self.rerank.model}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<retriever spec>") -> "RetrieverSpec":
        """Build and validate; an unknown key or a wrong type is a ``ConfigError`` naming the key and ``source``."""
        from embtune.config import build

        return build(cls, data, source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RetrieverSpec":
        """Read a ``retriever.json``; errors name the file, line and key (``ConfigError``)."""
        from embtune.config import build, load_yaml

        data, lines = load_yaml(path)  # JSON is YAML, and this keeps line numbers for the error messages
        return build(cls, data, str(path), lines)

    def replace(self, **changes: Any) -> "RetrieverSpec":
        """A validated copy with some sections replaced (``spec.replace(rerank=None)``)."""
        out = dataclasses.replace(copy.deepcopy(self), **changes)
        out.validate()
        return out


def _bm25_key(settings: BM25Config) -> str:
    # backend is not part of the index: FastBM25 is rank-bm25's BM25Okapi exactly (tests/test_fast_bm25.py).
    return json.dumps({k: v for k, v in dataclasses.asdict(settings).items() if k != "backend"}, sort_keys=True)


class BM25Index:
    """FastBM25 over the documents with a ``bm25`` section's tokenizer and parameters, built once."""

    def __init__(self, doc_texts: Sequence[str], settings: BM25Config) -> None:
        self.settings = settings
        self.tokenizer = build_tokenizer(settings, doc_texts)  # language: auto reads the documents
        self.index = FastBM25(self.tokenizer.tokenize_many(doc_texts), k1=settings.k1, b=settings.b)
        logger.info("built BM25 over %d documents (%s)", self.index.corpus_size, self.tokenizer.describe())

    def save(self, directory: str | Path) -> Path:
        """Write the index (its weights as ``.npy`` arrays, the vocabulary, the resolved tokenizer) to a folder
        that :meth:`load` reads back without the documents."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.index.weights  # (vocab, docs) CSR
        for name in ("data", "indices", "indptr"):
            np.save(directory / f"{name}.npy", getattr(weights, name))
        np.save(directory / "doc_freq.npy", self.index.doc_freq)
        vocab = sorted(self.index.vocab, key=self.index.vocab.__getitem__)  # tokens in id order
        meta = {"settings": dataclasses.asdict(self.settings), "tokenizer": self.tokenizer.describe(),
                "num_docs": int(self.index.corpus_size), "k1": self.index.k1, "b": self.index.b,
                "epsilon": self.index.epsilon}
        (directory / "bm25.json").write_text(json.dumps(meta, indent=1))
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path, settings: BM25Config) -> "BM25Index":
        """The index :meth:`save` wrote, its weights memory-mapped; ``settings`` must be the ones it was built
        with (an ``InputError``-style ``ValueError`` names the folder otherwise)."""
        import scipy.sparse as sp

        from embtune.retrieval.bm25 import BM25Tokenizer

        directory = Path(directory)
        meta = json.loads((directory / "bm25.json").read_text())
        if _bm25_key(BM25Config(**meta["settings"])) != _bm25_key(settings):
            raise ValueError(f"{directory}: BM25 index built with {meta['settings']}, asked for "
                             f"{dataclasses.asdict(settings)}; rebuild the bundle")
        vocab = json.loads((directory / "vocab.json").read_text())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("data", "indices", "indptr")}
        weights = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                                shape=(len(vocab), meta["num_docs"]), copy=False)
        out = cls.__new__(cls)
        out.settings = settings
        # The tokenizer as it was resolved at build time (language: auto read the documents then).
        out.tokenizer = BM25Tokenizer(**meta["tokenizer"])
        out.index = FastBM25.from_weights({token: i for i, token in enumerate(vocab)}, weights,
                                          np.load(directory / "doc_freq.npy"), k1=meta["k1"], b=meta["b"],
                                          epsilon=meta["epsilon"])
        logger.info("loaded BM25 over %d documents from %s", out.index.corpus_size, directory)
        return out

    def all_scores(self, query_text: str) -> np.ndarray:
        """(n_docs,) float64 BM25 scores of one query against every document."""
        return self.index.get_scores(self.tokenizer(query_text))

    def score_outside(self, query_text: str, document_text: str) -> float:
        """BM25 score of ``query_text`` against a text outside the index, with the index's statistics."""
        return self.index.score_outside(self.tokenizer(query_text), self.tokenizer(document_text))

    def search(self, query_texts: Sequence[str], k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (n_queries, <= k), in ``rank_order``; ``allowed`` restricts to those rows."""
        tokens = list(self.tokenizer.tokenize_many(query_texts))
        if allowed is None:
            return self.index.search(tokens, k)
        k = min(k, int(allowed.size))
        scores = np.empty((len(tokens), k))
        indices = np.empty((len(tokens), k), dtype=np.int64)
        for row, query in enumerate(tokens):
            subset = self.index.get_scores(query)[allowed]  # (n_allowed,)
            top = rank_order(subset, allowed, k)
            scores[row], indices[row] = subset[top], allowed[top]
        return scores, indices


class DenseIndex:
    """A FAISS index over the documents at one dim and precision, searched one query at a time (see module doc)."""

    def __init__(self, doc_emb: np.ndarray, dim: int, precision: str) -> None:
        from embtune.retrieval.index import faiss

        full = doc_emb.shape[1]
        if dim > full:
            raise ValueError(f"dense.dim {dim} is larger than the embeddings' dimension {full}")
        self.dim = dim or full
        vectors = truncate(doc_emb, self.dim) if self.dim < full else np.ascontiguousarray(doc_emb, np.float32)
        self.full_dim = full
        # Kept for all_scores (a whole-corpus fusion normalization reads every document's score).
        self.vectors = vectors  # (n_docs, dim)
        if faiss is None and precision == "fp32":  # a slim environment: exact numpy search, as index.search does
            self.index = None
            return
        if faiss is None:
            raise ImportError(f"dense.precision {precision!r} needs faiss: pip install faiss-cpu")
        if precision == "fp32":
            self.index = faiss.IndexFlatIP(self.dim)
        elif precision == "int8":
            self.index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit,
                                                    faiss.METRIC_INNER_PRODUCT)
            self.index.train(vectors)
        else:
            raise ValueError(f"dense.precision must be one of {PRECISIONS}, got {precision!r}")
        self.index.add(vectors)

    @classmethod
    def prebuilt(cls, index: Any) -> "DenseIndex":
        """A dense member over a FAISS index built elsewhere (a bundle's ``ivf_pq`` or ``hnsw``), searched as it
        is, one query at a time. It holds no vectors, so a whole-corpus fusion normalization cannot read it."""
        out = cls.__new__(cls)
        out.dim = out.full_dim = index.d
        out.index, out.vectors = index, None
        return out

    def all_scores(self, query_emb: np.ndarray) -> np.ndarray:
        """(n_docs,) float32 inner products of one (full dim) query embedding with every document at this dim
        (exact fp32 also for an int8 index: the statistics of a whole-corpus normalization, not a ranking)."""
        if self.vectors is None:
            raise ValueError("a whole-corpus score normalization reads every document's vector, and this index "
                             "(approximate, prebuilt) holds none: use a top-k fusion normalization or export.index: "
                             "flat")
        query = truncate(query_emb[None], self.dim)[0] if self.dim < query_emb.shape[0] else query_emb
        return self.vectors @ np.asarray(query, dtype=np.float32)

    def score_stats(self, query_emb: np.ndarray, allowed: np.ndarray | None = None) -> list[ScoreStats]:
        """Each query's :class:`ScoreStats` over every document (the ``allowed`` rows when given)."""
        out = []
        for query in query_emb:
            scores = self.all_scores(query)  # (n_docs,)
            out.append(ScoreStats.of(scores if allowed is None else scores[allowed]))
        return out

    def search(self, query_emb: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (n_queries, <= k); FAISS pads a short result with index -1."""
        from embtune.retrieval.index import numpy_exact

        queries = truncate(query_emb, self.dim) if self.dim < query_emb.shape[1] else query_emb
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (n_queries, dim)
        limit = self.index.ntotal if self.index is not None else len(self.vectors)
        limit = limit if allowed is None else int(allowed.size)
        k = min(k, limit)
        if self.index is None:  # numpy, one query at a time like FAISS below; a subset only when one is asked for
            vectors = self.vectors if allowed is None else self.vectors[allowed]
            scores = np.empty((len(queries), k), dtype=np.float32)
            indices = np.empty((len(queries), k), dtype=np.int64)
            for row in range(len(queries)):
                s, i = numpy_exact(vectors, queries[row:row + 1], k)
                scores[row], indices[row] = s[0], (i[0] if allowed is None else allowed[i[0]])
            return scores, indices
        from embtune.retrieval.index import filtered_params

        params = None if allowed is None else filtered_params(self.index, allowed)
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        if k == 0:
            return scores, indices
        for row in range(len(queries)):  # one at a time: the same arithmetic for any number of queries
            s, i = self.index.search(queries[row:row + 1], k, params=params)
            scores[row], indices[row] = s[0], i[0]
        return scores, indices


@runtime_checkable
class ShardedEmbeddings(Protocol):
    """A corpus's embeddings kept outside this process's memory (``embtune.compute.shards.ShardSet``, the Ray
    engine's Parquet shards), which :class:`Retriever` and the functions below take in place of a matrix. The
    engine that holds them searches them: this package never names it (``embtune.compute`` sits above it)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim), as the matrix's."""

    def dense_index(self, dim: int, precision: str) -> Any:
        """The dense member over these embeddings: ``search`` and ``score_stats`` as :class:`DenseIndex`'s."""

    def with_rows(self, rows: Sequence[int], vectors: np.ndarray) -> "ShardedEmbeddings":
        """A view with some rows' vectors replaced; the original is untouched."""

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of some rows, (len(rows), dim) float32."""


def dense_index(doc_emb: "np.ndarray | ShardedEmbeddings", dim: int = 0, precision: str = "fp32") -> DenseIndex:
    """The dense member over a corpus's embeddings as the engine keeps them: a matrix, or :class:`ShardedEmbeddings`
    (which build their own, with :class:`DenseIndex`'s ``search`` and ``score_stats``)."""
    if isinstance(doc_emb, ShardedEmbeddings):
        return doc_emb.dense_index(dim, precision)
    return DenseIndex(doc_emb, dim, precision)


def replace_rows(doc_emb: Any, rows: Sequence[int], vectors: np.ndarray) -> Any:
    """A copy of the corpus's embeddings (a matrix, or a :class:`ShardedEmbeddings` view) with some rows' vectors
    replaced (the probe's passages with their query cut out); the original is untouched."""
    if isinstance(doc_emb, ShardedEmbeddings):
        return doc_emb.with_rows(rows, vectors)
    out = doc_emb.copy()
    if len(rows):
        out[list(rows)] = vectors
    return out


def row_vectors(doc_emb: Any, rows: Sequence[int]) -> np.ndarray:
    """The embeddings of some rows, (len(rows), dim), from a matrix or read from the shards that hold them."""
    if isinstance(doc_emb, ShardedEmbeddings):
        return doc_emb.vectors(np.asarray(rows, dtype=np.int64))
    return doc_emb[list(rows)]


def is_approximate(index: Any) -> bool:
    """A FAISS index that is not a flat one (whose vectors are the embeddings): searched as it is."""
    from embtune.retrieval.index import faiss

    if faiss is None or isinstance(index, (np.ndarray, ShardedEmbeddings)) or index is None:
        return False
    return not isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _scorer_key(rerank_spec: RerankSpec) -> tuple[str, int]:
    return rerank_spec.model, rerank_spec.max_length


class Retriever:
    """Runs a :class:`RetrieverSpec` over one corpus; eval and serve both search through it.

    Args:
        spec: the default system ``search`` runs; ``search(..., spec=other)`` runs another over the same corpus
            (serve's request overrides), building only the members it lacks, once.
        doc_ids, doc_texts: the corpus, in index row order (texts feed BM25 and the rerank).
        doc_emb: (n_docs, full dim) normalized float32 embeddings, a FAISS flat index holding them (a bundle's
            ``index/corpus.faiss``), or :class:`ShardedEmbeddings` (the ``ShardSet`` of a corpus encoded on the Ray
            engine, searched shard by shard there); None when no spec searched here has a dense member.
        scorer: a cross-encoder with ``predict(pairs)`` for ``rerank``; default: ``CrossEncoder(spec.rerank.model)``
            loaded on first use.
        device: the device of that default cross-encoder.
        bm25: a :class:`BM25Index` already built over these documents, to share (eval's retrievers of several
            models fuse with one BM25), or one with its ``search`` and a batched ``score_stats`` (the engine's
            index over a corpus file's shards, ``embtune.compute.corpus.ShardedBM25Index``).
    """

    def __init__(self, spec: RetrieverSpec, doc_ids: Sequence[str], doc_texts: Sequence[str],
                 doc_emb: Any = None, scorer: Any = None, device: str | None = None,
                 bm25: BM25Index | None = None) -> None:
        spec.validate()
        if len(doc_ids) != len(doc_texts):
            raise ValueError(f"Retriever: {len(doc_ids)} doc ids but {len(doc_texts)} doc texts")
        # Ids read from disk on demand (a bundle's DocStore column, unique by construction) stay on disk: at 10M
        # documents a list of them is about a gigabyte.
        on_disk = getattr(doc_ids, "unique", False)
        if not on_disk and len(set(doc_ids)) != len(doc_ids):
            seen: set[str] = set()
            duplicate = next(d for d in doc_ids if d in seen or seen.add(d))
            raise ValueError(f"Retriever: document id {duplicate!r} occurs more than once; runs are keyed by id")
        self.spec = spec
        self.doc_ids = doc_ids if on_disk else list(doc_ids)
        self.doc_texts = doc_texts if on_disk else list(doc_texts)
        self._text_of_map: dict[str, str] | None = None
        self._doc_emb = doc_emb
        self._scorers: dict[tuple[str, int], Any] = ({_scorer_key(spec.rerank): scorer}
                                                     if scorer is not None and spec.rerank else {})
        self._default_scorer = scorer
        self.device = device
        self._dense: dict[tuple[int, str], DenseIndex] = {}
        self._bm25: dict[str, BM25Index] = {_bm25_key(bm25.settings): bm25} if bm25 is not None else {}
        self._lock = threading.Lock()  # members are built once even when two requests ask at the same time
        self.prepare(spec)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def _text_of(self) -> dict[str, str]:
        # The rerank reads documents by id; built on its first use, not at start-up (a dense-only server never
        # needs it).
        if self._text_of_map is None:
            self._text_of_map = dict(zip(self.doc_ids, self.doc_texts))
        return self._text_of_map

    def prepare(self, spec: RetrieverSpec) -> None:
        """Build the members ``spec`` needs that are not built yet (a startup cost, not a request's)."""
        if spec.dense is not None:
            self._dense_index(spec.dense)
        if spec.bm25 is not None:
            self._bm25_index(spec.bm25)

    def _embeddings(self) -> Any:
        """The corpus's embeddings as :func:`dense_index` takes them: the matrix (read out of a FAISS flat index
        once), or :class:`ShardedEmbeddings` as they are."""
        if self._doc_emb is None:
            raise ValueError("this retriever has no document embeddings: a spec with a dense member cannot run")
        # Anything else is a FAISS index: a flat one's vectors are the embeddings; an approximate one is searched
        # as it is (see _dense_index).
        if not isinstance(self._doc_emb, (np.ndarray, ShardedEmbeddings)) and not is_approximate(self._doc_emb):
            self._doc_emb = self._doc_emb.reconstruct_n(0, self._doc_emb.ntotal)
        return self._doc_emb

    def _dense_index(self, dense: DenseSpec) -> DenseIndex:
        with self._lock:
            full = (self._doc_emb.shape[1] if isinstance(self._doc_emb, (np.ndarray, ShardedEmbeddings))
                    else getattr(self._doc_emb, "d", 0))
            key = (dense.dim if dense.dim and dense.dim != full else 0, dense.precision)
            if key not in self._dense and is_approximate(self._doc_emb):
                if key != (0, "fp32"):
                    raise ValueError(f"this retriever searches a prebuilt approximate index at its full dim: "
                                     f"dense.dim {dense.dim} / precision {dense.precision!r} would need the "
                                     "vectors, which it does not hold; rebuild the bundle with export.index: flat")
                self._dense[key] = DenseIndex.prebuilt(self._doc_emb)
            if key not in self._dense:
                self._dense[key] = dense_index(self._embeddings(), dense.dim, dense.precision)
            return self._dense[key]

    def _bm25_index(self, settings: BM25Config) -> BM25Index:
        with self._lock:
            key = _bm25_key(settings)
            if key not in self._bm25:
                self._bm25[key] = BM25Index(self.doc_texts, settings)
            return self._bm25[key]

    def _scorer(self, rerank_spec: RerankSpec):
        with self._lock:
            key = _scorer_key(rerank_spec)
            if key not in self._scorers:
                if self._default_scorer is not None:
                    self._scorers[key] = self._default_scorer
                else:
                    from sentence_transformers import CrossEncoder

                    from embtune.models import resolve_model

                    self._scorers[key] = CrossEncoder(resolve_model(rerank_spec.model, must_exist=True),
                                                      max_length=rerank_spec.max_length or None,
                                                      device=self.device)
            return self._scorers[key]

    def search(self, query_texts: Sequence[str], query_emb: np.ndarray | None, k: int,
               query_ids: Sequence[str] | None = None, spec: RetrieverSpec | None = None,
               allowed: np.ndarray | None = None) -> Run:
        """Each query's top ``k`` documents, ``{query id: {doc id: score}}``; rank with ``fusion.ranked``.

        Args:
            query_texts: the queries (BM25 and rerank read them).
            query_emb: (n_queries, full dim) normalized embeddings; None when the spec has no dense member.
            k: documents kept per query (fewer when fewer documents are allowed or a fusion's union is smaller).
            query_ids: the run's keys; default "0", "1", ...
            spec: the system to run; default the retriever's own.
            allowed: document rows a query may return (metadata filters); None = all.
        """
        spec = spec or self.spec
        spec.validate()
        query_ids = [str(i) for i in range(len(query_texts))] if query_ids is None else list(query_ids)
        if len(query_ids) != len(query_texts):
            raise ValueError(f"Retriever.search: {len(query_ids)} query ids but {len(query_texts)} query texts")
        # A single member is searched to k (and to the rerank depth); a fusion's members to exactly its depth.
        depth = spec.fusion.depth if spec.hybrid else max(k, spec.rerank.top_k if spec.rerank else 0)
        runs: dict[str, Run] = {}
        if spec.dense is not None:
            if query_emb is None:
                raise ValueError("Retriever.search: the spec has a dense member but no query embeddings were given")
            scores, indices = self._dense_index(spec.dense).search(query_emb, depth, allowed)
            runs["dense"] = to_run(query_ids, self.doc_ids, scores, indices)
        if spec.bm25 is not None:
            scores, indices = self._bm25_index(spec.bm25).search(query_texts, depth, allowed)
            runs["bm25"] = to_run(query_ids, self.doc_ids, scores, indices)
        if spec.hybrid:
            stats = None
            if spec.fusion.method == "weighted" and needs_stats(spec.fusion.normalization):
                stats = self.score_stats(spec, query_ids, query_texts, query_emb, allowed)
            run = fuse(spec.fusion.method, runs["dense"], runs["bm25"], rrf_k=spec.fusion.rrf_k,
                       dense_weight=spec.fusion.dense_weight, depth=spec.fusion.depth,
                       normalization=spec.fusion.normalization, stats=stats)
        else:
            (run,) = runs.values()
        if spec.rerank is not None:
            run = rerank(self._scorer(spec.rerank), run, dict(zip(query_ids, query_texts)), self._text_of,
                         top_k=spec.rerank.top_k)
        return {qid: {d: docs[d] for d in ranked(docs, k)} for qid, docs in run.items()}

    def score_stats(self, spec: RetrieverSpec, query_ids: Sequence[str], query_texts: Sequence[str],
                    query_emb: np.ndarray, allowed: np.ndarray | None = None) -> dict[str, dict[str, ScoreStats]]:
        """Each member's score statistics over the corpus (the ``allowed`` rows when given), one query at a time:
        ``{"dense": {qid: ScoreStats}, "sparse": {qid: ScoreStats}}``, what a whole-corpus normalization reads."""
        dense_index, bm25_index = self._dense_index(spec.dense), self._bm25_index(spec.bm25)
        stats: dict[str, dict[str, ScoreStats]] = {"dense": dict(zip(query_ids, dense_index.score_stats(
            np.asarray(query_emb), allowed))), "sparse": {}}
        if hasattr(bm25_index, "score_stats"):  # an index over shards merges each shard's statistics
            stats["sparse"] = dict(zip(query_ids, bm25_index.score_stats(query_texts, allowed)))
            return stats
        for i, qid in enumerate(query_ids):
            scores = bm25_index.all_scores(query_texts[i])  # (n_docs,)
            stats["sparse"][qid] = ScoreStats.of(scores if allowed is None else scores[allowed])
        return stats

    def member_runs(self, query_texts: Sequence[str], query_emb: np.ndarray, depth: int,
                    query_ids: Sequence[str] | None = None, spec: RetrieverSpec | None = None
                    ) -> tuple[MemberRun, MemberRun]:
        """(dense run, BM25 run), each query's top ``depth``, carrying whole-corpus statistics: what a caller
        that fuses at several weights (the label-free probe, benchmarks) passes to ``weighted_fuse``."""
        spec = spec or self.spec
        query_ids = [str(i) for i in range(len(query_texts))] if query_ids is None else list(query_ids)
        scores, indices = self._dense_index(spec.dense).search(query_emb, depth)
        dense = to_run(query_ids, self.doc_ids, scores, indices)
        scores, indices = self._bm25_index(spec.bm25).search(query_texts, depth)
        sparse = to_run(query_ids, self.doc_ids, scores, indices)
        stats = self.score_stats(spec, query_ids, query_texts, query_emb)
        return MemberRun(dense, stats["dense"]), MemberRun(sparse, stats["sparse"])
