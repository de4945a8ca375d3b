"""Experiment tracking through the trainer's ``report_to``: wandb online with a key, offline without one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def configure_reporting(tcfg, stage_dir: Path) -> list[str] | str:
    """Return the trainer's ``report_to`` value, setting wandb's environment so it never prompts or blocks."""
    targets = [t.strip() for t in tcfg.report_to.split(",") if t.strip()]
    if not targets or targets == ["none"]:
        return "none"
    if "wandb" in targets:
        os.environ.setdefault("WANDB_PROJECT", tcfg.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(stage_dir))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb_has_key():
            os.environ["WANDB_MODE"] = "offline"
            logger.warning("wandb: no API key found, logging offline to %s/wandb (upload later with `wandb sync`)",
                           os.environ["WANDB_DIR"])
    return targets
