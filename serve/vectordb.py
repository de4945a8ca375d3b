"""Vector-database export: the corpus and the model's embeddings in a persistent Chroma collection, a LanceDB
table and a Milvus collection, and embedding functions that load the bundle's model so that queries are embedded as
the corpus was.

Layout inside a bundle (``export.targets`` names which are written)::

    <bundle>/vectordb/chroma/    chromadb.PersistentClient(path=...): one collection, cosine (or ip) space
    <bundle>/vectordb/lancedb/   lancedb.connect(...): one table (id, title, text, metadata..., vector)
    <bundle>/vectordb/milvus.db  milvus-lite's folder (export.milvus.uri, default): one collection (id, title, text,
                                 metadata JSON, vector; sparse = Milvus's BM25 of text), or a Milvus server's URI
    <bundle>/manifest.json       "vectordb": {"name", "dim", "precision", "metric", "renormalized",
                                 "chroma": {"metric", ...}, "lancedb": {"metric", ...}, "milvus": {...}}

Query it the way the export embedded the corpus (same model, Matryoshka dimension and precision)::

    from embtune.serve.vectordb import open_chroma, open_lancedb, QueryEncoder
    collection = open_chroma("runs/x/bundle")           # carries the bundle's embedding function
    collection.query(query_texts=["what is dense retrieval?"], n_results=10)
    table = open_lancedb("runs/x/bundle")
    table.search("what is dense retrieval?").limit(10).to_list()  # embedded by the table's embedding function
    table.search(QueryEncoder("runs/x/bundle")(["what is dense retrieval?"])[0]).distance_type(
        read_settings("runs/x/bundle")["lancedb"]["metric"])...   # "cosine", or "dot" for a dot-product model
    with open_milvus("runs/x/bundle") as milvus:        # client, collection name and the bundle's query encoder
        milvus.search(["what is dense retrieval?"], k=10)   # or milvus.client.search(milvus.collection, ...)
    # leaving the block (or milvus.close()) stops milvus-lite's in-process server

The document vectors come from the shared embedding cache (:func:`embtune.compute.encoding.encode_corpus` with the
source model's key), so export does not encode the corpus again after eval did. With ``compute.engine: ray`` they
are the corpus's Parquet shards: LanceDB is written from them shard by shard, Chroma only up to
``CHROMA_MAX_ROWS`` rows (it keeps the whole collection in memory), Milvus in batches of each shard.

Every target stores the vectors the served route (``/search``, the core Retriever) searches, and ranks them as it
does: a cosine model's normalized (Chroma's ``cosine`` space, LanceDB's ``distance_type("cosine")``, Milvus's
``IP``), a dot-product model's with their norms kept, ranked by the raw inner product (Chroma's ``ip`` space, whose
distance is 1 - dot, LanceDB's ``distance_type("dot")``, Milvus's ``IP``). A Matryoshka prefix
(``export.vectordb.dim`` below the model's) is renormalized for every model, because the served route ranks a
truncated dot-product model by cosine too (``embtune.retrieval.spec.DenseIndex``, as eval measured it). The
manifest records which (``renormalized``, and each target's ``metric``), and the query embedding functions read it.

Milvus's export resumes: the collection's description records a fingerprint of what it holds, and a rerun with the
same fingerprint (after a killed export, say) inserts only the ids not yet stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

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
from embtune.retrieval.encoder import cache_key, encode, load_encoder, normalize, truncate, uses_cosine
from embtune.sections.export import MilvusConfig

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # the bundle's (serve.bundle.MANIFEST_FILE)
MODEL_DIR = "model"
CHROMA_DIR = "vectordb/chroma"
LANCEDB_DIR = "vectordb/lancedb"
MILVUS_LITE_FILE = "vectordb/milvus.db"  # export.milvus.uri's default: milvus-lite's data folder
VECTOR_TARGETS = ("chroma", "lancedb", "milvus")
# Milvus's rule for collection names; the default (export.vectordb.name or model_name) is made to follow it.
MILVUS_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
MILVUS_MAX_VARCHAR = 65535  # bytes: Milvus's largest VARCHAR, for the title and the text
MILVUS_MAX_ID = 512  # bytes of a document id (the VARCHAR primary key)
FINGERPRINT_PROPERTY = "embtune.fingerprint"  # the collection property that says which export it holds
# Chroma's rule for collection names; LanceDB accepts a superset of it.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
RESERVED_FIELDS = ("_id", "text")  # become the row id and the document; every other field is metadata
# With compute.engine: ray, Chroma is written only up to this many rows. A persistent Chroma collection keeps its
# whole HNSW graph, vectors included, in the memory of the process that writes it (rows x dim x 4 bytes plus the
# links): the memory the shards keep out of the driver. LanceDB is appended shard by shard and has no such limit.
# Below it the vectors are gathered into one matrix and written as on the local engine; above it the export stops
# before writing anything and says to use lancedb.
CHROMA_MAX_ROWS = 1_000_000
# Each target's name for the two ways the served route ranks: cosine (normalized vectors) and the raw inner product.
CHROMA_SPACE = {True: "cosine", False: "ip"}
LANCEDB_METRIC = {True: "cosine", False: "dot"}


def chroma_settings() -> Settings:
    # Offline by default: no product telemetry calls leave the machine.
    return Settings(anonymized_telemetry=False)


def export_vectors(embeddings: np.ndarray, dim: int = 0, precision: str = "float32",
                   renormalize: bool = True) -> np.ndarray:
    """The vectors a target stores, as float32 (n, dim): truncated to ``dim`` (0 = all) and renormalized, then
    rounded to ``precision`` ("float16" values are exactly representable in float16).

    ``renormalize=False`` keeps a dot-product model's norms (the served route's inner product): the first ``dim``
    values as they are (:func:`export_vectordb` truncates only renormalized vectors)."""
    full = embeddings.shape[1]
    if dim > full:
        raise ValueError(f"export.vectordb.dim {dim} is larger than the model's dimension {full}")
    if renormalize:
        out = truncate(embeddings, dim) if dim and dim < full else normalize(embeddings)  # (n, dim)
    else:
        out = np.ascontiguousarray(embeddings[:, : dim or full], dtype=np.float32)  # (n, dim)
    if precision == "float16":
        out = out.astype(np.float16).astype(np.float32)
    elif precision != "float32":
        raise ValueError(f"export.vectordb.precision must be 'float32' or 'float16', got {precision!r}")
    return out


def read_settings(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest's ``vectordb`` entry; a bundle exported without chroma, lancedb or milvus has none."""
    manifest_path = Path(bundle_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"bundle {bundle_dir}: no {MANIFEST_FILE}")
    settings = json.loads(manifest_path.read_text()).get("vectordb")
    if not settings:
        raise ValueError(f"{manifest_path}: no 'vectordb' entry; export with export.targets including chroma, "
                         f"lancedb or milvus")
    return settings


