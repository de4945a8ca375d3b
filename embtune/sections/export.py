"""Config section owned by the serve stage: ``export``.

Example (YAML)::

    export:
      model_name: minilm-scifact-embtune
      targets: [faiss, chroma, lancedb]   # where the corpus and its embeddings go (see docs/serve.md)
      vectordb:
        dim: 256            # Matryoshka truncation for Chroma and LanceDB; 0 = the model's full dimension
        precision: float16  # LanceDB stores half the bytes; Chroma keeps the float16-rounded values as float32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embtune.retrieval.encoder import BACKENDS

EXPORT_TARGETS = ("faiss", "chroma", "lancedb")


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
class ExportConfig:
    """Bundle the fine-tuned model with its metrics and a model card, and write the corpus to each target."""

    out_dir: str = ""  # default: <run_dir>/bundle (the export stage keeps its manifest in <run_dir>/export)
    model_name: str = "embtune-model"
    # Where the eval corpus and its embeddings go: "faiss" = index/corpus.faiss (what `python -m embtune.serve`
    # searches),
    # "chroma" = a persistent Chroma collection, "lancedb" = a LanceDB table, both under <bundle>/vectordb/.
    # [] = a bundle with the model only.
    targets: list[str] = field(default_factory=lambda: ["faiss"])
    vectordb: VectorDBConfig = field(default_factory=VectorDBConfig)
    onnx: bool = False  # also write model/onnx/model.onnx (needs onnx + onnxruntime)
    onnx_int8: bool = False  # and a dynamic int8-quantized model_qint8.onnx (written with model.onnx)
    # Encoder that embeds the index corpus (embtune/retrieval/encoder.py); serve the bundle with the same
    # serve.backend. The ONNX backends write the ONNX file they need whatever export.onnx says.
    backend: Literal[BACKENDS] = "torch"  # embtune.retrieval.encoder.BACKENDS, the one list

    def validate(self) -> None:
        for i, target in enumerate(self.targets):
            if target not in EXPORT_TARGETS:
                raise ValueError(f"export.targets[{i}]: unknown target {target!r}; expected some of "
                                 f"{list(EXPORT_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"export.targets lists a target twice: {self.targets}")
