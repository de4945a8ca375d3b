"""Config section owned by the eval stage: ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def validate(self) -> None:
        if self.endpoint_batch_size < 1:
            raise ValueError(f"eval.endpoint_batch_size must be >= 1, got {self.endpoint_batch_size}")
        for name, spec in self.extra_models.items():
            if spec.startswith("openai:") and not spec[len("openai:"):].partition("@")[0]:
                raise ValueError(f"eval.extra_models.{name}: {spec!r} names no model (openai:<model>[@<base_url>])")