class QueryEncoder:
    """Embed texts as the export embedded the corpus: the bundle's model, then the same dimension and precision.

    The model is loaded on the first call. ``__call__(texts)`` returns float32 (len(texts), dim).
    ``renormalize``: None = as the export stored the documents (the manifest's ``renormalized``: False keeps a
    dot-product model's query norms); True or False forces it.
    """

    def __init__(self, bundle_dir: str | Path, device: str | None = None, batch_size: int = 64,
                 renormalize: bool | None = None):
        settings = read_settings(bundle_dir)
        self.bundle_dir = Path(bundle_dir)
        self.dim = int(settings["dim"])
        self.precision = settings["precision"]
        # A bundle exported before dot-product models kept their norms has no "renormalized": it renormalized all.
        self.renormalize = settings.get("renormalized", True) if renormalize is None else renormalize
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            self._model, _ = load_encoder(str(self.bundle_dir / MODEL_DIR), device=self.device)
        embeddings = encode(self._model, list(texts), self.batch_size, desc="query", role="query")  # (n, full dim)
        return export_vectors(embeddings, self.dim, self.precision, self.renormalize)  # (n, dim)


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
        return list(CHROMA_SPACE.values())  # ip: a dot-product model's collection


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


def metadata_kinds(docs: Iterable[dict[str, Any]]) -> dict[str, str]:
    """How each field but ``_id`` and ``text`` is stored, from one pass over the documents (streamed): ``keep`` when
    its values are all strings, all booleans or all numbers of one type, ``float`` for ints and floats mixed, ``json``
    otherwise (lists, mappings, mixed types: neither Chroma metadata nor an Arrow column holds a mix); a field that
    is None everywhere is left out. Fields in first-seen order."""
    seen: dict[str, set[type]] = {}
    for doc in docs:
        for key, value in doc.items():
            if key not in RESERVED_FIELDS:
                kinds = seen.setdefault(key, set())
                if value is not None:
                    kinds.add(type(value))
    out = {}
    for key, kinds in seen.items():
        if kinds == {int, float}:
            out[key] = "float"
        elif len(kinds) > 1 or not kinds <= {str, bool, int, float}:
            out[key] = "json"
        elif kinds:
            out[key] = "keep"
    return out


