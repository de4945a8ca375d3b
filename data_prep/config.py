"""Config sections owned by the data_prep stage: ``data``, ``chunking`` and ``mining``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    """Where the corpus, queries and qrels come from.

    ``format``:
      - ``beir``: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``);
      - ``jsonl``: a JSONL file of pairs (``pairs_file``, with ``query``/``positive`` fields);
      - ``hf_disk``: a ``datasets`` table saved with ``save_to_disk`` (``pairs_file``), same columns;
      - ``pydoc``: the embedded demo corpus, built offline from the Python standard library's docstrings.
    """

    format: Literal["beir", "jsonl", "hf_disk", "pydoc"] = "beir"
    path: str = ""
    pairs_file: str = ""
    train_split: str = "train"
    # Where training queries come from: ``labelled`` (the dataset's train split) or ``synthetic`` (written by the
    # LLM of the ``llm`` section for the corpus' passages; the dataset's labelled queries are then used only for
    # the dev split and eval). See docs/synthesis.md.
    queries: Literal["labelled", "synthetic"] = "labelled"
    # Queries carved out of the train split (seeded) to choose settings on; never the test split.
    dev_fraction: float = 0.0
    on_error: Literal["raise", "skip"] = "raise"
    # pydoc demo corpus size limits
    max_documents: int = 0
    seed: int = 42

    def validate(self) -> None:
        if self.format == "beir" and not self.path:
            raise ValueError("data.path must name a BEIR folder when data.format is 'beir'")
        if self.format in ("jsonl", "hf_disk") and not self.pairs_file:
            raise ValueError(f"data.pairs_file must be set when data.format is '{self.format}'")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError("data.dev_fraction must be in [0, 1)")


@dataclass
class ChunkingConfig:
    """Split long documents into token windows before mining/training (0 = off)."""

    max_tokens: int = 0
    overlap: int = 32
    tokenizer: str = ""  # defaults to train.base_model's tokenizer

    def validate(self) -> None:
        if self.max_tokens and self.overlap >= self.max_tokens:
            raise ValueError("chunking.overlap must be smaller than chunking.max_tokens")


@dataclass
class MiningConfig:
    """Hard-negative mining (rank-bm25 is the reference implementation)."""

    method: Literal["bm25", "random", "none"] = "bm25"
    num_negatives: int = 1
    # 0-based rank window [rank_start, rank_end) over the retriever's ranking that negatives are drawn from.
    rank_start: int = 0
    rank_end: int = 100
    sampling: Literal["top", "random"] = "top"
    # Title + text is what is indexed for BM25 and what the model sees as a document.
    include_title: bool = True
    seed: int = 42

    def validate(self) -> None:
        if self.num_negatives < 0:
            raise ValueError("mining.num_negatives must be >= 0")
        if not 0 <= self.rank_start < self.rank_end:
            raise ValueError("mining.rank_start must be >= 0 and < mining.rank_end")
