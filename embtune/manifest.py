"""Stage manifests: what a stage read (by content hash), with which config, and what it wrote.

Each stage writes ``<run_dir>/<stage>/manifest.json``. A stage whose fingerprint (its config section plus the
hashes of its inputs) equals the one in its manifest is skipped on rerun. Upstream outputs are identified by the
hash recorded in their own manifest, so a changed upstream stage changes every downstream fingerprint.

Crash safety: a manifest vouches only for outputs a stage finished. A stage removes its manifest before it starts
rewriting its outputs (:meth:`Stage.begin`), and writes it, atomically, only after its last output file
(:meth:`Stage.finish`), with each output file's size and modification time; the up-to-date check compares those,
so a half-written, truncated or since-modified output is redone, never accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's relative file names and contents (sorted walk)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        base = path
    else:
        raise FileNotFoundError(f"{path}: input not found")
    for file in files:
        digest.update(str(file.relative_to(base)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def file_listing(path: str | Path, skip: set[Path] = frozenset()) -> dict[str, list[int]]:
    """``{relative name: [size, mtime_ns]}`` of a file (name ``.``) or of every file under a folder.

    Cheap to take and recheck however big the files are (no reading); any write to a file changes its mtime.
    """
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return {".": [stat.st_size, stat.st_mtime_ns]}
    listing = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p not in skip):
        stat = file.stat()
        listing[str(file.relative_to(path))] = [stat.st_size, stat.st_mtime_ns]
    return listing


def listing_changes(recorded: dict[str, list[int]], path: str | Path, skip: set[Path] = frozenset()) -> list[str]:
    """How the files under ``path`` differ from a recorded :func:`file_listing` (files added since are allowed)."""
    current = file_listing(path, skip) if Path(path).exists() else {}
    changes = []
    for name, (size, mtime_ns) in recorded.items():
        if name not in current:
            changes.append(f"{name}: missing")
        elif current[name][0] != size:
            changes.append(f"{name}: {current[name][0]} bytes, {size} when the stage finished")
        elif current[name][1] != mtime_ns:
            changes.append(f"{name}: rewritten after the stage finished")
    return changes


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (for manifests and benchmark files)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("embtune", "torch", "sentence-transformers", "transformers", "accelerate", "datasets",
                 "faiss-cpu", "rank-bm25", "bm25s", "pytrec-eval-terrier", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    """Platform, CPU (model name and vector instruction flags, on Linux), core count and memory."""
    import re

    import psutil

    cpu_model, vector_flags = platform.processor() or platform.machine(), []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        cpu_model = found.group(1).strip() if found else cpu_model
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        names = flags.group(1).split() if flags else []
        vector_flags = sorted(f for f in names if re.match(r"(sse4|avx|fma|amx)", f))
    except OSError:  # not Linux
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "vector_flags": vector_flags,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


@dataclass
class Stage:
    """One stage's bookkeeping in a run directory.

    Usage::

        stage = Stage("train", run_dir, config=cfg.train, inputs={"table": table_dir})
        if stage.up_to_date():
            return stage.outputs()
        ...  # do the work, write files under stage.dir
        stage.finish(outputs={"model": model_dir})
    """

    name: str
    run_dir: str | Path
    config: Any
    inputs: dict[str, str | Path] = field(default_factory=dict)
    _started: float = field(default_factory=time.time, init=False)

    @property
    def dir(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def _own_files(self) -> set[Path]:
        """The manifest and its temporary file: never part of an output listing (an output may be the stage dir)."""
        return {self.manifest_path.resolve(), self.manifest_path.with_suffix(".tmp").resolve()}

    def input_hashes(self) -> dict[str, str]:
        hashes = {}
        for key, path in self.inputs.items():
            path = Path(path)
            resolved = str(path.resolve())
            upstream = _owning_manifest(path)
            # An upstream stage's output is identified by the hash its manifest recorded (no rehashing of models)
            # while its files are the ones that manifest listed; an output the stage passed through is rehashed.
            if upstream is not None and resolved in upstream.get("output_hashes_by_path", {}) and (
                    "output_files_by_path" not in upstream or (
                        resolved in upstream["output_files_by_path"]
                        and not listing_changes(upstream["output_files_by_path"][resolved], path))):
                hashes[key] = upstream["output_hashes_by_path"][resolved]
            else:
                hashes[key] = hash_path(path)
        return hashes

    def fingerprint(self) -> str:
        from embtune.config import fingerprint

        payload = {"config": fingerprint(self.config), "inputs": self.input_hashes()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def read(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; the stage will rerun", self.manifest_path)
            return None

    def up_to_date(self) -> bool:
        """True when a previous run of this stage had the same config and inputs, and finished writing the outputs
        that are there now: every file its manifest listed, with the same size and modification time."""
        old = self.read()
        if not old or old.get("fingerprint") != self.fingerprint():
            return False
        missing = [p for p in old.get("outputs", {}).values() if not Path(p).exists()]
        if missing:
            logger.info("stage %s: outputs missing (%s); rerunning", self.name, ", ".join(missing))
            return False
        for key, path in old.get("outputs", {}).items():
            if "output_files" in old:
                if key not in old["output_files"]:  # passed through, not written here: existing is enough
                    continue
                changes = listing_changes(old["output_files"][key], path, self._own_files)
            else:  # a manifest written before listings: its content hashes are the check (slow, once)
                changes = [] if hash_path(path) == old.get("output_hashes", {}).get(key) else ["content hash differs"]
            if changes:
                more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
                logger.warning("stage %s: output %s is not what the stage finished writing (%s%s); rerunning",
                               self.name, path, "; ".join(changes[:3]), more)
                return False
        logger.info("stage %s is up to date (manifest %s); skipping", self.name, self.manifest_path)
        return True

    def _passes_through(self, output: Path) -> bool:
        """An output that is, or holds, one of the stage's inputs was not written by it (data_prep hands a BEIR
        folder on as ``eval_dataset``): its files change with the input, which the fingerprint already follows."""
        return any(Path(p).resolve() == output or output in Path(p).resolve().parents for p in self.inputs.values())

    def begin(self) -> None:
        """Call before the stage writes its first output: no manifest vouches for outputs while they change, so a
        stage killed from here on is rerun, however much it wrote."""
        self.manifest_path.unlink(missing_ok=True)
        self._started = time.time()

    def outputs(self) -> dict[str, str]:
        old = self.read() or {}
        return old.get("outputs", {})

    def finish(self, outputs: dict[str, str | Path], extra: dict[str, Any] | None = None) -> dict[str, str]:
        from embtune.config import to_dict

        self.dir.mkdir(parents=True, exist_ok=True)
        outputs = {k: str(Path(v).resolve()) for k, v in outputs.items()}
        output_hashes = {k: hash_path(v) for k, v in outputs.items()}
        output_files = {k: file_listing(v, self._own_files) for k, v in outputs.items()
                        if not self._passes_through(Path(v))}
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint(),
            "config": to_dict(self.config),
            "inputs": {k: str(Path(v).resolve()) for k, v in self.inputs.items()},
            "input_hashes": self.input_hashes(),
            "outputs": outputs,
            "output_hashes": output_hashes,
            "output_hashes_by_path": {outputs[k]: h for k, h in output_hashes.items()},
            "output_files": output_files,  # size and mtime of every output file: what up_to_date() checks
            "output_files_by_path": {outputs[k]: listing for k, listing in output_files.items()},
            "wall_seconds": round(time.time() - self._started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            **(extra or {}),
        }
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.manifest_path)  # atomic: a crash never leaves half a manifest
        return outputs


def _owning_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the stage folder that contains ``path``, if any (one or two levels up)."""
    for parent in [path.parent, path.parent.parent, path]:
        candidate = parent / MANIFEST
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return None
    return None
