"""The recipe schema: one section per stage, each defined by the stage that owns it."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_prep.config import ChunkingConfig, DataConfig, LabelFreeConfig, MiningConfig
from embtune.llm.config import LLMConfig
from embtune.retrieval.bm25 import BM25Config
from eval.config import EvalConfig
from serve.config import ExportConfig
from serve.serve_config import ServeConfig
from train.config import CrossEncoderConfig, TrainConfig


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    labelfree: LabelFreeConfig = field(default_factory=LabelFreeConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    bm25: BM25Config = field(default_factory=BM25Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    cross_encoder: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Set by load_config: the recipe file this came from (not a YAML key).
    source: str | None = field(default=None, init=False, compare=False)
