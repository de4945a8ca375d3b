"""Config section owned by the eval stage: ``eval`` (with its ``eval.sweep`` subsection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embtune.retrieval.encoder import Backend

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
class RAGConfig:
    """Answer-level check (``python -m embtune.eval.rag``): retrieve, (rerank,) answer with the ``llm`` section's
    model citing
    passages [1]..[k], judge faithfulness with the same model; base vs fine-tuned on the same seeded sample."""

    split: str = ""  # "" = eval.split
    sample_size: int = 40  # queries drawn (seed = the recipe's seed) from the split's judged queries; 0 = all
    k: int = 3  # passages put in the prompt
    rerank: str = ""  # CrossEncoder folder or hub name: rescore the first rerank_candidates hits; "" = no rerank
    rerank_candidates: int = 20
    max_passage_chars: int = 600  # each passage is cut to this many characters in the prompt
    temperature: float = 0.0  # for answers and judgements (the llm section's sampling is for synthesis)
    answer_max_tokens: int = 128
    judge_max_tokens: int = 8  # the judge replies with one digit
    cache_file: str = ""  # LLM answer cache (JSONL); "" = <run_dir>/eval/rag_llm_cache.jsonl
    resamples: int = 10000  # for the paired randomization test

    def validate(self) -> None:
        if self.sample_size < 0:
            raise ValueError(f"eval.rag.sample_size must be >= 0 (0 = all), got {self.sample_size}")
        if self.k < 1:
            raise ValueError(f"eval.rag.k must be >= 1, got {self.k}")
        if self.rerank and self.rerank_candidates < self.k:
            raise ValueError(f"eval.rag.rerank_candidates ({self.rerank_candidates}) must be >= eval.rag.k ({self.k})")
        if self.max_passage_chars < 1:
            raise ValueError(f"eval.rag.max_passage_chars must be >= 1, got {self.max_passage_chars}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"eval.rag.temperature must be in [0, 2], got {self.temperature}")
        if self.answer_max_tokens < 1 or self.judge_max_tokens < 1:
            raise ValueError("eval.rag.answer_max_tokens and eval.rag.judge_max_tokens must be >= 1")
        if self.resamples < 100:
            raise ValueError(f"eval.rag.resamples must be >= 100, got {self.resamples}")


@dataclass
class ChooseConfig:
    """Choosing a base model (``python -m embtune.eval.choose``): candidates vs BM25 and hybrids on dev queries.

    ``candidates`` forms: an ``embtune.models`` alias (``minilm``), a local SentenceTransformer folder, a hub name
    (when the hub or its local cache has it), ``run:<run_dir>`` (the model an earlier embtune run trained; globs
    such as ``run:runs/*`` take every run that has one) and ``openai:<model>[@<base_url>]`` (an embeddings
    endpoint, ``eval/endpoint.py``).
    """

    candidates: list[str] = field(default_factory=lambda: ["minilm"])
    # Which queries rank the candidates: ``dev`` (data.dev_fraction of the train split, as data_prep carves it),
    # ``synthetic`` (data_prep's LLM queries, data.queries: synthetic) or ``auto`` (dev when there is one).
    queries: Literal["auto", "dev", "synthetic"] = "auto"
    bm25: bool = True  # a BM25 row (the top-level ``bm25`` section)
    hybrid: list[str] = field(default_factory=lambda: ["rrf"])  # fusion of each dense candidate with BM25
    max_queries: int = 0  # 0 = all; a cap for quick looks
    timing_documents: int = 256  # documents encoded uncached to time each candidate (seconds per 1k documents)
    fit_documents: int = 200  # seeded corpus sample tokenized by each candidate for the fit check
    # Warn when more than this share of a candidate's tokens are its unknown token (a script it cannot read).
    max_unknown_share: float = 0.05
    # Warn when a dense candidate scores below this fraction of BM25's nDCG@10 (it does not fit this corpus).
    min_share_of_bm25: float = 0.5
    resamples: int = 10000  # paired randomization test of each row against the best
    out: str = ""  # "" = <run_dir>/eval/choose.json (and choose.txt beside it)

    def validate(self) -> None:
        if not self.candidates and not self.bm25:
            raise ValueError("eval.choose needs candidates or bm25: true")
        unknown = [name for name in self.hybrid if name not in HYBRID_METHODS]
        if unknown:
            raise ValueError(f"eval.choose.hybrid: unknown {unknown}; expected some of {list(HYBRID_METHODS)}")
        if self.hybrid and not self.bm25:
            raise ValueError("eval.choose.hybrid fuses with BM25: set eval.choose.bm25=true or eval.choose.hybrid=[]")
        for spec in self.candidates:
            if spec.startswith("openai:") and not spec[len("openai:"):].partition("@")[0]:
                raise ValueError(f"eval.choose.candidates: {spec!r} names no model (openai:<model>[@<base_url>])")
            if spec.startswith("run:") and not spec[len("run:"):]:
                raise ValueError("eval.choose.candidates: 'run:' names no run directory (run:<run_dir>)")
        if self.timing_documents < 1 or self.fit_documents < 1 or self.resamples < 100:
            raise ValueError("eval.choose.timing_documents and fit_documents must be >= 1, resamples >= 100")
        if not 0.0 <= self.max_unknown_share <= 1.0 or not 0.0 <= self.min_share_of_bm25 <= 1.0:
            raise ValueError("eval.choose.max_unknown_share and min_share_of_bm25 must be in [0, 1]")


@dataclass
class EvalConfig:
    """Retrieval evaluation, computed the way MTEB/BEIR do (pytrec_eval)."""

    split: str = "test"
    # Truncate-and-renormalize dims to evaluate (empty = the full dim only).
    dims: list[int] = field(default_factory=lambda: [384, 256, 128, 64])
    batch_size: int = 64
    max_seq_length: int = 0  # 0 = the model's own
    # Encoder backend (embtune/retrieval/encoder.py), the one key for it: eval measures with it, export embeds the
    # bundle's index with it (and writes the ONNX file or OpenVINO IR it needs), and the server uses the backend the
    # bundle records. torch (sentence-transformers), onnx (fp32), onnx-int8 (int8 dynamic quantization), openvino
    # (fp32 IR) or openvino-int8 (NNCF static int8, calibrated on the corpus); the int8 ones are faster on CPU and
    # their embeddings differ slightly: scripts/bench_encode_speed.py.
    backend: Backend = "torch"
    threads: int = 0  # onnxruntime / OpenVINO threads for the onnx and openvino backends; 0 = all cores
    top_k: int = 1000
    compare_base: bool = True
    compare_bm25: bool = True
    # BEIR/MTEB drop a retrieved document whose id equals the query id.
    ignore_identical_ids: bool = True
    max_queries: int = 0  # 0 = all; a cap for quick looks, never for reported numbers
    # More models to put in the table, name -> hub name or folder (e.g. {bge: BAAI/bge-small-en-v1.5}), or an
    # OpenAI-compatible embeddings endpoint: "openai:text-embedding-3-small" (OPENAI_API_KEY) or
    # "openai:<model>@http://127.0.0.1:8000/v1" (eval/endpoint.py; retries follow the llm section's settings).
    extra_models: dict[str, str] = field(default_factory=dict)
    endpoint_batch_size: int = 256  # texts per embeddings request to an endpoint model
    endpoint_api_key_env: str = "OPENAI_API_KEY"  # environment variable with the endpoint's key
    rag: RAGConfig = field(default_factory=RAGConfig)  # python -m embtune.eval.rag (eval/rag.py)

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
    # Write each row's top N documents per query to <run_dir>/eval/runs/<row>.trec (TREC run format: qid Q0 doc
    # rank score row), e.g. to check that a server returns what eval measured; 0 = off.
    save_runs: int = 0
    sweep: SweepConfig = field(default_factory=SweepConfig)
    choose: ChooseConfig = field(default_factory=ChooseConfig)  # python -m embtune.eval.choose (eval/choose.py)


    def validate(self) -> None:
        if self.threads < 0:
            raise ValueError(f"eval.threads must be >= 0 (0 = all cores), got {self.threads}")
        if self.endpoint_batch_size < 1:
            raise ValueError(f"eval.endpoint_batch_size must be >= 1, got {self.endpoint_batch_size}")
        for name, spec in self.extra_models.items():
            if spec.startswith("openai:") and not spec[len("openai:"):].partition("@")[0]:
                raise ValueError(f"eval.extra_models.{name}: {spec!r} names no model (openai:<model>[@<base_url>])")
        unknown = [name for name in self.hybrid if name not in HYBRID_METHODS]
        if unknown:
            raise ValueError(f"eval.hybrid: unknown {unknown}; expected some of {list(HYBRID_METHODS)}")
        if self.hybrid and not self.compare_bm25:
            raise ValueError("eval.hybrid fuses with BM25: set eval.compare_bm25=true or eval.hybrid=[]")
        if not 0.0 <= self.hybrid_weight <= 1.0:
            raise ValueError(f"eval.hybrid_weight must be in [0, 1], got {self.hybrid_weight}")
        if self.save_runs < 0:
            raise ValueError(f"eval.save_runs must be >= 0 (0 = off), got {self.save_runs}")
        for key in ("rrf_k", "hybrid_depth", "rerank_top_k", "rerank_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.significance_resamples < 0:
            raise ValueError("eval.significance_resamples must be >= 0 (0 = off)")
