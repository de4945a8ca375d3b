"""Vector-database export: the corpus and the model's embeddings in a persistent Chroma collection and a LanceDB
table, and embedding functions that load the bundle's model so that queries are embedded as the corpus was.

Layout inside a bundle (``export.targets`` names which are written)::

    <bundle>/vectordb/chroma/    chromadb.PersistentClient(path=...): one collection, cosine space
    <bundle>/vectordb/lancedb/   lancedb.connect(...): one table (id, title, text, metadata..., vector)
    <bundle>/manifest.json       "vectordb": {"name", "dim", "precision", "metric": "cosine", "chroma": {...}, ...}

Query it the way the export embedded the corpus (same model, Matryoshka dimension and precision)::

    from embtune.serve.vectordb import open_chroma, open_lancedb, QueryEncoder
    collection = open_chroma("runs/x/bundle")           # carries the bundle's embedding function
    collection.query(query_texts=["what is dense retrieval?"], n_results=10)
    table = open_lancedb("runs/x/bundle")
    table.search("what is dense retrieval?").limit(10).to_list()  # embedded by the table's embedding function
    table.search(QueryEncoder("runs/x/bundle")(["what is dense retrieval?"])[0]).distance_type("cosine")...

The document vectors come from the shared embedding cache (:func:`embtune.compute.encoding.encode_corpus` with the
source model's key), so export does not encode the corpus again after eval did. With ``compute.engine: ray`` they
are the corpus's Parquet shards: LanceDB is written from them shard by shard, Chroma only up to
``CHROMA_MAX_ROWS`` rows (it keeps the whole collection in memory).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import chromadb
import lancedb
import numpy as np
import pyarrow as pa
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.config import Settings
from chromadb.utils.embedding_functions import register_embedding_function
from lancedb.embeddings import EmbeddingFunctionConfig, TextEmbeddingFunction, register
from pydantic import PrivateAttr

from embtune.compute.encoding import encode_corpus
from embtune.compute.shards import ShardSet
from embtune.dataio import document_text
from embtune.retrieval.encoder import cache_key, encode, load_encoder, normalize, truncate

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # the bundle's (serve.bundle.MANIFEST_FILE)
MODEL_DIR = "model"
CHROMA_DIR = "vectordb/chroma"
LANCEDB_DIR = "vectordb/lancedb"
VECTOR_TARGETS = ("chroma", "lancedb")
# Chroma's rule for collection names; LanceDB accepts a superset of it.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
RESERVED_FIELDS = ("_id", "text")  # become the row id and the document; every other field is metadata
# With compute.engine: ray, Chroma is written only up to this many rows. A persistent Chroma collection keeps its
# whole HNSW graph, vectors included, in the memory of the process that writes it (rows x dim x 4 bytes plus the
# links): the memory the shards keep out of the driver. LanceDB is appended shard by shard and has no such limit.
# Below it the vectors are gathered into one matrix and written as on the local engine; above it the export stops
# before writing anything and says to use lancedb.
CHROMA_MAX_ROWS = 1_000_000


def chroma_settings() -> Settings:
    # Offline by default: no product telemetry calls leave the machine.
    return Settings(anonymized_telemetry=False)


def export_vectors(embeddings: np.ndarray, dim: int = 0, precision: str = "float32") -> np.ndarray:
    """The vectors a target stores, as float32 (n, dim): truncated to ``dim`` (0 = all) and renormalized, then
    rounded to ``precision`` ("float16" values are exactly representable in float16)."""
    full = embeddings.shape[1]
    if dim > full:
        raise ValueError(f"export.vectordb.dim {dim} is larger than the model's dimension {full}")
    out = truncate(embeddings, dim) if dim and dim < full else normalize(embeddings)  # (n, dim)
    if precision == "float16":
        out = out.astype(np.float16).astype(np.float32)
    elif precision != "float32":
        raise ValueError(f"export.vectordb.precision must be 'float32' or 'float16', got {precision!r}")
    return out


def read_settings(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest's ``vectordb`` entry; a bundle exported without chroma or lancedb has none."""
    manifest_path = Path(bundle_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"bundle {bundle_dir}: no {MANIFEST_FILE}")
    settings = json.loads(manifest_path.read_text()).get("vectordb")
    if not settings:
        raise ValueError(f"{manifest_path}: no 'vectordb' entry; export with export.targets including chroma or "
                         f"lancedb")
    return settings


