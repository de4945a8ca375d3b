"""Indexes written from a corpus's shards, one shard in memory at a time.

- FAISS: ``flat`` (``IndexFlatIP``, exact) filled shard by shard; ``ivf`` (``IndexIVFFlat``) trained once on a seeded
  sample of rows drawn from every shard, then filled shard by shard — FAISS's "train once, add shards" recipe (the
  filled index itself is then as large as the vectors: past one machine's memory, write one IVF index per group of
  shards with the same trained quantizer and merge them with ``faiss.contrib.ondisk.merge_ondisk``).
- LanceDB: a table created from the first shard and appended to with each following one.

Both take a per-shard hook (``transform`` for FAISS, ``batch`` for LanceDB) so that a caller which stores something
other than the raw vectors (normalized, truncated, half precision, with text and metadata columns) writes them
shard by shard too, instead of building the whole matrix to transform it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embtune.compute.shards import ShardSet

logger = logging.getLogger(__name__)


def sample_rows(shards: ShardSet, n: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of ``n`` vectors (n, dim), read shard by shard."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(shards.num_rows, size=min(n, shards.num_rows), replace=False))
    return shards.vectors(rows)


def write_faiss_index(shards: ShardSet, path: str | Path, kind: str = "flat", nlist: int = 0, nprobe: int = 16,
                      train_rows: int = 0, seed: int = 42,
                      transform: Callable[[np.ndarray], np.ndarray] | None = None, factory: str = "",
                      sample: np.ndarray | None = None):
    """Write a FAISS inner-product index of every shard to ``path``; returns the index.

    ``ivf``: ``nlist`` lists (default ``4 * sqrt(rows)``, as ``embtune.retrieval.index.search`` picks), trained on
    ``train_rows`` sampled vectors (default ``64 * nlist``, above FAISS's 39-per-centroid warning).
    ``transform``: a row-wise map (rows, dim) -> (rows, dim) applied to each shard (and to the IVF training sample)
    before it is added, e.g. ``normalize`` for a model that does not score by cosine; None adds the vectors as stored.
    ``ivf_pq`` / ``hnsw``: the ``factory`` string (default ``embtune.retrieval.index.ann_factory``), trained when it
    needs training on ``sample`` (default: ``train_rows`` rows sampled from the shards, 64 per IVF list).
    """
    import faiss

    from embtune.retrieval.index import ann_factory, new_index, set_search_params

    def prepared(vectors: np.ndarray) -> np.ndarray:
        vectors = transform(vectors) if transform is not None else vectors  # (rows, dim)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    if kind == "flat":
        index = faiss.IndexFlatIP(shards.dim)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(shards.num_rows)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(shards.dim), shards.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = sample_rows(shards, train_rows or 64 * nlist, seed)
        index.train(prepared(sample))
        index.nprobe = min(nprobe, nlist)
        logger.info("IVF index: %d lists trained on %d sampled vectors, nprobe %d", nlist, len(sample), index.nprobe)
    elif kind in ("ivf_pq", "hnsw"):
        factory = factory or ann_factory(kind, shards.num_rows, shards.dim, nlist=nlist)
        index = new_index(factory, shards.dim)
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.cp.seed = seed
            if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
                ivf = faiss.downcast_index(ivf)
                # The factory turns on polysemous training (a simulated annealing of the PQ codes for Hamming
                # filtering, which this search never uses): most of the training time, for nothing here.
                ivf.do_polysemous_training = False
            lists = ivf.nlist if ivf is not None else 256
            if sample is None:
                sample = sample_rows(shards, train_rows or 64 * lists, seed)
            index.train(prepared(sample))
            logger.info("%s trained on %d vectors", factory, len(sample))
        set_search_params(index, nprobe=nprobe)
    else:
        raise ValueError(f"index kind must be 'flat', 'ivf', 'ivf_pq' or 'hnsw', got {kind!r}")
    for _, _, vectors in shards:
        index.add(prepared(vectors))
    faiss.write_index(index, str(path))
    return index


def write_faiss_index_on_engine(shards: ShardSet, path: str | Path, **settings: Any) -> None:
    """:func:`write_faiss_index` where the engine runs it: on the Ray engine one task builds and writes the index
    (its training sample and its codes live in that worker, which reads the shards itself), so the driver never
    holds them; on the local engine, here. ``settings``: :func:`write_faiss_index`'s keyword arguments."""
    from embtune.compute import active
    from embtune.compute.search import map_shards

    compute = getattr(shards, "compute", None) or active()
    if compute.engine != "ray" or not isinstance(shards, ShardSet):  # vectors held here (or computed elsewhere)
        write_faiss_index(shards, path, **settings)
        return
    (rows,) = map_shards(_write_faiss_index_task, [(shards, str(path))], compute, {"settings": settings})
    logger.info("FAISS index of %d vectors written by a task to %s", rows, path)


def _write_faiss_index_task(shards: ShardSet, path: str, settings: dict[str, Any]) -> int:
    return int(write_faiss_index(shards, path, **settings).ntotal)


def write_lancedb_table(shards: ShardSet, uri: str | Path, name: str, mode: str = "overwrite",
                        batch: Callable[[int, list[str], np.ndarray], Any] | None = None, **create_options):
    """A LanceDB table of every shard: created from the first, appended with each next one; returns the table.

    ``batch(start, ids, vectors)`` turns one shard into the Arrow table of its rows (default: ``id`` and ``vector``
    columns); every shard's table must have the first one's schema, since ``add`` appends to it. An empty
    ``ShardSet`` writes an empty table from ``batch(0, [], <0 rows>)``. ``create_options`` go to
    ``create_table`` (e.g. ``embedding_functions``).
    """
    import lancedb

    db = lancedb.connect(str(uri))
    batch = batch or id_and_vector
    table = None
    for start, ids, vectors in shards:
        rows = batch(start, ids, vectors)
        if table is None:
            table = db.create_table(name, data=rows, mode=mode, **create_options)
        else:
            table.add(rows)
    if table is None:
        empty = batch(0, [], np.zeros((0, shards.dim), dtype=np.float32))
        table = db.create_table(name, data=empty, mode=mode, **create_options)
    return table


def id_and_vector(start: int, ids: list[str], vectors: np.ndarray):
    """A shard as an Arrow table ``(id string, vector fixed-size list of float32)``."""
    import pyarrow as pa

    dim = vectors.shape[1]
    return pa.table({"id": pa.array(ids, type=pa.string()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})


def _merge_ivf(trained: str, shard_files: list[str], path: str) -> int:
    """FAISS's on-disk merge (``faiss.contrib.ondisk.merge_ondisk``) of the shards' filled IVF indexes into one
    index at ``path`` whose lists live in ``<path>.ivfdata``; the shards are memory-mapped, never loaded whole."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(trained)
    merge_ondisk(index, shard_files, f"{path}.ivfdata")
    faiss.write_index(index, path)
    return int(index.ntotal)


def write_ivf_ondisk(ivf, path: str | Path) -> int:
    """One served IVF index from a :class:`embtune.compute.search.ShardedIVF`'s filled shards (ids = corpus rows),
    merged on disk by a task on the engine, so neither the driver nor that task holds the vectors; the number of
    vectors written. ``faiss.read_index(path)`` maps its lists from ``<path>.ivfdata`` (not into memory)."""
    from embtune.compute.search import map_shards

    files = [str(ivf._path(start)) for start in ivf.shards.starts]
    call = (str(ivf.directory / "trained.faiss"), files, str(Path(path).resolve()))
    return next(iter(map_shards(_merge_ivf, [call], ivf.compute)))
