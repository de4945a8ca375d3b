"""Encoding: one place that turns texts into embeddings, cached on disk by model and text.

Every stage encodes through :func:`encode` with the key from :func:`cache_key`, so mining, the teacher, eval and
export of one model encode a corpus once. The key is the model's content hash (a local folder) or hub name,
then the max sequence length; the text hash completes the file name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / "embeddings"


def normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def truncate(embeddings: np.ndarray, dim: int, renormalize: bool = True) -> np.ndarray:
    """Matryoshka truncation to the first ``dim`` coordinates, renormalized for cosine similarity."""
    out = np.ascontiguousarray(embeddings[:, :dim], dtype=np.float32)  # (n, dim)
    return normalize(out) if renormalize else out


def uses_cosine(model) -> bool:
    return getattr(model, "similarity_fn_name", "cosine") in (None, "cosine")


def encode(model, texts: list[str], batch_size: int = 64, cache_key: str | None = None, desc: str = "",
           role: str | None = None) -> np.ndarray:
    """Encode texts to float32 (n, dim), normalized when the model scores by cosine.

    With ``cache_key`` (identifying the model weights), embeddings are cached on disk by model and text hash.
    ``role`` (``"query"`` or ``"document"``) encodes through sentence-transformers' ``encode_query`` /
    ``encode_document``: an asymmetric model (a ``Router`` with query and document routes, as label-free
    training writes with ``train.document_side: base``) then takes the right route. For a plain model without
    prompts both are ``encode``, so the default behaviour is unchanged.
    """
    path = None
    if cache_key:
        text_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
        path = cache_dir() / f"{cache_key}_{text_hash}.npy"
        if path.is_file():
            logger.info("embeddings cache hit: %s", path)
            return np.load(path)
    logger.info("encoding %d %s texts", len(texts), desc)
    method = {"query": "encode_query", "document": "encode_document"}.get(role or "", "encode")
    embeddings = getattr(model, method, model.encode)(texts, batch_size=batch_size, convert_to_numpy=True,
                                                      show_progress_bar=len(texts) > 1000, normalize_embeddings=False)
    embeddings = embeddings.astype(np.float32)
    if uses_cosine(model):
        embeddings = normalize(embeddings)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, embeddings)
        os.replace(tmp, path)
    return embeddings


# Written into an asymmetric model's folder by label-free training: its document route is this base model,
# unchanged, so the base model's corpus embeddings (and any index built from them) are its own.
DOCUMENT_SIDE_FILE = "embtune_document_side.json"


def cache_key(model_path: str, max_seq_length: int, role: str | None = None) -> str:
    """Embedding-cache key of a model: content hash of a local folder (retraining changes it) or the hub name.

    For ``role="document"`` of a model whose folder names its document side (``DOCUMENT_SIDE_FILE``), the key is
    that base model's: the corpus is not encoded again.
    """
    import json

    from embtune.manifest import hash_path

    side = Path(model_path) / DOCUMENT_SIDE_FILE
    if role == "document" and side.is_file():
        return cache_key(json.loads(side.read_text())["document_model"], max_seq_length)

    key = hash_path(model_path) if Path(model_path).exists() else model_path.replace("/", "__")
    return f"{key}_{max_seq_length}"


def load_encoder(model_name: str, max_seq_length: int = 0, device: str | None = None):
    """(SentenceTransformer, embedding cache key) for a folder, hub name or ``embtune.models`` alias."""
    from sentence_transformers import SentenceTransformer

    from embtune.models import resolve_model

    path = resolve_model(model_name)
    model = SentenceTransformer(path, device=device)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model, cache_key(path, model.max_seq_length)
