"""Encoding: one place that turns texts into embeddings, cached on disk by model and text.

Every stage encodes through :func:`encode` with the key from :func:`cache_key`, so mining, the teacher, eval and
export of one model encode a corpus once. The key is the model's content hash (a local folder) or hub name,
then the max sequence length; the backend's tag (none for torch, ``onnx-<hash of the ONNX file>`` otherwise) and
the text hash complete the file name, so fp32 and int8 embeddings of one model never mix.

Backends (:func:`load_encoder`, the one list of them is ``BACKENDS``): ``torch`` (sentence-transformers), ``onnx``
(the transformer exported to ONNX, fp32, run by onnxruntime), ``onnx-int8`` (the same graph fused and int8
dynamic-quantized; ``embtune/retrieval/onnx.py``), ``openvino`` (the graph as OpenVINO IR, fp32) and
``openvino-int8`` (NNCF static int8, calibrated on corpus passages; ``embtune/retrieval/openvino.py``). Speed and
nDCG@10 of each on SciFact: ``scripts/bench_encode_speed.py``.

This module encodes in this process and knows no engine: with ``compute.engine: ray`` a corpus encode goes through
``embtune.compute.encoding`` (which sits above this package) onto a Ray cluster, in Parquet shards under the same
cache key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)

# The encoder backends, in one place: eval.backend's choices (the one key that picks the backend; export builds the
# bundle's index with it and the server uses what the bundle records) and what load_encoder / build_bundle accept.
Backend = Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-int8"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The backends whose int8 file is calibrated on corpus passages (load_encoder's calibration_texts).
CALIBRATED_BACKENDS = ("openvino-int8",)


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

    ``model`` is a SentenceTransformer or an :class:`embtune.retrieval.onnx.OnnxEncoder` (see :func:`load_encoder`).
    With ``cache_key`` (identifying the model weights, :func:`cache_key`), embeddings are cached on disk by model,
    backend and text hash. ``role`` (``"query"`` or ``"document"``) encodes through sentence-transformers'
    ``encode_query`` / ``encode_document``: an asymmetric model (a ``Router`` with query and document routes, as
    label-free training writes with ``train.document_side: base``) then takes the right route. For a plain model
    without prompts both are ``encode``, so the default behaviour is unchanged.
    """
    path = None
    if cache_key:
        stem = cache_stem(model, cache_key, texts, role)
        path = cache_dir() / f"{stem}.npy"
        if path.is_file():
            logger.info("embeddings cache hit: %s", path)
            return np.load(path)
    # The server encodes each request through here too: a log line per request only at debug level.
    (logger.info if len(texts) >= 100 else logger.debug)("encoding %d %s texts", len(texts), desc)
    embeddings = encode_batch(model, texts, batch_size, role, progress=len(texts) > 1000)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, embeddings)
        os.replace(tmp, path)
    return embeddings


