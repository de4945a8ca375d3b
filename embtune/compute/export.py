"""Indexes written from a corpus's shards, one shard in memory at a time.

- FAISS: ``flat`` (``IndexFlatIP``, exact) filled shard by shard; ``ivf`` (``IndexIVFFlat``) trained once on a seeded
  sample of rows drawn from every shard, then filled shard by shard — FAISS's "train once, add shards" recipe (the
  filled index itself is then as large as the vectors: past one machine's memory, write one IVF index per group of
  shards with the same trained quantizer and merge them with ``faiss.contrib.ondisk.merge_ondisk``).
- LanceDB: a table created from the first shard and appended to with each following one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from embtune.compute.shards import ShardSet

logger = logging.getLogger(__name__)


def sample_rows(shards: ShardSet, n: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of ``n`` vectors (n, dim), read shard by shard."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(shards.num_rows, size=min(n, shards.num_rows), replace=False))
    return shards.vectors(rows)


def write_faiss_index(shards: ShardSet, path: str | Path, kind: str = "flat", nlist: int = 0, nprobe: int = 16,
                      train_rows: int = 0, seed: int = 42):
    """Write a FAISS inner-product index of every shard to ``path``; returns the index.

    ``ivf``: ``nlist`` lists (default ``4 * sqrt(rows)``, as ``embtune.retrieval.index.search`` picks), trained on
    ``train_rows`` sampled vectors (default ``64 * nlist``, above FAISS's 39-per-centroid warning).
    """
    import faiss

    if kind == "flat":
        index = faiss.IndexFlatIP(shards.dim)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(shards.num_rows)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(shards.dim), shards.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = sample_rows(shards, train_rows or 64 * nlist, seed)
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
        logger.info("IVF index: %d lists trained on %d sampled vectors, nprobe %d", nlist, len(sample), index.nprobe)
    else:
        raise ValueError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    for _, _, vectors in shards:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(path))
    return index


def write_lancedb_table(shards: ShardSet, uri: str | Path, name: str, mode: str = "overwrite"):
    """A LanceDB table ``(id, vector)`` of every shard: created from the first, appended with each next one."""
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(uri))
    table = None
    for start, ids, vectors in shards:
        batch = pa.table({"id": pa.array(ids, type=pa.string()),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), shards.dim)})
        if table is None:
            table = db.create_table(name, data=batch, mode=mode)
        else:
            table.add(batch)
    return table
