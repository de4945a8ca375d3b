"""Time the two test tiers from a clean checkout: ``make test-fast`` and ``make test``.

    python scripts/bench_test_times.py                 # HEAD -> benchmarks/results/test_times.json
    python scripts/bench_test_times.py --fast-only     # only the fast tier (full_s is then null)

It clones the commit (``git clone`` of this repository, then ``git checkout``) into a temporary folder, installs it
there into its own ``.venv`` with ``make install`` (timed apart: ``install_s``), then runs ``make test-fast`` and
``make test`` in that checkout, one after the other, and records each tier's wall seconds, exit code and pytest's
summary line. Nothing of this checkout is used but its git history, so uncommitted edits are not measured (the
file says whether the tree was clean). Run it on a quiet machine: the targets (issue 31) are ``fast_s`` <= 180 and
``full_s`` <= 900 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.manifest import Provenance  # noqa: E402


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in ``cwd``, its output to ``log``; wall seconds, exit code and pytest's last summary line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("VIRTUAL_ENV", None)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)",
                                                      summary[-1] if summary else "")}
    return {"seconds": round(seconds, 1), "returncode": done.returncode, "summary": summary[-1] if summary else "",
            "counts": counts, "command": shlex.join(cmd)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to clone and time (default HEAD)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "test_times.json"))
    parser.add_argument("--python", default=sys.executable, help="the interpreter `make install` builds .venv with")
    parser.add_argument("--fast-only", action="store_true", help="time make test-fast only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkout (its logs are there)")
    args = parser.parse_args(argv)
    provenance = Provenance.start(shlex.join(["python", "scripts/bench_test_times.py",
                                              *(argv if argv is not None else sys.argv[1:])]))
    commit = git("rev-parse", args.ref)
    clean = git("status", "--porcelain") == ""
    scratch = Path(tempfile.mkdtemp(prefix="embtune-test-times-"))
    checkout = scratch / "embtune"
    try:
        git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(checkout), cwd=scratch)
        git("checkout", "--quiet", commit, cwd=checkout)
        load_before = os.getloadavg()
        install = timed(["make", "install", f"PYTHON={args.python}"], checkout, scratch / "install.log")
        if install["returncode"]:
            print((scratch / "install.log").read_text()[-3000:], file=sys.stderr)
            raise SystemExit(f"make install failed in {checkout}")
        fast = timed(["make", "test-fast"], checkout, scratch / "test-fast.log")
        full = None if args.fast_only else timed(["make", "test"], checkout, scratch / "test.log")
        load_after = os.getloadavg()
        venv_python = checkout / ".venv" / "bin" / "python"
        versions = json.loads(subprocess.run(
            [str(venv_python), "-c", "import json; from embtune.manifest import versions; "
             "from importlib import metadata; v = versions(); v['pytest'] = metadata.version('pytest'); "
             "v['pytest-timeout'] = metadata.version('pytest-timeout'); print(json.dumps(v))"],
            cwd=checkout, capture_output=True, text=True, check=True).stdout)
        tiers = [fast] + ([full] if full else [])
        result = {
            **provenance.record(),  # machine (CPU model, vector flags), load average, command; versions below
            "fast_s": fast["seconds"],
            "full_s": full["seconds"] if full else None,
            "passed": all(t["returncode"] == 0 for t in tiers),
            "commit": commit,
            "tree_clean": clean,
            "targets": {"fast_s": 180, "full_s": 900},
            "install_s": install["seconds"],
            "fast": fast,
            "full": full,
            "load_average_around_tests": {"before": [round(x, 2) for x in load_before],
                                          "after": [round(x, 2) for x in load_after]},
            "versions": versions,  # the clone's own venv
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"fast {result['fast_s']} s, full {result['full_s']} s, passed {result['passed']} -> {out}")
        return 0 if result["passed"] else 1
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