def save_matrix(embeddings, path: str | Path) -> Path:
    """Write a corpus's embeddings as one ``.npy`` file: a matrix as it is; shards (``embtune.compute.shards.
    ShardSet``: ``shape`` and ``(start, ids, vectors)`` per shard) one by one into a memory-mapped file, so the
    process writing it never holds every vector (the pages go to disk as they fill). Written under a temporary name
    and renamed: a file at ``path`` is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    if not isinstance(embeddings, np.ndarray):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=embeddings.shape)
        for start, _, vectors in embeddings:
            out[start:start + len(vectors)] = vectors
        out.flush()
        del out
    else:
        np.save(tmp, embeddings)
    os.replace(tmp, path)
    return path


def encode_batch(model, texts: list[str], batch_size: int, role: str | None = None,
                 progress: bool = False) -> np.ndarray:
    """Encode without the cache: float32 (n, dim), normalized when the model scores by cosine (see :func:`encode`).

    The one copy of the arithmetic, so that a Ray worker's shard is this process's encode of the same texts.
    """
    method = {"query": "encode_query", "document": "encode_document"}.get(role or "", "encode")
    embeddings = getattr(model, method, model.encode)(texts, batch_size=batch_size, convert_to_numpy=True,
                                                      show_progress_bar=progress, normalize_embeddings=False)
    embeddings = embeddings.astype(np.float32)
    return normalize(embeddings) if uses_cosine(model) else embeddings


def role_route(model, role: str | None) -> str:
    """``role`` when encoding by it differs from a plain ``encode`` of ``model``, else "": a prompt for the role,
    or a ``Router`` route other than its default (label-free's asymmetric models take the document route by
    default, so their document encodes and plain encodes are one entry)."""
    if not role:
        return ""
    if (getattr(model, "prompts", None) or {}).get(role):
        return role
    for module in model if hasattr(model, "__iter__") else ():
        routes = getattr(module, "sub_modules", None)
        if routes is not None and role in routes and role != getattr(module, "default_route", None):
            return role
    return ""


def cache_stem(model, cache_key: str, texts: list[str], role: str | None = None) -> str:
    """The cache entry's name: key, the backend's tag (the ONNX encoder's file; none for torch), the route when the
    role changes the encode (:func:`role_route`: a query-route and a plain encode of one text are two entries) and
    the text hash."""
    text_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    tags = [t for t in (getattr(model, "cache_tag", ""), role_route(model, role)) if t]
    return "_".join([cache_key, *tags, text_hash])


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


# The attribute load_encoder sets on what it returns: how to load the same encoder again (a Ray worker does).
LOADED_AS = "embtune_loaded_as"


def remember_loaded(model, model_path: str, backend: str = "torch"):
    """Record on ``model`` how to load it again (``LOADED_AS``), so that with ``compute.engine: ray`` its corpus
    encodes run on Ray workers that load the same encoder; for an encoder built without :func:`load_encoder`.
    Returns ``model``."""
    loaded_as = {"model_name": model_path, "max_seq_length": model.max_seq_length, "backend": backend}
    if getattr(model, "model_file", None):  # an OpenVINO IR: the workers run this very file (its calibration)
        loaded_as["model_file"] = str(model.model_file)
    setattr(model, LOADED_AS, loaded_as)
    return model


# Bumped when embtune.retrieval.onnx exports differently, so an export cached by an older recipe is not reused.
ONNX_RECIPE = "v3"


def onnx_export_dir(model_path: str) -> Path:
    """Where :func:`load_encoder` exports a model that ships no ``onnx/`` folder: beside the embedding cache, by
    the model's content hash (so a retrained folder gets a fresh export) and the export recipe."""
    return cache_dir().parent / "onnx" / f"{cache_key(model_path, 0).removesuffix('_0')}-{ONNX_RECIPE}"


# Bumped when embtune.retrieval.openvino converts or quantizes differently.
OPENVINO_RECIPE = "v1"


def openvino_export_dir(model_path: str, calibration_texts: list[str] | None = None) -> Path:
    """Where :func:`load_encoder` writes a model's OpenVINO IR when its folder ships none: by content hash and
    recipe, and for the int8 IR also by the calibration sample's hash (another corpus, another IR)."""
    from embtune.retrieval.openvino import calibration_hash

    base = cache_dir().parent / "openvino" / f"{cache_key(model_path, 0).removesuffix('_0')}-{OPENVINO_RECIPE}"
    return base / (f"calib-{calibration_hash(calibration_texts)}" if calibration_texts is not None else "fp32")


def _load_openvino(path: str, backend: str, max_seq_length: int, threads: int, model_file: str,
                   calibration_texts: list[str] | None):
    import os
    import shutil
    import tempfile

    from embtune.retrieval.openvino import BACKEND_FILES, OpenVINOEncoder, export_openvino

    if model_file:
        return OpenVINOEncoder(path, model_file, threads=threads, max_seq_length=max_seq_length)
    own = Path(path) / BACKEND_FILES[backend]
    if own.is_file():
        return OpenVINOEncoder(path, own, threads=threads, max_seq_length=max_seq_length)
    if backend in CALIBRATED_BACKENDS and calibration_texts is None:
        raise ValueError(f"backend {backend!r}: {path} has no {BACKEND_FILES[backend]}, and the int8 IR is calibrated "
                         "on corpus passages: pass calibration_texts (eval and export pass their corpus)")
    export_dir = openvino_export_dir(path, calibration_texts if backend in CALIBRATED_BACKENDS else None)
    target = export_dir / Path(BACKEND_FILES[backend]).name
    if not target.is_file():  # written in a temporary folder and renamed: concurrent callers never read half a file
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=export_dir.name + ".", dir=export_dir.parent))
        try:
            export_openvino(path, tmp, calibration_texts if backend in CALIBRATED_BACKENDS else None, max_seq_length)
            try:
                os.replace(tmp, export_dir)
            except OSError:  # a concurrent export got there first: its files are the same recipe
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return OpenVINOEncoder(path, target, threads=threads, max_seq_length=max_seq_length)


