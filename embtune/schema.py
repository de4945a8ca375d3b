"""The recipe schema: every section of a recipe as one typed ``Config``, and ``load_config``.

The sections are defined in the core (``embtune/sections/``), not in the stages, because stages read each other's
keys (data_prep encodes with ``train.base_model`` at ``eval.max_seq_length``, export reads eval's settings) and a
stage may not import another stage. The generic YAML-to-dataclass parsing is ``embtune.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from embtune.compute import ComputeConfig
from embtune.config import load
from embtune.llm.config import LLMConfig
from embtune.retrieval.bm25 import BM25Config
from embtune.sections.data_prep import ChunkingConfig, DataConfig, LabelFreeConfig, MiningConfig
from embtune.sections.eval import EvalConfig
from embtune.sections.export import ExportConfig
from embtune.sections.serve import ServeConfig
from embtune.sections.train import CrossEncoderConfig, TrainConfig
from embtune.tracking import TrackingConfig


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # Set by load_config: the recipe file this came from (not a YAML key).
    source: str | None = field(default=None, init=False, compare=False)


SECTIONS = tuple(f.name for f in fields(Config) if f.init and f.name not in ("run_dir", "seed"))


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                sections: list[str] | None = None) -> Config:
    """Load a recipe file (or only defaults when ``path`` is None) and apply dotted ``key=value`` overrides.

    ``sections``: validate only these top-level sections (``serve up`` needs no ``data.path``); every key is
    type-checked regardless. Raises :class:`embtune.config.ConfigError` naming the key, and the file and line or
    the override that set it.
    """
    cfg = load(Config, path, overrides, sections)
    cfg.source = str(path) if path else None
    return cfg
