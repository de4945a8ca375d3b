"""Config section owned by the serve stage: ``export``.

Example (YAML)::

    export:
      model_name: minilm-scifact-embtune
      targets: [faiss, chroma, lancedb, milvus]   # where the corpus and its embeddings go (see docs/serve.md)
      index: {kind: ivf_pq, nprobe: 32}   # flat (exact) | ivf_pq (memory-mapped) | hnsw
      vectordb:
        dim: 256            # Matryoshka truncation for Chroma, LanceDB and Milvus; 0 = the model's full dimension
        precision: float16  # LanceDB stores half the bytes; Chroma and Milvus keep the rounded values as float32
      milvus:
        uri: http://milvus.internal:19530   # default: a milvus-lite file inside the bundle (vectordb/milvus.db)
        token_env: MILVUS_TOKEN             # the environment variable holding the cluster's token, if it needs one
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

EXPORT_TARGETS = ("faiss", "chroma", "lancedb", "milvus")
INDEX_KINDS = ("flat", "ivf_pq", "hnsw")  # embtune.retrieval.index.ANN_KINDS


@dataclass
class IndexConfig:
    """The bundle's FAISS index (``index/corpus.faiss``): its kind, and the settings recorded in the manifest and
    served. Sizing and what each kind costs: docs/serve.md ("Indexes that scale")."""

    kind: Literal["flat", "ivf_pq", "hnsw"] = "flat"  # flat: exact, in RAM; ivf_pq: memory-mapped; hnsw: in RAM
    factory: str = ""  # a faiss.index_factory string instead of the kind's own (embtune.retrieval.index.ann_factory)
    nprobe: int = 32  # ivf_pq: IVF lists searched per query
    # ivf_pq: PQ candidates re-scored with the 8-bit vectors, as a multiple of k. PQ alone ranks coarsely, and the
    # denser the corpus the more candidates a top-10 needs: the 10M bundle of benchmarks/results/serve_scale.json
    # needed 384 where 32 was enough at 100k. Retune a built bundle with embtune.serve.bundle.retune_bundle.
    k_factor: float = 32.0
    ef_search: int = 128  # hnsw: the graph search's beam width
    train_rows: int = 0  # ivf_pq: vectors sampled to train the quantizers; 0 = 64 per IVF list

    def validate(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"export.index.kind must be one of {list(INDEX_KINDS)}, got {self.kind!r}")
        for key in ("nprobe", "k_factor", "ef_search"):
            if getattr(self, key) < 1:
                raise ValueError(f"export.index.{key} must be >= 1, got {getattr(self, key)}")
        if self.train_rows < 0:
            raise ValueError(f"export.index.train_rows must be >= 0 (0 = 64 per IVF list), got {self.train_rows}")


@dataclass
class VectorDBConfig:
    """How the corpus is written into Chroma and LanceDB (``serve/vectordb.py``)."""

    dim: int = 0  # 0 = the model's full dimension; else the first `dim` values, renormalized (Matryoshka)
    precision: Literal["float32", "float16"] = "float32"
    name: str = ""  # Chroma collection and LanceDB table name; default: export.model_name
    # Chroma searches an HNSW graph: approximate, and each build (multi-threaded) differs. On SciFact's 5,183
    # documents these settings returned FAISS's exact top-10 for all 300 test queries in 11 of 11 builds;
    # ef_search 200 missed 1-2 queries in 2 of 10 builds, Chroma's defaults (100/100/16) 7-12 in every build
    # (benchmarks/results/export_parity.json). Raise ef_search for larger corpora, or use lancedb (exact).
    chroma_ef_construction: int = 200
    chroma_ef_search: int = 1000
    chroma_max_neighbors: int = 32

    def validate(self) -> None:
        if self.dim < 0:
            raise ValueError(f"export.vectordb.dim must be >= 0 (0 = the model's full dimension), got {self.dim}")
        for key in ("chroma_ef_construction", "chroma_ef_search", "chroma_max_neighbors"):
            if getattr(self, key) < 1:
                raise ValueError(f"export.vectordb.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class MilvusConfig:
    """Where and how the corpus is written into Milvus (``serve/vectordb.py``, ``export.targets: [milvus]``)."""

    # "" = milvus-lite: a local Milvus in the file <bundle>/vectordb/milvus.db, served by this process. Any other
    # value goes to pymilvus as it is: a path ending in .db (another milvus-lite file) or a server's URI
    # (http://host:19530); the same code writes both.
    uri: str = ""
    # The token is a secret, so the config names the environment variable that holds it ("user:password" or an
    # API key); the manifest records the variable's name, never its value. Unset or empty: no token.
    token_env: str = "MILVUS_TOKEN"
    collection: str = ""  # default: export.vectordb.name, else export.model_name
    batch_size: int = 1000  # rows per insert call; a rerun after a kill inserts only the rows not yet stored
    # FLAT = exact inner product, the served route's ranking (FAISS IndexFlatIP over the same vectors);
    # AUTOINDEX = the server picks an approximate index (Zilliz Cloud accepts only it).
    index_type: Literal["FLAT", "AUTOINDEX"] = "FLAT"
    # Milvus's own full-text search: a BM25 function fills a sparse field from the analyzed text. It is Milvus's
    # tokenizer and BM25, not embtune's, so its ranking is not the served BM25's. Needs Milvus >= 2.5 or milvus-lite.
    bm25: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"export.milvus.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ExportConfig:
    """Bundle the fine-tuned model with its metrics and a model card, and write the corpus to each target."""

    out_dir: str = ""  # default: <run_dir>/bundle (the export stage keeps its manifest in <run_dir>/export)
    model_name: str = "embtune-model"
    # Where the eval corpus and its embeddings go: "faiss" = index/corpus.faiss (what `python -m embtune.serve`
    # searches),
    # "chroma" = a persistent Chroma collection, "lancedb" = a LanceDB table, both under <bundle>/vectordb/,
    # "milvus" = a Milvus collection (export.milvus.uri: milvus-lite in <bundle>/vectordb/milvus.db by default).
    # [] = a bundle with the model only.
    targets: list[str] = field(default_factory=lambda: ["faiss"])
    vectordb: VectorDBConfig = field(default_factory=VectorDBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)  # the FAISS index of the "faiss" target
    milvus: MilvusConfig = field(default_factory=MilvusConfig)
    # Also write model/onnx/model.onnx (needs onnx + onnxruntime). The index is embedded with eval.backend, which
    # writes the ONNX file it needs (model_qint8.onnx for onnx-int8) whatever this says.
    onnx: bool = False

    # One key per thing: the encoder backend is eval.backend, recorded in the bundle (manifest.json encoder_backend).
    removed_keys: ClassVar[dict[str, str]] = {
        "backend": "the encoder backend is chosen once, with eval.backend (export embeds the index with it)",
        "onnx_int8": "set eval.backend: onnx-int8 (the bundle's index is embedded with int8 and ships "
                     "model_qint8.onnx); export.onnx: true writes the fp32 model.onnx",
    }

    def validate(self) -> None:
        for i, target in enumerate(self.targets):
            if target not in EXPORT_TARGETS:
                raise ValueError(f"export.targets[{i}]: unknown target {target!r}; expected some of "
                                 f"{list(EXPORT_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"export.targets lists a target twice: {self.targets}")