def load_encoder(model_name: str, max_seq_length: int = 0, device: str | None = None, backend: str = "torch",
                 threads: int = 0, calibration_texts: list[str] | None = None, model_file: str = ""):
    """(encoder, embedding cache key) for a folder, hub name or ``embtune.models`` alias.

    Args:
        model_name: a SentenceTransformer folder, hub name or alias.
        max_seq_length: truncate to this many tokens (0 = the model's own).
        device: torch device (torch backend only; the ONNX backends run on CPU).
        backend: ``torch`` (a SentenceTransformer), ``onnx`` or ``onnx-int8`` (an ``OnnxEncoder`` over
            ``<model>/onnx/model.onnx`` / ``model_qint8.onnx``, exported once into :func:`onnx_export_dir` when
            the folder has none).
            ``openvino`` / ``openvino-int8``: an ``OpenVINOEncoder`` over ``<model>/openvino/openvino_model.xml`` /
            ``openvino_model_qint8_quantized.xml``, converted (and quantized) once into :func:`openvino_export_dir`
            when the folder has none.
        threads: onnxruntime intra-op (OpenVINO inference) threads for those backends (0 = all cores). torch's
            count is process-wide: set it with ``torch.set_num_threads``.
        calibration_texts: corpus passages that ``openvino-int8`` calibrates on when it quantizes (a fixed sample
            of them, ``embtune.retrieval.openvino.calibration_sample``); not needed when the IR exists.
        model_file: the exact OpenVINO IR to run (what a Ray worker gets from the driver's ``LOADED_AS``).

    Pass the encoder to :func:`encode` with the key: the cache file name adds the backend's tag itself.
    """
    from embtune.models import resolve_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; expected one of {list(BACKENDS)}")
    path = resolve_model(model_name, must_exist=True)
    if backend == "torch":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device=device)
        # A worker reloads with the driver's recorded length: a model without a settable one (StaticEmbedding,
        # whose length is inf) is already at it.
        if max_seq_length and max_seq_length != model.max_seq_length:
            model.max_seq_length = max_seq_length
    elif backend.startswith("openvino"):
        if device and not str(device).startswith("cpu"):
            logger.warning("backend %s runs on CPU; device %r is ignored", backend, device)
        model = _load_openvino(path, backend, max_seq_length, threads, model_file, calibration_texts)
    else:
        from embtune.retrieval.onnx import OnnxEncoder, onnx_file_for

        if device and not str(device).startswith("cpu"):
            logger.warning("backend %s runs on CPU (onnxruntime's CPU provider); device %r is ignored", backend, device)
        onnx_file = onnx_file_for(path, backend, onnx_export_dir(path))
        model = OnnxEncoder(path, onnx_file, threads=threads, max_seq_length=max_seq_length)
    remember_loaded(model, path, backend)
    return model, cache_key(path, model.max_seq_length)