class QueryEncoder:
    """Embed texts as the export embedded the corpus: the bundle's model, then the same dimension and precision.

    The model is loaded on the first call. ``__call__(texts)`` returns float32 (len(texts), dim).
    """

    def __init__(self, bundle_dir: str | Path, device: str | None = None, batch_size: int = 64):
        settings = read_settings(bundle_dir)
        self.bundle_dir = Path(bundle_dir)
        self.dim = int(settings["dim"])
        self.precision = settings["precision"]
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            self._model, _ = load_encoder(str(self.bundle_dir / MODEL_DIR), device=self.device)
        embeddings = encode(self._model, list(texts), self.batch_size, desc="query", role="query")  # (n, full dim)
        return export_vectors(embeddings, self.dim, self.precision)  # (n, dim)


@register_embedding_function
class ChromaEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma's embedding function for an exported bundle (registered as ``embtune``).

    The collection records it with the bundle's path, so ``client.get_collection(name)`` in a process that imported
    this module embeds ``query_texts`` with it; pass ``embedding_function=ChromaEmbeddingFunction(new_path)`` when
    the bundle has moved.
    """

    def __init__(self, bundle_dir: str, device: str | None = None):
        self.bundle_dir = str(bundle_dir)
        self.device = device
        self._encoder: QueryEncoder | None = None

    def __call__(self, input: Documents) -> Embeddings:
        if self._encoder is None:
            self._encoder = QueryEncoder(self.bundle_dir, device=self.device)
        return list(self._encoder(list(input)))

    @staticmethod
    def name() -> str:
        return "embtune"

    def get_config(self) -> dict[str, Any]:
        return {"bundle_dir": self.bundle_dir}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "ChromaEmbeddingFunction":
        return ChromaEmbeddingFunction(config["bundle_dir"])

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine"]


@register("embtune")
class LanceEmbeddingFunction(TextEmbeddingFunction):
    """LanceDB's embedding function for an exported bundle (registered as ``embtune``).

    The table's schema records it, so ``table.search("text")`` embeds the query with the bundle's model in a
    process that imported this module. Build one with ``LanceEmbeddingFunction.create(bundle_dir=...)``.
    """

    bundle_dir: str
    device: str | None = None
    _encoder: Any = PrivateAttr(default=None)

    def ndims(self) -> int:
        return int(read_settings(self.bundle_dir)["dim"])

    def generate_embeddings(self, texts: list[str]) -> list[np.ndarray]:
        if self._encoder is None:
            self._encoder = QueryEncoder(self.bundle_dir, device=self.device)
        return list(self._encoder(list(texts)))


def metadata_columns(docs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every field but ``_id`` and ``text``, one column per field in first-seen order.

    A field keeps its values when they are all strings, all booleans or all numbers (ints and floats become
    floats); otherwise (lists, mappings, mixed types) each value is stored as its JSON text, because neither Chroma
    metadata nor an Arrow column holds a mix. Missing values are None; a field that is None everywhere is dropped.
    """
    keys: dict[str, None] = {}
    for doc in docs:
        keys.update((key, None) for key in doc if key not in RESERVED_FIELDS)
    columns: dict[str, list[Any]] = {}
    for key in keys:
        values = [doc.get(key) for doc in docs]
        kinds = {type(v) for v in values if v is not None}
        if not kinds:
            continue
        if kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        elif len(kinds) > 1 or not kinds <= {str, bool, int, float}:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        columns[key] = values
    return columns


