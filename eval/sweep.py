"""Deployment sweep: what each FAISS index, Matryoshka dim and precision costs and keeps.

For every dim in ``eval.sweep.dims`` the corpus and query embeddings are truncated and renormalized
(``embtune.retrieval.encoder.truncate``), then searched with:

==========  ===========================================================================================
``flat``    ``IndexFlatIP``, fp32, exact: the ground truth for "recall@10 vs exact" at that dim
``int8``    ``IndexScalarQuantizer(QT_8bit)``: per-dimension trained int8 codes, float query (asymmetric)
``int4``    ``IndexScalarQuantizer(QT_4bit)``: the same with 4-bit codes (two dimensions per byte)
``binary``  ``IndexBinaryFlat`` over sign bits, Hamming distance; and ``binary+rescore_<docs>``: the top
            ``k * rescore_multiplier`` Hamming candidates rescored by the float query's inner product with
            ``bits``: the documents' own sign bits as +-1 (sentence-transformers' binary rescoring; no extra
            bytes), ``int8``: their int8 codes (decoded), or ``fp32``: their float vectors
``ivf``     ``IndexIVFFlat`` (nlist) at each ``nprobe``
``hnsw``    ``IndexHNSWFlat`` (M) at each ``efSearch``
``ivfpq``   ``IndexIVFPQ`` (nlist, ``pq_bytes`` 8-bit subquantizers) at ``pq_nprobe``
==========  ===========================================================================================

Each row: ``ndcg@10`` (pytrec_eval, as ``embtune/retrieval/metrics.py``), ``recall@10_vs_exact`` (mean overlap of
the top 10 with the fp32 Flat top 10 at the same dim), ``qps`` (all queries in one batched search, best of 3, with
``eval.sweep.threads`` FAISS threads), ``index_bytes`` (``faiss.serialize_index``: codes plus centroids/graph),
``rescore_bytes`` (the int8 or fp32 vectors a rescoring row also keeps), ``bytes_per_vector``
(``(index_bytes + rescore_bytes) / n_docs``) and ``build_seconds`` (train + add).

It runs inside the eval stage when ``eval.sweep.enabled=true``
(``python -m embtune.eval CONFIG eval.sweep.enabled=true``),
writing ``<run_dir>/eval/sweep.json`` and ``sweep.png``; ``scripts/bench_deploy_sweep.py`` runs it on SciFact.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from embtune.retrieval.encoder import truncate
from embtune.retrieval.index import exact_search, to_run
from embtune.retrieval.metrics import score_run

logger = logging.getLogger(__name__)

Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, ids), (nq, k) each
COLUMNS = ("ndcg@10", "recall@10_vs_exact", "qps", "bytes_per_vector", "index_bytes", "build_seconds")


def _index_bytes(index) -> int:
    if isinstance(index, faiss.IndexBinary):
        return int(faiss.serialize_index_binary(index).size)
    return int(faiss.serialize_index(index).size)


def _binary_codes(x: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 per byte (sentence-transformers' ``quantize_embeddings(precision="ubinary")``)."""
    return np.packbits(x > 0, axis=1)  # (n, dim / 8) uint8


def _faiss_searcher(index) -> Searcher:
    return lambda queries, k: index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _binary_searcher(index: faiss.IndexBinaryFlat) -> Searcher:
    def search(queries: np.ndarray, k: int):
        distances, ids = index.search(_binary_codes(queries), k)
        return -distances.astype(np.float32), ids  # fewer differing bits = more similar

    return search


def _rescoring_searcher(index: faiss.IndexBinaryFlat, doc_vectors: Callable[[np.ndarray], np.ndarray],
                        multiplier: int) -> Searcher:
    """Hamming top ``k * multiplier``, then the float query's inner product with those documents' vectors."""
    def search(queries: np.ndarray, k: int):
        _, candidates = index.search(_binary_codes(queries), k * multiplier)  # (nq, kc)
        safe = np.where(candidates >= 0, candidates, 0)
        vectors = doc_vectors(safe.reshape(-1)).reshape(*safe.shape, -1)  # (nq, kc, dim)
        scores = np.einsum("qd,qcd->qc", queries, vectors)  # (nq, kc)
        scores[candidates < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (nq, k)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)

    return search


