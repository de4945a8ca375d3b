"""Export bundles: the folder the serve stage loads (and the export stage writes).

Layout::

    <bundle>/
      model/               # SentenceTransformer(path) loads it
      index/corpus.faiss   # optional: an inner-product FAISS index over the embeddings eval searched (the model's
                           # similarity, cosine for a normalized model, dot for a dot-product one): export.index
                           # flat (exact, IndexFlatIP), ivf_pq or hnsw (manifest "index": kind, factory, nprobe...)
      index/docs.jsonl     # optional: one {"_id", "title", "text", ...metadata} per index row, same order
      index/docs.offsets.npy, index/docs.idhash.npy   # row -> byte offset, id -> row (embtune.retrieval.docstore)
      index/bm25/          # optional: the BM25 index retriever.json fuses with, built once at export
      retriever.json       # optional: the RetrieverSpec /search serves (embtune/retrieval/spec.py); default dense
      manifest.json        # {"dims": [...], "metric": "cosine", "corpus_hash": ..., "versions": {...}, and the
                           # settings the index was built with: SERVING_KEYS}

Example::

    build_bundle("runs/x/train/model", docs, "runs/x/export")
    bundle = load_bundle("runs/x/export")
    bundle.encode(["a query"])  # (1, dim) float32, as eval encodes a query (L2-normalized for a cosine model)

The bundle ranks as eval measured: the model's own similarity (a dot-product model is not renormalized into a
cosine one), the encoder backend, token limit and title handling that embedded the index, and the BM25 language
its documents resolve to. ``manifest.json`` records them (``SERVING_KEYS``); :func:`load_bundle` serves with them
and refuses, in one line naming the setting (:class:`BundleMismatch`), to serve otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from embtune.compute.corpus import bm25_index
from embtune.compute.encoding import encode_corpus
from embtune.config import InputError
from embtune.dataio import document_text
from embtune.manifest import hash_path, versions
from embtune.retrieval.bm25 import resolve_language
from embtune.retrieval.docstore import DocStore, offsets_path, write_store
from embtune.retrieval.encoder import BACKENDS, cache_key, encode, remember_loaded
from embtune.retrieval.index import ANN_KINDS, read_index, set_search_params
from embtune.retrieval.spec import SPEC_FILE, BM25Index, DenseSpec, RetrieverSpec

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
INDEX_FILE = "index/corpus.faiss"
DOCS_FILE = "index/docs.jsonl"
BM25_DIR = "index/bm25"
MANIFEST_FILE = "manifest.json"
# What the index was built with and what serving must match; a bundle written before these were recorded has none.
SERVING_KEYS = ("similarity_fn_name", "encoder_backend", "max_seq_length", "include_title", "bm25_language")


class BundleMismatch(InputError, ValueError):
    """A bundle would be served with another setting than the one it was built and measured with (one line)."""


def check_setting(bundle_dir: Path, manifest: dict[str, Any], key: str, serving: Any, setting: str) -> None:
    """Raise :class:`BundleMismatch` when the manifest records ``key`` and ``serving`` differs from it."""
    if key in manifest and manifest[key] != serving:
        raise BundleMismatch(f"bundle {bundle_dir}: built with {key}={manifest[key]!r} ({MANIFEST_FILE}) but would be "
                             f"served with {serving!r}; set {setting}={manifest[key]} or rebuild the bundle")


def similarity_of(model) -> str:
    """The model's similarity function as sentence-transformers names it (None = its default, cosine)."""
    return getattr(model, "similarity_fn_name", None) or "cosine"


