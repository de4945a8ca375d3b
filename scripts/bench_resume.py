"""Kill-and-resume: `python -m embtune.train` is SIGKILLed mid-run, the same command is run again, and the final weights
are compared with an uninterrupted run's.

    nice -n 15 python scripts/bench_resume.py

MiniLM on SciFact train triplets (query, relevant abstract, seeded random other abstract), seq ``--seq``, batch
``--batch-size``, ``--steps`` steps, a checkpoint every ``--save-steps``; the model's dropout stays on and the
NO_DUPLICATES sampler is used (both must be replayed exactly). The kill comes once the trainer's progress bar
shows step ``--kill-after`` finished, plus a random delay in [0, 1) s: in the middle of a later step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_train_throughput import beir_table as scifact_table  # noqa: E402
from benchlib import write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.manifest import Provenance, Stage  # noqa: E402


def train_cmd(run_dir: Path, args) -> list[str]:
    return [sys.executable, "-m", "embtune.train", f"run_dir={run_dir}", f"data.path={args.data}", "train.loss=mnrl",
            "train.matryoshka_dims=[384,128]", f"train.max_seq_length={args.seq}",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}", f"train.save_steps={args.save_steps}", "train.save_total_limit=2",
            "tracking.report_to=none", "train.use_cpu=true", "train.learning_rate=5e-5", "train.logging_steps=1"]


def prepare(run_dir: Path, table_dir: Path) -> None:
    Stage("data_prep", run_dir, config={}, inputs={}).finish({"train_table": table_dir})


def weights(run_dir: Path):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "train" / "model" / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent
                                              / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/resume.json")
    args = parser.parse_args()
    provenance = Provenance.start()
    scratch = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    table_dir = scratch / "table"
    scifact_table(Path(args.data), 42).save_to_disk(str(table_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    reference, killed = scratch / "reference", scratch / "killed"
    for run_dir in (reference, killed):
        prepare(run_dir, table_dir)
    start = time.time()
    subprocess.run(train_cmd(reference, args), env=env, check=True, capture_output=True)
    uninterrupted_s = time.time() - start

    proc = subprocess.Popen(train_cmd(killed, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, bufsize=1)
    done_steps = [0]

    def follow() -> None:  # the trainer's tqdm bar: "| 5/8 [" means 5 steps finished
        for chunk in iter(lambda: proc.stderr.read(256), ""):
            for match in re.finditer(rf"\|\s*(\d+)/{args.steps} \[", chunk):
                done_steps[0] = max(done_steps[0], int(match.group(1)))

    threading.Thread(target=follow, daemon=True).start()
    while proc.poll() is None and done_steps[0] < args.kill_after:
        time.sleep(0.02)
    delay = random.Random(args.seed).random()
    time.sleep(delay)
    if proc.poll() is not None:
        raise SystemExit("training ended before the kill; raise --steps")
    steps_finished_at_kill = done_steps[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in killed.glob("train/checkpoints-*/checkpoint-*"))
    start = time.time()
    rerun = subprocess.run(train_cmd(killed, args), env=env, capture_output=True, text=True)
    rerun_s = time.time() - start
    if rerun.returncode != 0:
        raise SystemExit(rerun.stderr[-3000:])
    resumed_from = re.search(r"resuming from (\S+)", rerun.stderr)
    a, b = weights(reference), weights(killed)
    max_abs_diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)

    payload = {
        "benchmark": "resume",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "niceness": os.nice(0),
        **provenance.record(),
        "settings": {"model": "minilm", "seq": args.seq, "batch_size": args.batch_size, "steps": args.steps,
                     "save_steps": args.save_steps, "dropout": "model default (0.1)", "sampler": "NO_DUPLICATES",
                     "matryoshka_dims": [384, 128]},
        "signal": "SIGKILL",
        "killed_after_steps_finished": steps_finished_at_kill,
        "kill_delay_s": round(delay, 3),
        "checkpoints_on_disk_after_kill": checkpoints,
        "resumed_from": Path(resumed_from.group(1)).name if resumed_from else None,
        "skipped_checkpoints": re.findall(r"checkpoint (\S+) is not usable: ([^\n]*)", rerun.stderr),
        "max_abs_diff": max_abs_diff,
        "bar": "<= 1e-6",
        "passed": max_abs_diff <= 1e-6,
        "uninterrupted_s": round(uninterrupted_s, 1),
        "rerun_s": round(rerun_s, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, payload)  # the previous run goes under other_runs
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