def build_configurations(docs: np.ndarray, cfg) -> list[dict[str, Any]]:
    """Build every configured index over ``docs`` (n, dim): [{index, precision, params, search, bytes, build}]."""
    n, dim = docs.shape
    configs: list[dict[str, Any]] = []

    def add(index_name: str, precision: str, params: dict, search: Searcher, index_bytes: int, build: float,
            rescore_bytes: int = 0) -> None:
        configs.append({"index": index_name, "precision": precision, "params": params, "search": search,
                        "index_bytes": index_bytes, "rescore_bytes": rescore_bytes, "build_seconds": round(build, 3)})

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(docs)
    add("flat", "fp32", {}, _faiss_searcher(flat), _index_bytes(flat), time.perf_counter() - start)

    sq = None
    if "int8" in cfg.indexes or ("binary" in cfg.indexes and "int8" in cfg.rescore_docs):
        start = time.perf_counter()
        sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(docs)
        sq.add(docs)
        sq_build = time.perf_counter() - start
        if "int8" in cfg.indexes:
            add("flat", "int8", {}, _faiss_searcher(sq), _index_bytes(sq), sq_build)

    if "int4" in cfg.indexes:
        start = time.perf_counter()
        sq4 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT)
        sq4.train(docs)
        sq4.add(docs)
        add("flat", "int4", {}, _faiss_searcher(sq4), _index_bytes(sq4), time.perf_counter() - start)

    if "binary" in cfg.indexes:
        if dim % 8:
            logger.warning("sweep: binary index skipped at dim %d (not a multiple of 8)", dim)
        else:
            start = time.perf_counter()
            binary = faiss.IndexBinaryFlat(dim)
            binary.add(_binary_codes(docs))
            build = time.perf_counter() - start
            bytes_binary = _index_bytes(binary)
            add("flat", "binary", {}, _binary_searcher(binary), bytes_binary, build)
            bits = _binary_codes(docs)
            codes = sq.sa_encode(docs) if sq is not None else None  # (n, dim) uint8, stored beside the index
            for m in cfg.rescore_multiplier:
                if "bits" in cfg.rescore_docs:
                    add("flat", "binary+rescore_bits", {"rescore_multiplier": m},
                        _rescoring_searcher(binary, lambda ids: np.unpackbits(bits[ids], axis=1, count=dim)
                                            .astype(np.float32) * 2 - 1, m), bytes_binary, build)
                if "int8" in cfg.rescore_docs and codes is not None:
                    add("flat", "binary+rescore_int8", {"rescore_multiplier": m},
                        _rescoring_searcher(binary, lambda ids: sq.sa_decode(codes[ids]), m),
                        bytes_binary, build + sq_build, rescore_bytes=int(codes.nbytes))
                if "fp32" in cfg.rescore_docs:
                    add("flat", "binary+rescore_fp32", {"rescore_multiplier": m},
                        _rescoring_searcher(binary, lambda ids: docs[ids], m), bytes_binary, build,
                        rescore_bytes=int(docs.nbytes))

    # k-means wants ~39 training points per centroid; a small corpus gets fewer lists rather than a bad fit.
    nlist = max(1, min(cfg.ivf_nlist, n // 39))
    if nlist != cfg.ivf_nlist and ("ivf" in cfg.indexes or "ivfpq" in cfg.indexes):
        logger.info("sweep: ivf_nlist %d -> %d for %d documents", cfg.ivf_nlist, nlist, n)
    if "ivf" in cfg.indexes:
        start = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(docs)
        ivf.add(docs)
        build, size = time.perf_counter() - start, _index_bytes(ivf)
        for nprobe in cfg.ivf_nprobe:
            if nprobe > nlist:
                continue
            add("ivf", "fp32", {"nlist": nlist, "nprobe": nprobe}, _nprobe_searcher(ivf, nprobe), size, build)

    if "hnsw" in cfg.indexes:
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(docs)
        build, size = time.perf_counter() - start, _index_bytes(hnsw)
        for ef in cfg.hnsw_ef_search:
            add("hnsw", "fp32", {"M": cfg.hnsw_m, "efSearch": ef}, _ef_searcher(hnsw, ef), size, build)

    if "ivfpq" in cfg.indexes:
        # 8-bit subquantizers need 256 centroids each; a tiny corpus gets fewer bits.
        nbits = max(1, min(8, int(math.log2(max(2, n // 4)))))
        for pq_bytes in cfg.pq_bytes:
            m = pq_bytes * 8 // nbits
            if m > dim or dim % m:
                logger.info("sweep: ivfpq with %d sub-quantizers skipped at dim %d", m, dim)
                continue
            start = time.perf_counter()
            ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
            ivfpq.train(docs)
            ivfpq.add(docs)
            nprobe = min(cfg.pq_nprobe, nlist)
            add("ivfpq", f"pq{m}x{nbits}", {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe},
                _nprobe_searcher(ivfpq, nprobe), _index_bytes(ivfpq), time.perf_counter() - start)
    return configs


def _nprobe_searcher(index, nprobe: int) -> Searcher:
    def search(queries, k):
        index.nprobe = nprobe
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    return search


def _ef_searcher(index, ef: int) -> Searcher:
    def search(queries, k):
        index.hnsw.efSearch = ef
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    return search


def _timed_search(search: Searcher, queries: np.ndarray, k: int,
                  repeats: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        scores, ids = search(queries, k)
        best = min(best, time.perf_counter() - start)
    return scores, ids, best


def overlap_at_k(ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k ∩ exact top-k| / k (faiss' "k-recall@k")."""
    hits = [len(set(row[:k][row[:k] >= 0]) & set(ref[:k])) for row, ref in zip(ids, exact_ids)]
    return float(np.mean(hits)) / k


def sweep_model(model: str, doc_emb: np.ndarray, query_emb: np.ndarray, doc_ids: list[str], query_ids: list[str],
                qrels: dict[str, dict[str, int]], cfg, cosine: bool = True,
                ignore_identical_ids: bool = True) -> list[dict[str, Any]]:
    """All sweep rows for one model's (n_docs, dim) and (n_queries, dim) embeddings."""
    full_dim = doc_emb.shape[1]
    dims = sorted({full_dim} | {d for d in cfg.dims if d <= full_dim}, reverse=True)  # full dim = reference
    rows = []
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(cfg.threads)
    try:
        for dim in dims:
            docs = truncate(doc_emb, dim, cosine) if dim < full_dim else np.ascontiguousarray(doc_emb)
            queries = truncate(query_emb, dim, cosine) if dim < full_dim else np.ascontiguousarray(query_emb)
            k = min(cfg.k, len(doc_ids))
            _, exact_ids = exact_search(docs, queries, k)
            for conf in build_configurations(docs, cfg):
                scores, ids, seconds = _timed_search(conf["search"], queries, k)
                mean, _ = score_run(qrels, to_run(query_ids, doc_ids, scores, ids),
                                    ("ndcg@10", "recall@10", "map@10", "mrr@10"), ignore_identical_ids)
                total_bytes = conf["index_bytes"] + conf["rescore_bytes"]
                rows.append({
                    "model": model, "dim": dim, "index": conf["index"], "precision": conf["precision"],
                    "params": conf["params"], "ndcg@10": mean["ndcg@10"], "recall@10": mean["recall@10"],
                    "recall@10_vs_exact": overlap_at_k(ids, exact_ids, k),
                    "qps": round(len(query_ids) / max(seconds, 1e-9), 1),
                    "index_bytes": conf["index_bytes"], "rescore_bytes": conf["rescore_bytes"],
                    "bytes_per_vector": round(total_bytes / len(doc_ids), 2),
                    "build_seconds": conf["build_seconds"],
                })
            logger.info("sweep %s: dim %d done (%d configurations)", model, dim, len(rows))
    finally:
        faiss.omp_set_num_threads(threads)
    reference = next(r for r in rows if r["dim"] == dims[0] and r["index"] == "flat" and r["precision"] == "fp32")
    for row in rows:
        row["ndcg@10_vs_fp32_flat"] = row["ndcg@10"] / reference["ndcg@10"] if reference["ndcg@10"] else float("nan")
        row["bytes_vs_fp32_flat"] = row["bytes_per_vector"] / reference["bytes_per_vector"]
    return rows


def label(row: dict[str, Any]) -> str:
    params = ",".join(f"{k}={v}" for k, v in row["params"].items())
    return f"{row['index']}/{row['precision']}" + (f"({params})" if params else "")


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """One text table per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        header = (f"{'configuration':<48}{'dim':>5}{'nDCG@10':>9}{'R@10/ex':>9}{'q/s':>10}{'B/vec':>9}"
                  f"{'x fp32':>8}{'index MB':>10}{'build s':>9}")
        out += [f"deployment sweep: {model} (nDCG@10 and recall@10 vs exact in percent)", header, "-" * len(header)]
        for r in (r for r in rows if r["model"] == model):
            out.append(f"{label(r):<48}{r['dim']:>5}{100 * r['ndcg@10']:>9.2f}{100 * r['recall@10_vs_exact']:>9.1f}"
                       f"{r['qps']:>10.0f}{r['bytes_per_vector']:>9.1f}{r['bytes_vs_fp32_flat']:>8.3f}"
                       f"{r['index_bytes'] / 2**20:>10.2f}{r['build_seconds']:>9.2f}")
        out.append("")
    return "\n".join(out)


MARKERS = {"flat/fp32": "o", "flat/int8": "s", "flat/int4": "d", "flat/binary": "x", "flat/binary+rescore_bits": "<",
           "flat/binary+rescore_int8": "^", "flat/binary+rescore_fp32": "v", "ivf/fp32": "D", "hnsw/fp32": "P"}


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that no other row beats on both bytes per vector (fewer) and nDCG@10 (higher), by bytes ascending."""
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["bytes_per_vector"], -r["ndcg@10"])):
        if r["ndcg@10"] > best:
            front.append(r)
            best = r["ndcg@10"]
    return front


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """nDCG@10 against bytes per vector (log x): one colour per model (its Pareto front drawn as a line), one marker
    per index/precision; dashed: 97% of the model's full-dim fp32 Flat nDCG@10; dotted: 1/8 of its bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=90)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    families = list(dict.fromkeys(f"{r['index']}/{r['precision']}" for r in rows))
    spare = iter(["*", "h", "p", "8", "d", "H", "1", "2"] * 4)  # for families without a fixed marker (ivfpq/pqMxB)
    markers = {family: MARKERS.get(family) or next(spare) for family in families}
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        model_rows = [r for r in rows if r["model"] == model]
        colour = colours[i % len(colours)]
        for family in families:
            fam = [r for r in model_rows if f"{r['index']}/{r['precision']}" == family]
            ax.scatter([r["bytes_per_vector"] for r in fam], [100 * r["ndcg@10"] for r in fam], color=colour,
                       marker=markers[family], s=22, alpha=0.8)
        front = pareto_front(model_rows)
        ax.step([r["bytes_per_vector"] for r in front], [100 * r["ndcg@10"] for r in front], where="post",
                color=colour, lw=1.2, label=f"{model} (Pareto front)")
        top = next(r for r in model_rows if r["index"] == "flat" and r["precision"] == "fp32")
        ax.axhline(97 * top["ndcg@10"], color=colour, lw=0.8, ls="--")
        ax.axvline(top["bytes_per_vector"] / 8, color="grey", lw=0.8, ls=":")
    for family in families:  # marker legend, in grey so it does not suggest a model
        ax.scatter([], [], color="grey", marker=markers[family], s=22, label=family)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector (index + rescoring vectors), log scale")
    ax.set_ylabel("nDCG@10 (%)")
    ax.set_title(title or "Deployment sweep (dashed: 97% of fp32 Flat at full dim; dotted: 1/8 of its bytes)",
                 fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def best_compact(rows: list[dict[str, Any]], model: str, max_fraction: float = 1 / 8) -> dict[str, Any] | None:
    """The highest-nDCG@10 configuration of ``model`` at <= ``max_fraction`` of the full-dim fp32 bytes per vector."""
    fits = [r for r in rows if r["model"] == model and r["bytes_vs_fp32_flat"] <= max_fraction]
    return max(fits, key=lambda r: r["ndcg@10"]) if fits else None