def _load_model(model_dir: Path, backend: str, onnx_file: str = "", device: str | None = None, threads: int = 0,
                max_seq_length: int = 0):
    """A SentenceTransformer (torch) or an OnnxEncoder over the bundle model's own ONNX file; ``max_seq_length``
    > 0 truncates there (eval's ``eval.max_seq_length``), 0 = the model's own."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {list(BACKENDS)})")
    if backend == "torch":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device=device or None)
        model.eval()
        if max_seq_length:
            model.max_seq_length = max_seq_length
        return model
    if backend.startswith("openvino"):
        from embtune.retrieval.openvino import BACKEND_FILES as IR_FILES
        from embtune.retrieval.openvino import OpenVINOEncoder

        return OpenVINOEncoder(model_dir, onnx_file or IR_FILES[backend], threads=threads)
    from embtune.retrieval.onnx import BACKEND_FILES, OnnxEncoder

    return OnnxEncoder(model_dir, onnx_file or BACKEND_FILES[backend], threads=threads, max_seq_length=max_seq_length)


def finite_length(max_seq_length: Any) -> int:
    """A model's token limit as the manifest records it: 0 for none (a ``StaticEmbedding`` model's is infinite)."""
    import math

    return int(max_seq_length) if max_seq_length and math.isfinite(max_seq_length) else 0


def build_bundle(model_dir: str | Path, docs: Iterable[dict[str, Any]] | None, out_dir: str | Path,
                 batch_size: int = 64, dims: list[int] | None = None, device: str | None = None,
                 copy_model: bool = True, spec: RetrieverSpec | None = None, backend: str = "torch",
                 include_title: bool = True, max_seq_length: int = 0, index: str = "flat", index_factory: str = "",
                 nprobe: int = 32, ef_search: int = 128, k_factor: float = 32.0, train_rows: int = 0,
                 embeddings: Any = None, train_sample: np.ndarray | None = None, doc_texts: Any = None) -> Path:
    """Write a bundle: copy the model, embed ``docs`` into an exact inner-product index, write the manifest.

    Args:
        model_dir: a SentenceTransformer folder.
        docs: dicts with ``_id`` and ``text`` (``title`` and any other keys optional; the others are metadata that
            ``/search`` filters on). None = a bundle without an index (embeddings only).
        out_dir: the bundle folder (created; an existing ``model/`` or ``index/`` is replaced).
        batch_size: encoding batch size.
        dims: Matryoshka dimensions the model was trained for, recorded in the manifest; default [full dim].
        device: encoding device (None = sentence-transformers' choice).
        copy_model: False when ``model_dir`` already is ``<out_dir>/model``.
        spec: the retrieval system ``/search`` serves, written to ``retriever.json`` (its dense member searches
            this bundle's model, so ``dense.model`` is written as ``"model"``); None = dense at the full dim.
        backend: the encoder backend that embeds ``docs`` (``embtune.retrieval.encoder.BACKENDS``); the ONNX ones
            write ``model/onnx/`` first (:func:`embtune.retrieval.onnx.export_onnx`), the OpenVINO ones
            ``model/openvino/`` (:func:`embtune.retrieval.openvino.export_openvino`, int8 calibrated on ``docs``).
            Serve the bundle with the same backend, so queries and documents come from one encoder.
        include_title: documents are embedded (and BM25 / the rerank read them) as title + text, or the text alone
            (``mining.include_title``, as eval read them).
        max_seq_length: the encoder's token limit eval used (``eval.max_seq_length``); 0 = the model's own.
        index: ``flat`` (exact), ``ivf_pq`` or ``hnsw`` (``embtune.retrieval.index.ANN_KINDS``); ``index_factory``
            overrides the FAISS factory string the kind picks (``ann_factory``); ``nprobe``, ``ef_search`` and
            ``k_factor`` are the search settings recorded in the manifest and served; ``train_rows`` the IVF
            training sample (0 = 64 per list).
        embeddings: the documents' vectors already computed (``ShardSet``-like: ``num_rows``, ``dim``, iterating
            ``(start, ids, vectors)`` shards), in ``docs`` order; ``docs`` is then streamed to disk, never held.
        train_sample: vectors to train an approximate index on (default: sampled from ``embeddings``).
        doc_texts: the documents' texts as the engine reads them, in ``docs`` order (``embtune.compute.corpus``: on
            the Ray engine a corpus file's column, whose shards the actors encode from the file); ``docs`` is then
            streamed to disk, never held, and BM25 is built on the file's shards.

    The manifest records the settings (``SERVING_KEYS``) that :func:`load_bundle` then serves with.
    With ``compute.engine: ray`` the documents are encoded into the embedding cache's Parquet shards and the index
    is filled one shard at a time by a task (``embtune.compute.export.write_faiss_index_on_engine``): the same
    index, without the whole matrix, the index or its training sample in this process. The workers load
    ``<out_dir>/model``, so a remote cluster must see that path.

    Returns:
        ``out_dir`` as a Path.
    """
    from embtune.retrieval.onnx import BACKEND_FILES, export_onnx

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {list(BACKENDS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target_model = out_dir / MODEL_DIR
    if copy_model and Path(model_dir).resolve() != target_model.resolve():
        if target_model.exists():
            shutil.rmtree(target_model)
        shutil.copytree(model_dir, target_model)
    if backend.startswith("openvino"):
        from embtune.retrieval.encoder import CALIBRATED_BACKENDS
        from embtune.retrieval.openvino import BACKEND_FILES as IR_FILES
        from embtune.retrieval.openvino import export_openvino

        if not (target_model / IR_FILES[backend]).is_file():
            # The int8 IR is calibrated on the documents the bundle indexes (its recipe lands beside the IR).
            docs = list(docs) if docs is not None else None
            if backend in CALIBRATED_BACKENDS and not docs:
                raise ValueError(f"backend {backend!r} calibrates on the bundle's documents, and it has none")
            export_openvino(target_model, calibration_texts=[d["text"] for d in docs]
                            if backend in CALIBRATED_BACKENDS else None)
    elif backend != "torch" and not (target_model / BACKEND_FILES[backend]).is_file():
        export_onnx(target_model, quantize=backend == "onnx-int8")
    # Ray workers (compute.engine: ray) load the bundle's copy of the model, with the same backend.
    model = remember_loaded(_load_model(target_model, backend, device=device, max_seq_length=max_seq_length),
                            str(target_model.resolve()), backend)
    dim = model.get_embedding_dimension()

    manifest: dict[str, Any] = {"dims": dims or [dim], "metric": similarity_of(model), "corpus_hash": None,
                                "num_docs": 0, "similarity_fn_name": similarity_of(model), "encoder_backend": backend,
                                "max_seq_length": finite_length(model.max_seq_length), "include_title": include_title}
    index_dir = out_dir / "index"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    if index not in ANN_KINDS:
        raise ValueError(f"export.index must be one of {list(ANN_KINDS)}, got {index!r}")
    if docs is not None:
        import faiss  # only bundles with an index need it

        index_dir.mkdir(parents=True)
        if embeddings is None and doc_texts is not None:  # texts the engine reads: the documents are streamed
            num_docs, fields = write_store(docs, out_dir / DOCS_FILE)
            key = cache_key(str(model_dir), model.max_seq_length, role="document")
            embeddings = encode_corpus(model, doc_texts, batch_size, cache_key=key, desc="bundle corpus",
                                       role="document")
        elif embeddings is None:
            docs = list(docs)
            num_docs, fields = write_store(docs, out_dir / DOCS_FILE)  # refuses a malformed document, naming its row
            # The source model's cache key: eval encoded this corpus with the same weights minutes before (the
            # cache file name adds the backend's tag, so an ONNX bundle never reads torch's embeddings).
            # Documents take the model's document route (an asymmetric label-free model's is the base model's).
            key = cache_key(str(model_dir), model.max_seq_length, role="document")
            doc_texts = [document_text(d, include_title) for d in docs]
            # eval's vectors as they are: encode normalizes a cosine model's, and a dot-product model is searched
            # by its raw inner product (normalizing would serve a cosine ranking eval never measured).
            embeddings = encode_corpus(model, doc_texts, batch_size, cache_key=key,
                                       desc="bundle corpus", role="document")  # (n, dim), or its shards on Ray
        else:  # vectors computed elsewhere: the documents go straight to disk
            num_docs, fields = write_store(docs, out_dir / DOCS_FILE)
            if num_docs != embeddings.shape[0]:
                raise ValueError(f"build_bundle: {num_docs} documents but {embeddings.shape[0]} embeddings")
        started = time.perf_counter()
        if isinstance(embeddings, np.ndarray) and index == "flat":
            flat = faiss.IndexFlatIP(dim)
            flat.add(np.ascontiguousarray(embeddings, dtype=np.float32))
            faiss.write_index(flat, str(out_dir / INDEX_FILE))
        else:  # filled one shard at a time: the whole matrix is never in this process
            from embtune.compute.export import write_faiss_index_on_engine

            # Shards on the Ray engine: one task builds it, so the index never sits in this process.
            shards = _OneShard(embeddings) if isinstance(embeddings, np.ndarray) else embeddings
            write_faiss_index_on_engine(shards, out_dir / INDEX_FILE, kind=index, factory=index_factory,
                                        nprobe=nprobe, train_rows=train_rows, sample=train_sample)
        from embtune.retrieval.index import ann_factory

        rows = embeddings.shape[0]
        manifest["index"] = {"kind": index, "factory": index_factory or ann_factory(index, rows, dim),
                             "build_s": round(time.perf_counter() - started, 1),
                             **_search_settings(index, nprobe, ef_search, k_factor)}
        manifest["corpus_hash"] = hash_path(out_dir / DOCS_FILE)
        manifest["num_docs"] = num_docs
        manifest["metadata_fields"] = fields  # the server indexes these for filters at start (none: no scan)
    spec = spec or RetrieverSpec(dense=DenseSpec(dim=dim))
    if spec.dense is not None:
        spec = spec.replace(dense=DenseSpec(model=MODEL_DIR, dim=spec.dense.dim or dim, precision=spec.dense.precision))
    if (spec.bm25 is not None or spec.rerank is not None) and docs is None:
        raise ValueError(f"spec {spec.describe()!r} needs the documents' text: pass docs")
    if spec.bm25 is not None:
        if doc_texts is None:
            doc_texts = [document_text(d, include_title) for d in DocStore(out_dir / DOCS_FILE)]
        manifest["bm25_language"] = resolve_language(spec.bm25, doc_texts)
        # Built once here and memory-mapped by the server, instead of rebuilt from docs.jsonl at every start (on
        # the engine's shards for a corpus file's texts).
        bm25_index(doc_texts, spec.bm25).save(out_dir / BM25_DIR)
    spec.save(out_dir / SPEC_FILE)
    manifest["retriever"] = spec.describe()
    manifest["versions"] = versions()
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    logger.info("wrote bundle %s (%d docs, dim %d)", out_dir, manifest["num_docs"], dim)
    return out_dir


def _search_settings(kind: str, nprobe: int, ef_search: int, k_factor: float) -> dict[str, float]:
    """The search-time settings of an index kind, as the manifest records them and the server sets them."""
    if kind == "ivf_pq":
        return {"nprobe": nprobe, "k_factor": k_factor}
    if kind == "hnsw":
        return {"efSearch": ef_search}
    return {}


class _OneShard:
    """An in-memory matrix as one shard, for the shard-by-shard index writer."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # (n, dim)
        self.num_rows, self.dim = self.matrix.shape

    def __iter__(self):
        yield 0, [], self.matrix

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.matrix[rows]


@dataclass
class Bundle:
    """A loaded bundle. ``encode`` returns eval's query embeddings (float32, (len(texts), dim)); ``doc_texts``
    are the documents as the index embedded them (title handling from the manifest).

    Thread safety: a Hugging Face fast tokenizer keeps its padding and truncation settings as mutable state that
    every call sets, so one tokenizer used by two threads at once builds batches from another call's settings
    (rows of unequal length, or counts cut at the model's limit). ``encode`` therefore runs one call at a time
    (the model's tokenizer belongs to it), and ``count_tokens`` uses a copy of the tokenizer per calling thread.
    """

    path: Path
    model: Any  # SentenceTransformer, or OnnxEncoder for the onnx backends
    manifest: dict[str, Any]
    dim: int
    max_seq_length: int
    index: Any = None  # faiss index or None
    docs: Any = field(default_factory=list)  # a DocStore (rows read on demand), or a list for an older bundle
    spec: RetrieverSpec = field(default_factory=RetrieverSpec)  # retriever.json, or dense at the full dim
    doc_texts: Any = field(default_factory=list)  # what BM25 and the rerank read, as eval read it (on demand)
    bm25: BM25Index | None = None  # index/bm25, the spec's BM25 as export built it
    encode: Callable[[list[str]], np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]
    _counting: threading.local = field(default_factory=threading.local, init=False, repr=False)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text has as the model sees it (special tokens included, before truncation).

        Safe to call from any thread while another encodes: each thread counts with its own tokenizer copy.
        """
        tokenizer = getattr(self._counting, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._counting.tokenizer = _counting_tokenizer(self.model.tokenizer)
        if hasattr(tokenizer, "encode_batch_fast"):
            return [len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def recorded_backend(manifest: dict[str, Any]) -> str:
    """The encoder backend that embedded the bundle's index (``manifest.json`` ``encoder_backend``; torch for a
    bundle written before it was recorded): queries must be encoded the same way."""
    return manifest.get("encoder_backend") or "torch"


def check_bundle(bundle_dir: str | Path) -> None:
    """Raise :class:`InputError` (one line: what is missing and how to get it) unless ``bundle_dir`` is a whole bundle.

    ``build_bundle`` writes ``manifest.json`` last, so a bundle without one is an export that did not finish.
    """
    bundle_dir = Path(bundle_dir)
    export = "export one with `python -m embtune.serve CONFIG`, the pipeline's last stage"
    if not bundle_dir.is_dir():
        raise InputError(f"bundle {bundle_dir}: no such folder ({export}, or give --bundle an existing bundle)")
    if not (bundle_dir / MODEL_DIR).is_dir():
        raise InputError(f"bundle {bundle_dir}: no {MODEL_DIR}/ folder, so not a bundle ({export})")
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(f"bundle {bundle_dir}: no {MANIFEST_FILE}, so its export did not finish (rerun the export: "
                         "`python -m embtune.serve CONFIG --force`)")
    try:
        json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{manifest_path}:{err.lineno}: not valid JSON ({err.msg}); rerun the export: "
                         "`python -m embtune.serve CONFIG --force`") from None


def _counting_tokenizer(tokenizer):
    """A copy of ``tokenizer`` for counting: for a fast tokenizer its Rust core without truncation or padding (a
    fraction of the cost of transformers' call, which the server pays per request), else the whole tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return copy.deepcopy(tokenizer)
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    return backend


def load_bundle(bundle_dir: str | Path, backend: str | None = None, onnx_file: str = "",
                device: str | None = None, batch_size: int = 64, threads: int = 0) -> Bundle:
    """Load ``<bundle>/model`` on an encoder backend, and the index and docs when the bundle has them, with the
    settings the manifest records (``SERVING_KEYS``).

    Args:
        backend: ``torch``, ``onnx`` or ``onnx-int8`` (``embtune.retrieval.encoder.BACKENDS``); None = the one that
            embedded the index (manifest ``encoder_backend``, else torch). Another one than that is refused.
        onnx_file: the ONNX file under ``<bundle>/model`` for the ONNX backends; "" = the backend's own
            (``onnx/model.onnx``, ``onnx/model_qint8.onnx``; ``export.onnx`` and ``eval.backend`` write them).
        threads: > 0 caps the CPU threads of each forward pass (set in whichever thread calls ``encode``).

    Raises:
        FileNotFoundError: the bundle, its model folder or the ONNX file is missing.
        BundleMismatch: ``backend`` or the model's similarity function is not the one the index was built with.
        ValueError: an unknown backend, or the index and docs disagree (row counts, dimension).
    """
    bundle_dir = Path(bundle_dir)
    model_dir = bundle_dir / MODEL_DIR
    if not model_dir.is_dir():
        raise FileNotFoundError(f"bundle {bundle_dir}: no model folder at {model_dir}")
    manifest_path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    backend = backend or recorded_backend(manifest)
    check_setting(bundle_dir, manifest, "encoder_backend", backend, "backend")
    model = _load_model(model_dir, backend, onnx_file, device, threads, int(manifest.get("max_seq_length") or 0))
    check_setting(bundle_dir, manifest, "similarity_fn_name", similarity_of(model),
                  f"similarity_fn_name in {model_dir}/config_sentence_transformers.json")
    dim = model.get_embedding_dimension()
    # The model and its tokenizer serve one encode call at a time (see Bundle); two forward passes at once would
    # only share the same cores anyway. The server's micro-batcher calls from one thread, so it never waits here.
    encode_lock = threading.Lock()

    def encode_texts(texts: list[str]) -> np.ndarray:
        # torch's thread count is per calling thread (OpenMP), so it is set where the forward pass (or, on the
        # ONNX backends, the pooling) runs; onnxruntime's is the session's own.
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        # The core's encode, as eval's: the same normalization (none for a dot-product model) and the query route,
        # so a query alone gets eval's vector bit for bit (an asymmetric model encodes queries and documents with
        # different routes).
        with encode_lock:
            return encode(model, texts, batch_size, role="query")  # (n, dim)

    index, docs = None, []
    if (bundle_dir / INDEX_FILE).is_file():
        # Memory-mapped where FAISS can (IVF lists, flat and SQ codes): the file's pages are read as searches
        # touch them, so start-up does not read the index and the server's memory holds what it searches.
        index = read_index(bundle_dir / INDEX_FILE, mmap=True)
        set_search_params(index, **_search_keywords(manifest.get("index", {})))
        if index.d != dim:
            raise ValueError(f"{bundle_dir / INDEX_FILE}: index dimension {index.d} != model dimension {dim}")
        if offsets_path(bundle_dir / DOCS_FILE).is_file():
            docs = DocStore(bundle_dir / DOCS_FILE)
            if len(docs) != index.ntotal:
                raise ValueError(f"{bundle_dir}: {DOCS_FILE} has {len(docs)} rows but {INDEX_FILE} has {index.ntotal}")
        elif (bundle_dir / DOCS_FILE).is_file():  # a bundle written before the offsets were
            with open(bundle_dir / DOCS_FILE) as handle:
                for line, text in enumerate(handle, 1):
                    if not text.strip():
                        continue
                    try:
                        docs.append(json.loads(text))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{bundle_dir / DOCS_FILE}:{line}: invalid JSON: {err}") from None
            if len(docs) != index.ntotal:
                raise ValueError(f"{bundle_dir}: {DOCS_FILE} has {len(docs)} rows but {INDEX_FILE} has {index.ntotal}")
        else:
            logger.warning("bundle %s has an index but no %s: /search returns row numbers as ids",
                           bundle_dir, DOCS_FILE)
    spec_path = bundle_dir / SPEC_FILE
    spec = RetrieverSpec.load(spec_path) if spec_path.is_file() else RetrieverSpec(dense=DenseSpec(MODEL_DIR, dim))
    if spec.dense is not None and spec.dense.dim > dim:
        raise ValueError(f"{spec_path}: dense.dim {spec.dense.dim} is larger than the model's dimension {dim}")
    if (spec.bm25 is not None or spec.rerank is not None) and not docs:
        raise ValueError(f"{spec_path}: {spec.describe()!r} needs {bundle_dir / DOCS_FILE} (the documents' text)")
    include_title = manifest.get("include_title", True)
    doc_texts = (docs.texts(include_title) if isinstance(docs, DocStore)
                 else [document_text(d, include_title) for d in docs])
    bm25 = None
    if spec.bm25 is not None and (bundle_dir / BM25_DIR).is_dir():
        bm25 = BM25Index.load(bundle_dir / BM25_DIR, spec.bm25)  # its tokenizer is the one export resolved
    elif spec.bm25 is not None:  # an older bundle: BM25 is rebuilt from the documents at start
        check_setting(bundle_dir, manifest, "bm25_language", resolve_language(spec.bm25, doc_texts),
                      f"bm25.language in {spec_path}")
    # A model without a token limit (StaticEmbedding) is served at 512 tokens an input (serve.max_input_tokens
    # sets another bound).
    return Bundle(path=bundle_dir, model=model, manifest=manifest, dim=dim,
                  max_seq_length=finite_length(model.max_seq_length) or 512, index=index, docs=docs,
                  encode=encode_texts, spec=spec, doc_texts=doc_texts, bm25=bm25)


def retune_bundle(bundle_dir: str | Path, nprobe: int = 0, ef_search: int = 0, k_factor: float = 0) -> dict:
    """Change the search settings a bundle's approximate index is served with (0 = keep), in its manifest: they are
    search-time parameters, so the index is not rebuilt. Returns the manifest's new ``index`` entry."""
    path = Path(bundle_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    recorded = manifest.get("index")
    if not recorded or recorded["kind"] == "flat":
        raise InputError(f"{path}: the bundle has no approximate index to retune (index kind "
                         f"{(recorded or {}).get('kind', 'flat')})")
    changes = {"nprobe": nprobe, "efSearch": ef_search, "k_factor": k_factor}
    recorded.update({key: value for key, value in changes.items() if value and key in recorded})
    path.write_text(json.dumps(manifest, indent=2))
    return recorded


def _search_keywords(recorded: dict[str, Any]) -> dict[str, float]:
    """The manifest's ``index`` search settings as ``set_search_params`` keywords."""
    return {"nprobe": int(recorded.get("nprobe", 0)), "ef_search": int(recorded.get("efSearch", 0)),
            "k_factor": float(recorded.get("k_factor", 0))}