def metadata_columns(docs: list[dict[str, Any]], kinds: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """Every field but ``_id`` and ``text``, one column per field, stored as :func:`metadata_kinds` says (``kinds``:
    the whole corpus's, for a part of it; default: these documents'). Missing values are None."""
    kinds = metadata_kinds(docs) if kinds is None else kinds
    columns: dict[str, list[Any]] = {}
    for key, kind in kinds.items():
        values = [doc.get(key) for doc in docs]
        if kind == "float":
            values = [None if v is None else float(v) for v in values]
        elif kind == "json":
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
                 ef_search: int = 200, max_neighbors: int = 32, space: str = "cosine") -> None:
    """(Re)create collection ``name`` in a persistent Chroma at ``path``: HNSW in ``space`` (``CHROMA_SPACE``) with
    the given settings."""
    client = chromadb.PersistentClient(path=str(Path(path).resolve()), settings=chroma_settings())
    if name in {c.name for c in client.list_collections()}:
        client.delete_collection(name)
    collection = client.create_collection(
        name, embedding_function=embedding_function,
        configuration={"hnsw": {"space": space, "ef_construction": ef_construction, "ef_search": ef_search,
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


def metadata_types_of(docs: Iterable[dict[str, Any]], kinds: dict[str, str]) -> dict[str, pa.DataType]:
    """:func:`metadata_types` of the whole corpus's columns without building them: each field's first value that
    is not None, stored as ``kinds`` says (one streamed pass, stopping when every field has one)."""
    first: dict[str, Any] = {}
    for doc in docs:
        for key in kinds:
            if key not in first and doc.get(key) is not None:
                first[key] = doc[key]
        if len(first) == len(kinds):
            break
    return metadata_types(metadata_columns([first], kinds)) if kinds else {}


def lance_functions(embedding_function: TextEmbeddingFunction) -> list[EmbeddingFunctionConfig]:
    return [EmbeddingFunctionConfig(source_column="text", vector_column="vector", function=embedding_function)]


def write_lancedb(path: str | Path, name: str, ids: list[str], texts: list[str], metadata: dict[str, list[Any]],
                  vectors: np.ndarray, precision: str, embedding_function: TextEmbeddingFunction) -> None:
    """(Re)create table ``name`` in LanceDB at ``path``: id, text, metadata columns and a fixed-size vector column
    of ``precision``. No ANN index is built, so searches are exact (flat)."""
    table = lancedb_rows(ids, texts, metadata, vectors, precision)
    db = lancedb.connect(str(path))
    db.create_table(name, data=table, mode="overwrite", embedding_functions=lance_functions(embedding_function))


def write_lancedb_shards(path: str | Path, name: str, docs: Sequence[dict[str, Any]], kinds: dict[str, str],
                         types: dict[str, pa.DataType], shards: ShardSet, dim: int, precision: str,
                         embedding_function: TextEmbeddingFunction, renormalize: bool = True) -> None:
    """:func:`write_lancedb` from a corpus's shards: the table created from the first shard and appended with each
    next one, each shard's vectors passed through :func:`export_vectors` on its own (it is row-wise: truncation,
    renormalization and float16 rounding need no statistics of the whole corpus) and its documents read as
    ``docs[start:stop]`` (a corpus file's rows, read by row). The same rows and schema as :func:`write_lancedb` of
    the whole matrix, without the matrix or the corpus in this process; ``kinds`` and ``types`` are the whole
    corpus's (:func:`metadata_kinds`, :func:`metadata_types_of`)."""
    from embtune.compute.export import write_lancedb_table

    def shard_rows(start: int, _ids: list[str], vectors: np.ndarray) -> pa.Table:
        part = docs[start:start + len(vectors)]
        return lancedb_rows([d["_id"] for d in part], [d.get("text") or "" for d in part],
                            metadata_columns(part, kinds), export_vectors(vectors, dim, precision, renormalize),
                            precision, types)

    write_lancedb_table(shards, path, name, batch=shard_rows, embedding_functions=lance_functions(embedding_function))


def export_vectordb(bundle_dir: str | Path, model_dir: str | Path, docs: Sequence[dict[str, Any]], targets: list[str],
                    cfg, name: str, batch_size: int = 64, include_title: bool = True,
                    milvus: MilvusConfig | None = None, doc_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``docs`` with the model's embeddings to each of ``targets`` (``chroma``, ``lancedb`` under
    ``<bundle_dir>/vectordb/``, ``milvus`` at ``milvus.uri``); return the manifest's ``vectordb`` entry (which the
    bundle must then record, since the query embedding functions read dim and precision from it).

    Args:
        bundle_dir: the bundle folder (its ``model/`` is what the query embedding functions load).
        model_dir: the source model folder; its embedding-cache key finds the corpus that eval already encoded.
        docs: dicts with ``_id`` and ``text``; ``title`` and any other field are kept as metadata. A list, or any
            sequence that reads rows and slices on demand (on the Ray engine, the corpus file's rows:
            ``embtune.compute.corpus.CorpusFile.store``), which LanceDB and Milvus then read shard by shard.
        targets: a subset of ``VECTOR_TARGETS``.
        cfg: an ``ExportConfig.vectordb`` section (dim, precision, Chroma HNSW settings).
        name: the Chroma collection and LanceDB table name (and Milvus's, made to fit its rule, unless
            ``milvus.collection`` names one).
        include_title: embed title + text or the text alone, as eval read the corpus (``mining.include_title``).
        milvus: the ``export.milvus`` section (default: its defaults).
        doc_texts: the documents' texts as the engine reads them (a corpus file's column on Ray, whose shards the
            actors encode from the file); default: built from ``docs``.
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
    texts = doc_texts if doc_texts is not None else [document_text(d, include_title) for d in docs]
    embeddings = encode_corpus(model, texts, batch_size, cache_key=key, desc="vectordb corpus",
                               role="document")  # (n, full dim), or its shards on Ray
    full = embeddings.shape[1] if isinstance(embeddings, np.ndarray) else embeddings.dim
    # What the served route searches (embtune.retrieval.spec.DenseIndex): a dot-product model's own vectors at its
    # full dim, but a Matryoshka prefix renormalized for every model, so a truncated dot model ranks by cosine there.
    renormalize = uses_cosine(model) or 0 < cfg.dim < full
    similarity = getattr(model, "similarity_fn_name", None) or "cosine"
    shards, vectors = None, None
    if isinstance(embeddings, np.ndarray):
        vectors = export_vectors(embeddings, cfg.dim, cfg.precision, renormalize)  # (n, dim)
        dim = int(vectors.shape[1])
    else:
        shards = embeddings
        # checks dim and precision before anything is written, as export_vectors of the matrix does
        dim = int(export_vectors(np.zeros((0, shards.dim), np.float32), cfg.dim, cfg.precision).shape[1])
        if "chroma" in targets:
            vectors = chroma_vectors(shards, cfg.dim, cfg.precision, renormalize)
    kinds = metadata_kinds(docs)  # one streamed pass; the columns are built per target (whole, or per shard)
    settings: dict[str, Any] = {"name": name, "dim": dim, "precision": cfg.precision,
                                "metric": "cosine" if renormalize else "dot", "similarity_fn_name": similarity,
                                "renormalized": renormalize, "num_docs": len(docs)}
    if "milvus" in targets:
        milvus = milvus or MilvusConfig()
        milvus_name = milvus.collection or milvus_collection_name(name)
        if not MILVUS_NAME_PATTERN.match(milvus_name):
            raise ValueError(f"export.milvus.collection {milvus_name!r}: expected 1-255 characters from "
                             f"[A-Za-z0-9_], not starting with a digit (Milvus's rule for collection names)")
        check_milvus_fields(docs)

        def milvus_chunks():
            """(first row, vectors) of each part of the corpus: the whole matrix, or each shard on Ray."""
            if shards is None:
                yield 0, vectors  # (n, dim)
            else:
                for start, _ids, part in shards:
                    yield start, export_vectors(part, cfg.dim, cfg.precision, renormalize)  # (rows, dim)
    # The embedding functions read dim, precision and renormalized from the manifest: record them before anything
    # calls one.
    manifest_path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["vectordb"] = settings
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for target in targets:
        if target == "milvus":
            settings["milvus"] = export_milvus(bundle_dir, milvus, milvus_name, docs, milvus_chunks, dim, cfg.precision,
                                               similarity=similarity, renormalize=renormalize)
            continue
        folder = bundle_dir / (CHROMA_DIR if target == "chroma" else LANCEDB_DIR)
        if target == "chroma":
            forget_chroma(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        if target == "chroma":
            every = list(docs)  # Chroma holds its whole collection in memory anyway (CHROMA_MAX_ROWS on Ray)
            write_chroma(folder, name, [d["_id"] for d in every], [d.get("text") or "" for d in every],
                         metadata_columns(every, kinds), vectors, ChromaEmbeddingFunction(str(bundle_dir)),
                         cfg.chroma_ef_construction, cfg.chroma_ef_search, cfg.chroma_max_neighbors,
                         CHROMA_SPACE[renormalize])
            extra = {"metric": CHROMA_SPACE[renormalize],
                     "hnsw": {"ef_construction": cfg.chroma_ef_construction, "ef_search": cfg.chroma_ef_search,
                              "max_neighbors": cfg.chroma_max_neighbors}}
        elif shards is None:
            write_lancedb(folder, name, [d["_id"] for d in docs], [d.get("text") or "" for d in docs],
                          metadata_columns(docs, kinds), vectors, cfg.precision,
                          LanceEmbeddingFunction.create(bundle_dir=str(bundle_dir)))
            extra = {"metric": LANCEDB_METRIC[renormalize], "index": "none (exact search)"}
        else:
            write_lancedb_shards(folder, name, docs, kinds, metadata_types_of(docs, kinds), shards, cfg.dim,
                                 cfg.precision, LanceEmbeddingFunction.create(bundle_dir=str(bundle_dir)), renormalize)
            extra = {"metric": LANCEDB_METRIC[renormalize], "index": "none (exact search)",
                     "written_in_shards": len(shards.starts)}
        seconds = time.perf_counter() - start
        settings[target] = {"path": str(folder.relative_to(bundle_dir)), "write_seconds": round(seconds, 3),
                            "bytes": dir_bytes(folder), **extra}
        logger.info("wrote %s %s: %d docs, dim %d %s, %.1fs, %d bytes", target, folder, len(docs), dim,
                    cfg.precision, seconds, settings[target]["bytes"])
    manifest["vectordb"] = settings
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return settings


def chroma_vectors(shards: ShardSet, dim: int, precision: str, renormalize: bool = True) -> np.ndarray:
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
    return export_vectors(shards.matrix(), dim, precision, renormalize)  # (n, dim)


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


def lancedb_top_ids(table, query_vectors: np.ndarray, k: int, metric: str = "cosine") -> list[list[str]]:
    """LanceDB's exact top-``k`` document ids per query vector by ``metric`` (the manifest's
    ``vectordb.lancedb.metric``: "cosine", or "dot" for a dot-product model), best first."""
    out = []
    for vector in np.asarray(query_vectors, dtype=np.float32):
        hits = (table.search(vector, vector_column_name="vector").distance_type(metric).limit(k)
                .select(["id", "_distance"]))
        out.append(hits.to_arrow()["id"].to_pylist())
    return out


def milvus_collection_name(name: str) -> str:
    """``name`` as a Milvus collection name: every character outside [A-Za-z0-9_] becomes "_", and a leading digit
    gets a "_" before it (Chroma's and LanceDB's names allow "-" and ".", Milvus's do not)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)[:255]
    return out if re.match(r"[A-Za-z_]", out) else ("_" + out)[:255]


def check_milvus_fields(docs: list[dict[str, Any]]) -> None:
    """Refuse, naming the document, an id or a title or text longer than Milvus's VARCHAR holds (nothing is cut)."""
    for doc in docs:
        for key, limit in (("_id", MILVUS_MAX_ID), ("title", MILVUS_MAX_VARCHAR), ("text", MILVUS_MAX_VARCHAR)):
            size = len(str(doc.get(key) or "").encode("utf-8"))
            if size > limit:
                raise ValueError(f"export.targets milvus: document {str(doc['_id'])[:80]!r} has a {size}-byte {key}; "
                                 f"Milvus's VARCHAR holds at most {limit} bytes (split the document, or drop milvus "
                                 f"from export.targets)")


def milvus_uri(bundle_dir: Path, uri: str) -> tuple[str, str]:
    """(what pymilvus connects to, what the manifest records) for ``export.milvus.uri``: "" = milvus-lite in the
    bundle, recorded relative to it so the bundle can move; another ``.db`` path absolute; a server's URI as is."""
    if not uri:
        return str(bundle_dir / MILVUS_LITE_FILE), MILVUS_LITE_FILE
    if "://" in uri or uri.startswith("unix:"):
        return uri, uri
    path = str(Path(uri).resolve())
    return path, path


def is_milvus_lite(uri: str) -> bool:
    return uri.endswith(".db") and "://" not in uri


def milvus_client(uri: str, token_env: str = ""):
    """A ``pymilvus.MilvusClient`` for ``uri``: milvus-lite for a ``.db`` path (a server in this process), else a
    Milvus server, with the token from the environment variable ``token_env`` when it is set."""
    from pymilvus import MilvusClient

    if is_milvus_lite(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    token = os.environ.get(token_env, "") if token_env else ""
    return MilvusClient(uri=uri, token=token)


def release_milvus(client, uri: str) -> None:
    """Close ``client``; for milvus-lite also stop the in-process server that holds ``uri``'s folder, so that
    another process can open it (pymilvus keeps it until this process exits)."""
    client.close()
    if is_milvus_lite(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def milvus_fingerprint(docs: list[dict[str, Any]], chunks, fixed: dict[str, Any]) -> str:
    """A hash of every row Milvus is to hold (id, title, text, metadata, stored vector) and of the collection's
    settings: a collection whose description carries it holds (part of) this very export."""
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode())
    for start, vectors in chunks():
        for doc, vector in zip(docs[start:start + len(vectors)], vectors):
            row = [doc["_id"], doc.get("title") or "", doc.get("text") or "", milvus_metadata(doc)]
            digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode())
            digest.update(np.ascontiguousarray(vector, dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


def milvus_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """Every field but the id, title and text: a JSON field holds any mix of types, so values are kept as they are."""
    return {key: value for key, value in doc.items() if key not in ("_id", "title", "text")}


def create_milvus_collection(client, name: str, dim: int, index_type: str, bm25: bool, fingerprint: str) -> None:
    """Collection ``name``: id (VARCHAR primary key), title, text, metadata (JSON), vector (FLOAT_VECTOR, IP) and,
    with ``bm25``, sparse: Milvus's BM25 function of the analyzed text. Its ``FINGERPRINT_PROPERTY`` property
    records ``fingerprint``."""
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MILVUS_MAX_ID)
    schema.add_field("title", DataType.VARCHAR, max_length=MILVUS_MAX_VARCHAR)
    schema.add_field("text", DataType.VARCHAR, max_length=MILVUS_MAX_VARCHAR, enable_analyzer=bm25)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vector", index_type=index_type, metric_type="IP")
    if bm25:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                     output_field_names=["sparse"]))
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    try:
        client.create_collection(name, schema=schema, index_params=index,
                                 properties={FINGERPRINT_PROPERTY: fingerprint})
    except Exception as err:  # pymilvus raises MilvusException subclasses; name the setting that may be at fault
        hint = "; a Milvus older than 2.5 has no BM25 function: set export.milvus.bm25: false" if bm25 else ""
        raise ValueError(f"export.milvus: creating collection {name!r} failed ({err}){hint}") from err


def milvus_stored_ids(client, name: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` collection ``name`` already holds. Asked batch by batch (a get by primary key), not with
    a query iterator over the whole collection: milvus-lite does not implement the timestamp call the iterator
    makes first."""
    return {row["id"] for row in client.get(name, ids=ids, output_fields=["id"])}


def milvus_count(client, name: str) -> int:
    return int(client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"])


def export_milvus(bundle_dir: Path, cfg: MilvusConfig, name: str, docs: list[dict[str, Any]], chunks, dim: int,
                  precision: str, similarity: str, renormalize: bool) -> dict[str, Any]:
    """Write ``docs`` and their vectors (``chunks()`` yields (first row, (rows, dim) vectors)) into Milvus
    collection ``name``, ``cfg.batch_size`` rows per insert; return the manifest's ``vectordb.milvus`` entry.

    Resumable: the collection's ``FINGERPRINT_PROPERTY`` records :func:`milvus_fingerprint`. When the collection
    exists with the same fingerprint (an export killed mid-write), only the ids it does not hold yet are inserted;
    with another one (another model, corpus or setting) it is dropped and written again. The count is checked at
    the end.
    """
    uri, recorded_uri = milvus_uri(bundle_dir, cfg.uri)
    fixed = {"dim": dim, "precision": precision, "renormalize": renormalize, "index_type": cfg.index_type,
             "bm25": cfg.bm25, "metric": "IP"}
    fingerprint = milvus_fingerprint(docs, chunks, fixed)
    start_time = time.perf_counter()
    client = milvus_client(uri, cfg.token_env)
    try:
        resuming = False
        if client.has_collection(name):
            recorded = client.describe_collection(name).get("properties", {}).get(FINGERPRINT_PROPERTY)
            if recorded == fingerprint:
                resuming = True
                client.load_collection(name)
                logger.info("milvus %s: collection %s holds part of this export (one that did not finish): "
                            "inserting the rows it lacks", recorded_uri, name)
            else:
                logger.warning("milvus %s: collection %s holds another export (fingerprint %r, this one %r); "
                               "dropped and written again", recorded_uri, name, recorded, fingerprint)
                client.drop_collection(name)
        if not resuming:
            create_milvus_collection(client, name, dim, cfg.index_type, cfg.bm25, fingerprint)
        written = already = 0
        for first, vectors in chunks():
            for offset in range(0, len(vectors), cfg.batch_size):
                batch = docs[first + offset:first + offset + cfg.batch_size]
                stored = milvus_stored_ids(client, name, [doc["_id"] for doc in batch]) if resuming else set()
                rows = [{"id": doc["_id"], "title": doc.get("title") or "", "text": doc.get("text") or "",
                         "metadata": milvus_metadata(doc), "vector": vector.tolist()}
                        for doc, vector in zip(batch, vectors[offset:offset + cfg.batch_size])
                        if doc["_id"] not in stored]
                already += len(stored)
                if rows:
                    client.insert(name, rows)
                    written += len(rows)
        client.flush(name)
        count = milvus_count(client, name)
        if count != len(docs):
            raise RuntimeError(f"milvus {recorded_uri}: collection {name} holds {count} rows after the export, "
                               f"expected {len(docs)}; rerun the export (the collection is rewritten when it differs)")
    finally:
        release_milvus(client, uri)
    seconds = time.perf_counter() - start_time
    entry = {"uri": recorded_uri, "lite": is_milvus_lite(uri), "token_env": cfg.token_env, "collection": name,
             "metric": "IP", "similarity_fn_name": similarity, "renormalized": renormalize,
             "index_type": cfg.index_type, "num_rows": count, "batch_size": cfg.batch_size,
             "rows_written": written, "rows_already_stored": already,
             "bm25": {"field": "sparse", "input_field": "text", "metric": "BM25",
                      "note": "Milvus's own analyzer and BM25 (not embtune's bm25s ranking)"} if cfg.bm25 else None,
             "write_seconds": round(seconds, 3), "fingerprint": fingerprint}
    if is_milvus_lite(uri):
        entry["bytes"] = dir_bytes(uri)
    logger.info("wrote milvus %s collection %s: %d rows (%d written now, %d already stored), dim %d, %.1fs",
                recorded_uri, name, count, written, already, dim, seconds)
    return entry


@dataclass
class MilvusCollection:
    """An exported Milvus collection: the client, the collection's name, and the bundle's query encoder (embeds
    texts as the export embedded the corpus). ``close()``, or leaving a ``with`` block, stops milvus-lite's
    in-process server."""

    client: Any
    collection: str
    encoder: QueryEncoder
    uri: str

    def search(self, queries: list[str], k: int = 10) -> list[list[dict[str, Any]]]:
        """The top ``k`` documents of each query text by the dense vectors: ``{"id", "score", "title", "text",
        "metadata"}`` best first."""
        hits = self.client.search(self.collection, data=self.encoder(queries).tolist(), anns_field="vector",
                                  limit=k, search_params={"metric_type": "IP"},
                                  output_fields=["title", "text", "metadata"])
        return [[{"id": h["id"], "score": h["distance"], **h["entity"]} for h in row] for row in hits]

    def close(self) -> None:
        release_milvus(self.client, self.uri)

    def __enter__(self) -> MilvusCollection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_milvus(bundle_dir: str | Path, device: str | None = None) -> MilvusCollection:
    """The bundle's Milvus collection, connected as the export recorded (milvus-lite in the bundle, or the server's
    URI with the token from the recorded environment variable), with the query encoder the export implies."""
    settings = read_settings(bundle_dir)
    entry = settings.get("milvus")
    if not entry:
        raise ValueError(f"bundle {bundle_dir} has no Milvus collection (export.targets did not include milvus)")
    uri = entry["uri"]
    if uri == MILVUS_LITE_FILE:
        uri = str((Path(bundle_dir) / MILVUS_LITE_FILE).resolve())
    client = milvus_client(uri, entry.get("token_env", ""))
    client.load_collection(entry["collection"])
    encoder = QueryEncoder(bundle_dir, device=device, renormalize=entry["renormalized"])
    return MilvusCollection(client, entry["collection"], encoder, uri)


def milvus_top_ids(client, name: str, query_vectors: np.ndarray, k: int) -> list[list[str]]:
    """Milvus's top-``k`` document ids per query vector (inner product), best first."""
    hits = client.search(name, data=np.asarray(query_vectors, dtype=np.float32).tolist(), anns_field="vector",
                         limit=k, search_params={"metric_type": "IP"}, output_fields=["id"])
    return [[h["id"] for h in row] for row in hits]