def forget_chroma(path: str | Path) -> None:
    """Drop this process's cached Chroma system for ``path``.

    Chroma keeps one system per persist directory for the life of the process (``SharedSystemClient``); after the
    folder is deleted and written again, a cached one answers from the deleted database ("no such table"). Chroma
    has no public call that forgets one path, so its cache is edited here.
    """
    from chromadb.api.shared_system_client import SharedSystemClient

    key = str(Path(path).resolve())
    system = SharedSystemClient._identifier_to_system.pop(key, None)
    SharedSystemClient._identifier_to_refcount.pop(key, None)
    if system is not None:
        system.stop()


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_chroma(path: str | Path, name: str, ids: list[str], texts: list[str], metadata: dict[str, list[Any]],
                 vectors: np.ndarray, embedding_function: EmbeddingFunction, ef_construction: int = 200,
                 ef_search: int = 200, max_neighbors: int = 32) -> None:
    """(Re)create collection ``name`` in a persistent Chroma at ``path``: cosine space, the given HNSW settings."""
    client = chromadb.PersistentClient(path=str(Path(path).resolve()), settings=chroma_settings())
    if name in {c.name for c in client.list_collections()}:
        client.delete_collection(name)
    collection = client.create_collection(
        name, embedding_function=embedding_function,
        configuration={"hnsw": {"space": "cosine", "ef_construction": ef_construction, "ef_search": ef_search,
                                "max_neighbors": max_neighbors}})
    rows = [{k: column[i] for k, column in metadata.items() if column[i] is not None} or None
            for i in range(len(ids))]
    batch = client.get_max_batch_size()
    for start in range(0, len(ids), batch):
        end = start + batch
        collection.add(ids=ids[start:end], embeddings=vectors[start:end], documents=texts[start:end],
                       metadatas=rows[start:end])
    client.close()


