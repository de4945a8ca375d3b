"""Config section owned by the eval stage: ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RAGConfig:
    """Answer-level check (``python -m eval.rag``): retrieve, (rerank,) answer with the ``llm`` section's model citing
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
    # More models to put in the table, name -> hub name or folder (e.g. {bge: BAAI/bge-small-en-v1.5}), or an
    # OpenAI-compatible embeddings endpoint: "openai:text-embedding-3-small" (OPENAI_API_KEY) or
    # "openai:<model>@http://127.0.0.1:8000/v1" (eval/endpoint.py; retries follow the llm section's settings).
    extra_models: dict[str, str] = field(default_factory=dict)
    endpoint_batch_size: int = 256  # texts per embeddings request to an endpoint model
    endpoint_api_key_env: str = "OPENAI_API_KEY"  # environment variable with the endpoint's key
    rag: RAGConfig = field(default_factory=RAGConfig)  # python -m eval.rag (eval/rag.py)

    def validate(self) -> None:
        if self.endpoint_batch_size < 1:
            raise ValueError(f"eval.endpoint_batch_size must be >= 1, got {self.endpoint_batch_size}")
        for name, spec in self.extra_models.items():
            if spec.startswith("openai:") and not spec[len("openai:"):].partition("@")[0]:
                raise ValueError(f"eval.extra_models.{name}: {spec!r} names no model (openai:<model>[@<base_url>])")
