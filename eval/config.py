"""Config section owned by the eval stage: ``eval`` (with its ``eval.sweep`` subsection)."""

from __future__ import annotations

from dataclasses import dataclass, field

HYBRID_METHODS = ("rrf", "weighted")
SWEEP_INDEXES = ("flat", "int8", "int4", "binary", "ivf", "hnsw", "ivfpq")


@dataclass
class SweepConfig:
    """Deployment sweep: FAISS index types x Matryoshka dims x precision (``eval/sweep.py``)."""

    enabled: bool = False
    # Index families to build at every dim; "flat" (fp32 exact) is always built: it is the ground truth.
    indexes: list[str] = field(default_factory=lambda: list(SWEEP_INDEXES))
    dims: list[int] = field(default_factory=lambda: [384, 256, 128, 64])  # dims above the model's are skipped
    k: int = 10  # search depth: nDCG@10 and recall@10 against exact need the top 10 only
    ivf_nlist: int = 64
    ivf_nprobe: list[int] = field(default_factory=lambda: [1, 4, 16])
    hnsw_m: int = 32
    hnsw_ef_search: list[int] = field(default_factory=lambda: [16, 64, 256])
    pq_bytes: list[int] = field(default_factory=lambda: [8, 16])  # IVF-PQ code bytes per vector (8-bit subquantizers)
    pq_nprobe: int = 16
    # Binary (Hamming) search rescored with the float query: k * rescore_multiplier candidates, against the docs'
    # own sign bits as +-1 ("bits": no extra bytes), their int8 codes, or their fp32 vectors (both stored extra).
    rescore_multiplier: list[int] = field(default_factory=lambda: [4, 10])
    rescore_docs: list[str] = field(default_factory=lambda: ["bits", "int8", "fp32"])
    threads: int = 1  # FAISS threads while timing (1 = stable queries/s on a shared CPU)
    plot: bool = True

    def validate(self) -> None:
        unknown = [name for name in self.indexes if name not in SWEEP_INDEXES]
        if unknown:
            raise ValueError(f"eval.sweep.indexes: unknown {unknown}; expected some of {list(SWEEP_INDEXES)}")
        bad = [name for name in self.rescore_docs if name not in ("bits", "int8", "fp32")]
        if bad:
            raise ValueError(f"eval.sweep.rescore_docs: unknown {bad}; expected some of ['bits', 'int8', 'fp32']")
        if any(m < 1 for m in self.rescore_multiplier):
            raise ValueError(f"eval.sweep.rescore_multiplier values must be >= 1, got {self.rescore_multiplier}")
        for key in ("k", "ivf_nlist", "hnsw_m", "pq_nprobe", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.sweep.{key} must be >= 1, got {getattr(self, key)}")
        if any(d < 1 for d in self.dims) or any(p < 1 for p in self.ivf_nprobe + self.hnsw_ef_search + self.pq_bytes):
            raise ValueError("eval.sweep.dims, ivf_nprobe, hnsw_ef_search and pq_bytes must be positive")


@dataclass
class EvalConfig:
    """Retrieval evaluation, computed the way MTEB/BEIR do (pytrec_eval)."""

    split: str = "test"
    # Truncate-and-renormalize dims to evaluate (empty = the full dim only).
    dims: list[int] = field(default_factory=lambda: [384, 256, 128, 64])
    batch_size: int = 64
    max_seq_length: int = 0  # 0 = the model's own
    top_k: int = 1000
    compare_base: bool = True
    compare_bm25: bool = True
    # BEIR/MTEB drop a retrieved document whose id equals the query id.
    ignore_identical_ids: bool = True
    max_queries: int = 0  # 0 = all; a cap for quick looks, never for reported numbers
    # More models to put in the table, name -> hub name or folder (e.g. {bge: BAAI/bge-small-en-v1.5}).
    extra_models: dict[str, str] = field(default_factory=dict)
    # Paired significance of per-query nDCG@10 (finetuned vs base, finetuned vs bm25): bootstrap CI + randomization
    # test with this many resamples; 0 = off.
    significance_resamples: int = 10000
    # BM25 + dense fusion rows (``<model>+bm25_rrf``, ``<model>+bm25_weighted``); needs compare_bm25.
    hybrid: list[str] = field(default_factory=list)
    rrf_k: int = 60
    hybrid_weight: float = 0.5  # dense share in weighted fusion of min-max normalized scores
    hybrid_depth: int = 100  # top documents taken from each run before fusing
    # Cross-encoder rerank rows (``<retriever>>rerank``): CrossEncoder folder or hub name; empty = off.
    reranker: str = ""
    rerank_top_k: int = 100
    rerank_batch_size: int = 32
    rerank_on: list[str] = field(default_factory=list)  # rows to rerank (e.g. [finetuned, bm25]); empty = finetuned
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        unknown = [name for name in self.hybrid if name not in HYBRID_METHODS]
        if unknown:
            raise ValueError(f"eval.hybrid: unknown {unknown}; expected some of {list(HYBRID_METHODS)}")
        if self.hybrid and not self.compare_bm25:
            raise ValueError("eval.hybrid fuses with BM25: set eval.compare_bm25=true or eval.hybrid=[]")
        if not 0.0 <= self.hybrid_weight <= 1.0:
            raise ValueError(f"eval.hybrid_weight must be in [0, 1], got {self.hybrid_weight}")
        for key in ("rrf_k", "hybrid_depth", "rerank_top_k", "rerank_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.significance_resamples < 0:
            raise ValueError("eval.significance_resamples must be >= 0 (0 = off)")
