"""GPU numbers on a lent accelerator: training throughput and the SciFact supervised pipeline's wall time.

    python scripts/bench_gpu.py --model /tmp/minilm --out-dir "$OUT"     # on the GPU machine (scripts/gpu_check.sh)

1. ``bench_train_throughput.py --device cuda --bf16 --seqs 256 --matryoshka 384,256,128,64``: MNRL inside
   MatryoshkaLoss, triplets/s for the plain sentence-transformers trainer and embtune's recipe.
2. ``bench_scifact_supervised.py --phase final`` with the dev-chosen settings (fp32, as on CPU): data_prep, train
   and eval, timed per stage; export is left out when faiss is not installed there (it writes a FAISS index).

Writes ``<out-dir>/gpu.json`` (both, with the machine and versions) and the two scripts' own result files.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.manifest import Provenance  # noqa: E402


def timed(cmd: list[str]) -> float:
    print("$", shlex.join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return round(time.time() - start, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiniLM folder (fp32)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    provenance = Provenance.start()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable

    throughput_cmd = [python, "scripts/bench_train_throughput.py", "--device", "cuda", "--bf16", "--seqs", "256",
                      "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--rounds", "3",
                      "--model", args.model, "--matryoshka", "384,256,128,64",
                      "--out", str(out / "train_throughput_gpu.json")]
    throughput_wall = timed(throughput_cmd)

    try:
        import faiss  # noqa: F401
        stages = "data_prep,train,eval,export"
    except ImportError:
        stages = "data_prep,train,eval"
    pipeline_cmd = [python, "scripts/bench_scifact_supervised.py", "--phase", "final", "--choice",
                    "lr3e-5_ep2_bm25top30", "--stages", stages, f"--run-root={out / 'runs'}",
                    f"train.base_model={args.model}", "tracking.report_to=none"]
    pipeline_wall = timed(pipeline_cmd)
    supervised = json.loads((ROOT / "benchmarks" / "results" / "scifact_supervised.json").read_text())
    (out / "scifact_supervised_gpu.json").write_text(json.dumps(supervised, indent=2))

    throughput = json.loads((out / "train_throughput_gpu.json").read_text())["results"]["256"]
    payload = {
        "benchmark": "gpu",
        **provenance.record(),
        "train_throughput": {
            "command": shlex.join(["python", *throughput_cmd[1:]]),
            "settings": {"seq": 256, "bf16": True, "batch_size": args.batch_size, "steps": args.steps,
                         "loss": "MNRL in MatryoshkaLoss [384, 256, 128, 64]"},
            "triplets_per_s": {v: round(r["triplets_per_s_median"], 1) for v, r in throughput.items()},
            "achieved_tflops": {v: r.get("achieved_tflops") for v, r in throughput.items()},
            "wall_seconds": throughput_wall,
        },
        "scifact_supervised_pipeline": {
            "command": shlex.join(["python", *pipeline_cmd[1:]]),
            "stages": stages.split(","),
            "wall_seconds": {**supervised["wall_seconds"], "script": pipeline_wall},
            "ndcg@10": {row: m["ndcg@10"] for row, m in supervised["results"].items()},
        },
    }
    (out / "gpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
