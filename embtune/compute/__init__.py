"""Where the corpus is encoded, searched and mined: this process (``local``) or a Ray cluster (``ray``).

The ``compute`` section (:class:`ComputeConfig`) picks the engine; the stages' command lines make it the process's
engine (:func:`activate`, called where the recipe is loaded), so every corpus encode (``embtune.compute.encoding.
encode`` / ``encode_corpus`` with a cache key) goes through it without a stage passing it along; ``embtune.retrieval``
sits below this package and never imports it (an import-linter contract). ``local`` is today's behaviour: one
process, one ``.npy`` per corpus. ``ray``:

- ``shards``: the corpus in fixed row ranges (``shard_rows``), each encoded by a Ray Data actor that loads the
  encoder once and written as one Parquet file ``(row, doc_id, vector)`` under the embedding cache; a rerun
  encodes only the shards whose file is missing;
- ``search``: exact dense top-k per shard in parallel, merged into the top-k one process's exact search returns
  (ties by lower row), and BM25 with corpus-wide statistics scored per shard and merged the same way.

Cluster commands, GPU actors, shard sizes and the arithmetic for 100M passages: docs/scale.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)


@dataclass
class ComputeConfig:
    """The engine that encodes, searches and mines the corpus: ``local`` (this process) or ``ray`` (a cluster)."""

    engine: Literal["local", "ray"] = "local"
    # ray only. "" starts a Ray cluster inside this process; "auto" joins the one `ray start` runs (or RAY_ADDRESS);
    # "ray://host:10001" joins a remote one through Ray Client.
    address: str = ""
    workers: int = 2  # encoding actors (and search tasks in flight)
    threads_per_worker: int = 1  # CPUs each actor reserves; its onnxruntime / torch threads
    gpus_per_worker: float = 0.0  # 1: each actor holds one GPU (the torch backend then encodes on it)
    batch_size: int = 64  # texts per model call inside a shard
    shard_rows: int = 10_000  # rows per Parquet shard: the unit of parallel work and of resume

    def validate(self) -> None:
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError(f"compute.workers and compute.threads_per_worker must be >= 1, got {self.workers}, "
                             f"{self.threads_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"compute.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise ValueError(f"compute.batch_size and compute.shard_rows must be >= 1, got {self.batch_size}, "
                             f"{self.shard_rows}")


_ACTIVE = ComputeConfig()


def activate(compute: ComputeConfig) -> None:
    """Make ``compute`` this process's engine (the stages' command lines call it with the recipe's section)."""
    global _ACTIVE
    _ACTIVE = compute
    if compute.engine == "ray":
        logger.info("compute engine: ray (%s, %d workers x %d threads, %g GPUs each, %d rows per shard)",
                    compute.address or "a local cluster", compute.workers, compute.threads_per_worker,
                    compute.gpus_per_worker, compute.shard_rows)


def active() -> ComputeConfig:
    """This process's engine: ``local`` unless :func:`activate` set another."""
    return _ACTIVE
