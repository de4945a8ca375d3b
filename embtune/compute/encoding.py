"""Corpus encodes on the process's engine: :func:`embtune.retrieval.encoder.encode` in this process, or, with
``compute.engine: ray``, in Parquet shards on a Ray cluster under the same cache key (:mod:`embtune.compute.shards`).

The stages encode a corpus through here, so the engine the recipe picked (:func:`embtune.compute.activate`) applies
without a stage passing it along; ``embtune.retrieval`` itself knows no engine (it sits below ``compute``).
"""

from __future__ import annotations

import logging

import numpy as np

from embtune.compute import ComputeConfig, active
from embtune.retrieval.encoder import LOADED_AS, cache_dir, cache_stem
from embtune.retrieval.encoder import encode as encode_here

logger = logging.getLogger(__name__)


def encode(model, texts: list[str], batch_size: int = 64, cache_key: str | None = None, desc: str = "",
           role: str | None = None, compute: ComputeConfig | None = None) -> np.ndarray:
    """:func:`embtune.retrieval.encoder.encode` on ``compute`` (default: the process's engine): float32 (n, dim).
    On Ray the shards are read back into one matrix; :func:`encode_corpus` keeps them as shards."""
    embeddings = encode_corpus(model, texts, batch_size, cache_key=cache_key, desc=desc, role=role, compute=compute)
    return embeddings if isinstance(embeddings, np.ndarray) else embeddings.matrix()


def encode_corpus(model, texts: list[str], batch_size: int = 64, cache_key: str | None = None, desc: str = "",
                  role: str | None = "document", compute: ComputeConfig | None = None):
    """A corpus's embeddings as the engine keeps them: the (n, dim) float32 matrix on the local engine, or, with
    ``compute.engine: ray``, the :class:`embtune.compute.shards.ShardSet` of its Parquet shards, which a caller
    searches (:class:`embtune.retrieval.spec.Retriever`), indexes (``embtune.compute.export``) or reads row by row
    without the driver ever holding the whole matrix. Same arguments as :func:`encode`.

    Only a corpus encode (one with a cache key, of an encoder ``load_encoder`` made) goes to Ray. A ``.npy`` the
    local engine wrote for the same key is not used there: loading it would put the whole matrix in the driver
    (what the engine is for avoiding) and hand back a matrix where the caller asked the engine for shards.
    """
    compute = compute or active()
    if cache_key and compute.engine == "ray" and LOADED_AS in vars(model):
        from embtune.compute.shards import encode_items, encode_texts, shard_directory

        if hasattr(texts, "shard_items"):  # a corpus file's texts (embtune.compute.corpus): the actors read the file
            stem = cache_stem(model, cache_key, [texts.content_key], role)
            return encode_items(vars(model)[LOADED_AS], texts.shard_items(),
                                shard_directory(stem, compute.shard_rows), compute, model.get_embedding_dimension(),
                                role, desc=desc or "corpus")
        stem = cache_stem(model, cache_key, texts, role)
        if (cache_dir() / f"{stem}.npy").is_file():
            logger.info("compute.engine ray: the local engine's %s.npy is not read (shards keep the matrix out of "
                        "the driver); encoding into shards", stem)
        return encode_texts(model, texts, stem, compute, role=role, desc=desc)
    return encode_here(model, texts, batch_size, cache_key=cache_key, desc=desc, role=role)
