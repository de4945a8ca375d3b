"""Config section owned by the serve stage: ``export``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    """Bundle the fine-tuned model with its metrics and a model card."""

    out_dir: str = ""  # default: <run_dir>/export
    model_name: str = "embtune-model"
