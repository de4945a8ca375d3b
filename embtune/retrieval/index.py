"""FAISS search with one return convention: ``(scores, indices)``, each (n_queries, k), best first, as FAISS does.

``flat`` is exact inner product (cosine on normalized embeddings) and the ground truth for the approximate ones;
``ivf`` (``IndexIVFFlat``) searches ``nprobe`` of ``nlist`` coarse clusters. An approximate index can return fewer
than ``k`` documents for a query: FAISS pads with index -1, and :func:`to_run` skips those.

Without faiss installed (a slim environment, e.g. a GPU box with only the training stack), ``flat`` falls back to
an exact numpy search with the same ordering, and says so once; the other index types need faiss.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; see the module docstring
    faiss = None

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int, index: str = "flat", nlist: int = 0,
           nprobe: int = 16, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product: (scores float32, indices int64), each (n_queries, min(k, n_docs))."""
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    n_docs, dim = doc_emb.shape
    k = min(k, n_docs)
    if faiss is None and index == "flat":
        return numpy_exact(doc_emb, query_emb, k)
    if faiss is None:
        raise ImportError(f"index {index!r} needs faiss: pip install faiss-cpu")
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = min(nlist or max(1, int(4 * math.sqrt(n_docs))), n_docs)
        faiss_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        faiss_index.cp.seed = seed
        faiss_index.train(doc_emb)
        faiss_index.nprobe = min(nprobe, nlist)
        logger.info("IVF index: %d lists, nprobe %d", nlist, faiss_index.nprobe)
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got {index!r}")
    faiss_index.add(doc_emb)
    scores, indices = faiss_index.search(query_emb, k)
    return scores, indices.astype(np.int64)


@functools.cache
def _say_no_faiss() -> None:
    # Once per process: the server searches one query at a time.
    logger.warning("faiss is not installed: exact search with numpy")


def numpy_exact(doc_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product, best first (ties by lower index, as IndexFlatIP returns them)."""
    _say_no_faiss()
    scores = query_emb @ doc_emb.T  # (n_queries, n_docs)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n_queries, k)
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def exact_search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (``faiss.IndexFlatIP``): (scores, indices)."""
    return search(doc_emb, query_emb, k, index="flat")


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, indices: np.ndarray) -> Run:
    """pytrec_eval run format, ``{query id: {doc id: score}}``, from (scores, indices); index -1 is skipped."""
    return {
        qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], indices[i]) if j >= 0}
        for i, qid in enumerate(query_ids)
    }


# --- approximate indexes a bundle serves (export.index) ------------------------------------------------------------
# flat: exact, the vectors in RAM (4 * dim bytes a vector). ivf_pq: IVF lists of PQ codes, re-scored by a Refine
# index of 8-bit scalar-quantized vectors; both live in the index file and are memory-mapped at load, so the server's
# memory holds the coarse centroids and the pages the searches touch. hnsw: a graph over the float vectors, read into
# RAM (FAISS cannot map a graph), 4 * dim + ~8 * M bytes a vector: for corpora that fit.
ANN_KINDS = ("flat", "ivf_pq", "hnsw")


def ann_factory(kind: str, n_rows: int, dim: int, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 32,
                refine: bool = True) -> str:
    """The ``faiss.index_factory`` string of an ``export.index`` kind for ``n_rows`` vectors of ``dim``.

    ``nlist`` 0 = ``4 * sqrt(n_rows)`` rounded to a power of two (FAISS's guideline), at most one list per 39 rows
    (FAISS's k-means warns below 39 training vectors a centroid); ``pq_m`` 0 = ``dim / 8``
    sub-quantizers (8 dims, one byte each); ``refine`` re-scores the PQ candidates with 8-bit vectors (PQ alone
    ranks by a coarse approximation of the inner product, too coarse for a top-10 at 10M vectors).
    """
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind == "ivf_pq":
        if not nlist:
            guideline = round(math.log2(max(1.0, 4 * math.sqrt(n_rows))))
            trainable = math.floor(math.log2(max(1.0, n_rows / 39)))
            nlist = 1 << max(0, min(guideline, trainable))
        pq_m = pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise ValueError(f"ivf_pq: the dimension {dim} is not a multiple of pq_m {pq_m}")
        return f"IVF{nlist},PQ{pq_m}" + (",Refine(SQ8)" if refine else "")
    raise ValueError(f"index kind must be one of {list(ANN_KINDS)}, got {kind!r}")


def new_index(factory: str, dim: int):
    """An empty inner-product FAISS index from a factory string (``ann_factory``)."""
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


def set_search_params(index, nprobe: int = 0, ef_search: int = 0, k_factor: float = 0) -> dict[str, float]:
    """Set the search-time knobs an index has (0 = leave as is); returns the ones it has, as set now."""
    applied: dict[str, float] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if nprobe:
            ivf.nprobe = min(nprobe, ivf.nlist)
        applied["nprobe"] = int(ivf.nprobe)
    hnsw = _downcast_hnsw(index)
    if hnsw is not None:
        if ef_search:
            hnsw.hnsw.efSearch = ef_search
        applied["efSearch"] = int(hnsw.hnsw.efSearch)
    refine = faiss.try_extract_index_refine(index) if hasattr(faiss, "try_extract_index_refine") else None
    if refine is None and isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        refine = faiss.downcast_index(index)
    if refine is not None:
        if k_factor:
            refine.k_factor = k_factor
        applied["k_factor"] = float(refine.k_factor)
    return applied


def _downcast_hnsw(index):
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def read_index(path: str, mmap: bool = True):
    """Read an index file; ``mmap`` maps what FAISS can map (IVF lists, flat and scalar-quantized codes) instead of
    reading it into memory. The file must then stay in place while the index is used."""
    # IO_FLAG_MMAP_IFC maps IVF lists and flat / scalar-quantized codes in faiss-cpu 1.15 (IO_FLAG_MMAP reads a
    # Refine's codes into memory, and the two together fail on IVF lists); an HNSW graph is read either way.
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    if mmap:
        advise_random(path)
    return index


def advise_random(path) -> int:
    """``madvise(MADV_RANDOM)`` on this process's mappings of ``path``; returns how many were advised.

    A search reads a few scattered rows of a memory-mapped index (the refine's candidates, a few IVF lists). By
    default each page fault also maps the neighbouring pages already in the page cache (fault-around) and reads
    ahead, so the server's resident memory grows by tens of pages per row read: on the 10M bundle of
    scripts/bench_serve_scale.py that made its RSS most of the index file after 100 queries. Linux only; elsewhere
    (or without the mapping) nothing is done.
    """
    import ctypes
    import os

    try:
        target = os.path.realpath(path)
        with open("/proc/self/maps") as handle:
            ranges = [line.split()[0] for line in handle if line.rstrip().endswith(target)]
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    madv_random = 1
    for span in ranges:
        start, end = (int(x, 16) for x in span.split("-"))
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madv_random)
    return len(ranges)


def filtered_params(index, allowed: np.ndarray):
    """FAISS search parameters restricting ``index`` to the ``allowed`` rows, keeping its own search settings: an
    IVF or HNSW index (or a Refine around one) refuses the plain ``SearchParameters`` and would otherwise forget
    its nprobe / efSearch."""
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    inner = faiss.downcast_index(index)
    refine = inner if isinstance(inner, faiss.IndexRefine) else None
    base = faiss.downcast_index(refine.base_index) if refine is not None else inner
    if isinstance(base, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=base.nprobe)
    elif isinstance(base, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=base.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    params.selector_ref = selector  # the Python object must outlive the search
    if refine is not None:
        params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=params)
        params.base_ref = params.base_index_params
    return params
