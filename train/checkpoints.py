"""Checkpoints that a kill cannot corrupt silently: a seal written last, and a check before resuming.

transformers' trainer writes ``checkpoint-N/`` file by file in place (model, optimizer, scheduler, RNG state,
``trainer_state.json``) and has no marker of completion upstream. A SIGKILL, OOM kill or full disk in the middle
leaves a folder that looks like a checkpoint. So after every save a seal, ``embtune_complete.json``, lists each
file with its size (written atomically, after all processes have written their files); a checkpoint counts only
if its seal is there, every file still has its sealed size, its trainer state parses and names its step, and its
weights' header reads. Resuming picks the newest checkpoint that passes and says why it skipped the others.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SEAL = "embtune_complete.json"
# What exact resume needs besides the weights: optimizer moments, LR schedule position, RNG streams.
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def seal(checkpoint: Path) -> None:
    """Record every file's size in ``checkpoint/SEAL``; the rename makes the seal appear whole or not at all."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != SEAL}
    tmp = checkpoint / (SEAL + ".tmp")
    with open(tmp, "w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / SEAL)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete."""
    try:
        sealed = json.loads((checkpoint / SEAL).read_text())["files"]
    except FileNotFoundError:
        return f"no {SEAL} (the save did not finish)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{SEAL} is unreadable"
    for name in REQUIRED:
        if name not in sealed:
            return f"{name} is missing"
    if not any(name.endswith((".safetensors", ".bin")) for name in sealed):
        return "no model weights"
    for name, size in sealed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except json.JSONDecodeError as err:
        return f"trainer_state.json is not valid JSON ({err})"
    if state.get("global_step") != checkpoint_step(checkpoint):
        return f"trainer_state.json says step {state.get('global_step')}, the folder step {checkpoint_step(checkpoint)}"
    from safetensors import safe_open

    for name in sealed:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(checkpoint / name), framework="pt") as weights:
                    weights.keys()
            except Exception as err:  # safetensors raises its own error types for a bad header
                return f"{name} does not read ({err})"
    return None


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``folder``, else None; incomplete ones are named in a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    checkpoints = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                         key=checkpoint_step)
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("checkpoint %s is not usable: %s; falling back to the previous one", checkpoint, problem)
    return None


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once every process has written its part (the trainer calls ``on_save`` on all)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # per-process RNG files are written by each rank
        if state.is_world_process_zero:
            seal(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control