def lancedb_rows(ids: list[str], texts: list[str], metadata: dict[str, list[Any]], vectors: np.ndarray,
                 precision: str, types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """The Arrow table LanceDB stores: id, text, metadata columns and a fixed-size vector column of ``precision``.

    ``types`` fixes the metadata columns' Arrow types (default: inferred from ``metadata``); a table appended in
    parts passes the whole corpus's, since a part whose values of a field are all None would infer a null column.
    """
    value_type = pa.float16() if precision == "float16" else pa.float32()
    dim = vectors.shape[1]
    flat = pa.array(vectors.astype(np.float16 if precision == "float16" else np.float32).ravel(), type=value_type)
    columns = {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}
    columns.update({key: pa.array(values, type=(types or {}).get(key)) for key, values in metadata.items()
                    if key not in columns})
    columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.table(columns)


def metadata_types(metadata: dict[str, list[Any]]) -> dict[str, pa.DataType]:
    """Each metadata column's Arrow type, from its first value that is not None: :func:`metadata_columns` leaves
    every column of one kind (strings, booleans, ints, floats or JSON text), so that value's type is the column's."""
    return {key: pa.array([next(v for v in values if v is not None)]).type for key, values in metadata.items()}


def lance_functions(embedding_function: TextEmbeddingFunction) -> list[EmbeddingFunctionConfig]:
    return [EmbeddingFunctionConfig(source_column="text", vector_column="vector", function=embedding_function)]


def write_lancedb(path: str | Path, name: str, ids: list[str], texts: list[str], metadata: dict[str, list[Any]],
                  vectors: np.ndarray, precision: str, embedding_function: TextEmbeddingFunction) -> None:
    """(Re)create table ``name`` in LanceDB at ``path``: id, text, metadata columns and a fixed-size vector column
    of ``precision``. No ANN index is built, so searches are exact (flat)."""
    table = lancedb_rows(ids, texts, metadata, vectors, precision)
    db = lancedb.connect(str(path))
    db.create_table(name, data=table, mode="overwrite", embedding_functions=lance_functions(embedding_function))


def write_lancedb_shards(path: str | Path, name: str, ids: list[str], texts: list[str],
                         metadata: dict[str, list[Any]], shards: ShardSet, dim: int, precision: str,
                         embedding_function: TextEmbeddingFunction) -> None:
    """:func:`write_lancedb` from a corpus's shards: the table created from the first shard and appended with each
    next one, each shard's vectors passed through :func:`export_vectors` on its own (it is row-wise: truncation,
    renormalization and float16 rounding need no statistics of the whole corpus). The same rows and schema as
    :func:`write_lancedb` of the whole matrix, without the matrix."""
    from embtune.compute.export import write_lancedb_table

    types = metadata_types(metadata)

    def shard_rows(start: int, _ids: list[str], vectors: np.ndarray) -> pa.Table:
        stop = start + len(vectors)
        part = {key: values[start:stop] for key, values in metadata.items()}
        return lancedb_rows(ids[start:stop], texts[start:stop], part, export_vectors(vectors, dim, precision),
                            precision, types)

    write_lancedb_table(shards, path, name, batch=shard_rows, embedding_functions=lance_functions(embedding_function))


def export_vectordb(bundle_dir: str | Path, model_dir: str | Path, docs: list[dict[str, Any]], targets: list[str],
                    cfg, name: str, batch_size: int = 64, include_title: bool = True) -> dict[str, Any]:
    """Write ``docs`` with the model's embeddings to each of ``targets`` (``chroma``, ``lancedb``) under
    ``<bundle_dir>/vectordb/``; return the manifest's ``vectordb`` entry (which the bundle must then record, since
    the query embedding functions read dim and precision from it).

    Args:
        bundle_dir: the bundle folder (its ``model/`` is what the query embedding functions load).
        model_dir: the source model folder; its embedding-cache key finds the corpus that eval already encoded.
        docs: dicts with ``_id`` and ``text``; ``title`` and any other field are kept as metadata.
        targets: a subset of ``VECTOR_TARGETS``.
        cfg: an ``ExportConfig.vectordb`` section (dim, precision, Chroma HNSW settings).
        name: the Chroma collection and LanceDB table name.
        include_title: embed title + text or the text alone, as eval read the corpus (``mining.include_title``).
    """
    unknown = [t for t in targets if t not in VECTOR_TARGETS]
    if unknown:
        raise ValueError(f"export.targets: {unknown} are not vector databases (expected some of {VECTOR_TARGETS})")
    if not NAME_PATTERN.match(name):
        raise ValueError(f"export.vectordb.name {name!r}: expected 3-512 characters from [a-zA-Z0-9._-], starting and "
                         f"ending with a letter or digit (Chroma's rule for collection names)")
    bundle_dir = Path(bundle_dir).resolve()
    model, _ = load_encoder(str(model_dir))
    key = cache_key(str(model_dir), model.max_seq_length, role="document")
    embeddings = encode_corpus(model, [document_text(d, include_title) for d in docs], batch_size, cache_key=key,
                               desc="vectordb corpus", role="document")  # (n, full dim), or its shards on Ray
    shards, vectors = None, None
    if isinstance(embeddings, np.ndarray):
        vectors = export_vectors(embeddings, cfg.dim, cfg.precision)  # (n, dim)
        dim = int(vectors.shape[1])
    else:
        shards = embeddings
        # checks dim and precision before anything is written, as export_vectors of the matrix does
        dim = int(export_vectors(np.zeros((0, shards.dim), np.float32), cfg.dim, cfg.precision).shape[1])
        if "chroma" in targets:
            vectors = chroma_vectors(shards, cfg.dim, cfg.precision)
    ids = [d["_id"] for d in docs]
    texts = [d.get("text") or "" for d in docs]
    metadata = metadata_columns(docs)
    settings: dict[str, Any] = {"name": name, "dim": dim, "precision": cfg.precision,
                                "metric": "cosine", "num_docs": len(docs)}
    # The embedding functions read dim and precision from the manifest: record them before anything calls one.
    manifest_path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["vectordb"] = settings
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for target in targets:
        folder = bundle_dir / (CHROMA_DIR if target == "chroma" else LANCEDB_DIR)
        if target == "chroma":
            forget_chroma(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        if target == "chroma":
            write_chroma(folder, name, ids, texts, metadata, vectors, ChromaEmbeddingFunction(str(bundle_dir)),
                         cfg.chroma_ef_construction, cfg.chroma_ef_search, cfg.chroma_max_neighbors)
            extra = {"hnsw": {"ef_construction": cfg.chroma_ef_construction, "ef_search": cfg.chroma_ef_search,
                              "max_neighbors": cfg.chroma_max_neighbors}}
        elif shards is None:
            write_lancedb(folder, name, ids, texts, metadata, vectors, cfg.precision,
                          LanceEmbeddingFunction.create(bundle_dir=str(bundle_dir)))
            extra = {"index": "none (exact search)"}
        else:
            write_lancedb_shards(folder, name, ids, texts, metadata, shards, cfg.dim, cfg.precision,
                                 LanceEmbeddingFunction.create(bundle_dir=str(bundle_dir)))
            extra = {"index": "none (exact search)", "written_in_shards": len(shards.starts)}
        seconds = time.perf_counter() - start
        settings[target] = {"path": str(folder.relative_to(bundle_dir)), "write_seconds": round(seconds, 3),
                            "bytes": dir_bytes(folder), **extra}
        logger.info("wrote %s %s: %d docs, dim %d %s, %.1fs, %d bytes", target, folder, len(docs), dim,
                    cfg.precision, seconds, settings[target]["bytes"])
    manifest["vectordb"] = settings
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return settings


def chroma_vectors(shards: ShardSet, dim: int, precision: str) -> np.ndarray:
    """Chroma's vectors (n, dim) from a corpus's shards, gathered into one matrix: allowed up to
    ``CHROMA_MAX_ROWS`` rows, a ValueError naming ``export.targets`` above it."""
    if shards.num_rows > CHROMA_MAX_ROWS:
        raise ValueError(f"export.targets: chroma holds the whole collection in this process's memory and is written "
                         f"on compute.engine ray only up to {CHROMA_MAX_ROWS} rows; this corpus has "
                         f"{shards.num_rows}. Use lancedb (written shard by shard) instead of chroma in "
                         f"export.targets, or compute.engine local")
    logger.warning("export.targets chroma on compute.engine ray: the %d rows' vectors are gathered into one matrix "
                   "in this process (Chroma keeps its whole index in memory); lancedb is written shard by shard",
                   shards.num_rows)
    return export_vectors(shards.matrix(), dim, precision)  # (n, dim)


def open_chroma(bundle_dir: str | Path, device: str | None = None):
    """The bundle's Chroma collection, with the embedding function that embeds ``query_texts`` as the export did."""
    settings = read_settings(bundle_dir)
    if "chroma" not in settings:
        raise ValueError(f"bundle {bundle_dir} has no Chroma collection (export.targets did not include chroma)")
    client = chromadb.PersistentClient(path=str((Path(bundle_dir) / settings["chroma"]["path"]).resolve()),
                                       settings=chroma_settings())
    return client.get_collection(settings["name"], embedding_function=ChromaEmbeddingFunction(str(bundle_dir), device))


def open_lancedb(bundle_dir: str | Path):
    """The bundle's LanceDB table (``table.search("text")`` embeds with the path recorded at export)."""
    settings = read_settings(bundle_dir)
    if "lancedb" not in settings:
        raise ValueError(f"bundle {bundle_dir} has no LanceDB table (export.targets did not include lancedb)")
    return lancedb.connect(str(Path(bundle_dir) / settings["lancedb"]["path"])).open_table(settings["name"])


def chroma_top_ids(collection, query_vectors: np.ndarray, k: int) -> list[list[str]]:
    """Chroma's top-``k`` document ids per query vector, best first."""
    result = collection.query(query_embeddings=np.asarray(query_vectors, dtype=np.float32), n_results=k,
                              include=["distances"])
    return result["ids"]


def lancedb_top_ids(table, query_vectors: np.ndarray, k: int) -> list[list[str]]:
    """LanceDB's exact top-``k`` document ids per query vector (cosine), best first."""
    out = []
    for vector in np.asarray(query_vectors, dtype=np.float32):
        hits = (table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
                .select(["id", "_distance"]))
        out.append(hits.to_arrow()["id"].to_pylist())
    return out
