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


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and its flags, from ``lscpu`` (what a reader would run), else ``/proc/cpuinfo``."""
    import re
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True,
                              env={**os.environ, "LC_ALL": "C"}).stdout
        model, flags = r"^Model name:\s*(.+)$", r"^Flags:\s*(.+)$"
    except (OSError, subprocess.SubprocessError):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:  # neither: not Linux
            return platform.processor() or platform.machine(), []
        model, flags = r"^model name\s*:\s*(.+)$", r"^flags\s*:\s*(.+)$"
    found_model, found_flags = re.search(model, text, re.M), re.search(flags, text, re.M)
    return (found_model.group(1).strip() if found_model else platform.processor() or platform.machine(),
            found_flags.group(1).split() if found_flags else [])


def machine() -> dict[str, Any]:
    """Platform, CPU (model name and vector instruction flags, from lscpu on Linux), core count and memory."""
    import re

    import psutil

    cpu_model, flags = _cpu_model_and_flags()
    vector_flags = sorted(f for f in flags if re.match(r"(sse4|avx|fma|amx)", f))
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "vector_flags": vector_flags,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


# A benchmark's own outputs: rewriting them does not change the code that produced a result.
RUN_OUTPUTS = ("benchmarks/results/",)


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """``commit`` (``git rev-parse HEAD``), ``tree_clean`` and the ``changed_files`` that make it unclean.

    The tree is clean when ``git status --porcelain`` lists nothing outside :data:`RUN_OUTPUTS` (ignored files,
    such as ``runs/``, never appear). ``root`` defaults to the checkout this package is imported from; outside a
    git checkout every value is None.
    """
    import subprocess

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "tree_clean": None, "changed_files": None}
    changed = [line[3:] for line in status if not line[3:].strip('"').startswith(RUN_OUTPUTS)]
    return {"commit": commit, "tree_clean": not changed, "changed_files": changed}


def command_line(argv: list[str] | None = None, root: str | Path | None = None) -> str:
    """The command that ran this process, as ``python <script relative to the checkout> <args>``."""
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    script = Path(argv[0]).resolve() if argv and argv[0] not in ("", "-c", "-m") else None
    if script is not None and script.is_relative_to(root):
        argv[0] = str(script.relative_to(root))
    return "python " + shlex.join(argv)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Provenance:
    """What every benchmark result file records about the run that made it: the commit and whether the tree was
    clean (taken when the run starts: the code that ran), the exact command, the machine (CPU model and vector flags),
    the load average at start and end, and the library versions.

    Usage::

        provenance = Provenance.start()            # first thing in main()
        ...                                         # the benchmark
        result = {..., **provenance.record()}      # just before writing the result file
    """

    command: str
    git: dict[str, Any]
    load_average_start: list[float] | None
    started_at: str

    @classmethod
    def start(cls, command: str | None = None) -> Provenance:
        """Take the state a run starts from; ``command`` defaults to this process's command line."""
        return cls(command=command if command is not None else command_line(), git=git_state(),
                   load_average_start=load_average(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def record(self, packages: tuple[str, ...] = ()) -> dict[str, Any]:
        """The provenance keys of a result file; ``packages`` adds versions beyond :func:`versions`'."""
        from importlib import metadata

        extra = {}
        for name in packages:
            try:
                extra[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                extra[name] = None
        return {
            "commit": self.git["commit"],
            "tree_clean": self.git["tree_clean"],
            **({"changed_files": self.git["changed_files"]} if self.git["changed_files"] else {}),
            "command": self.command,
            "machine": machine(),
            "load_average": {"start": self.load_average_start, "end": load_average()},  # 1, 5, 15 minutes
            "started_at": self.started_at,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {**versions(), **extra},
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
