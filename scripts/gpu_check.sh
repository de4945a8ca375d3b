#!/usr/bin/env bash
# The GPU check run on a lent machine (the device tool): training throughput and the supervised pipeline
# (scripts/bench_gpu.py). Setup: scripts/gpu_env.sh.
set -euo pipefail
source scripts/gpu_env.sh
python3 scripts/bench_gpu.py --model /tmp/minilm --out-dir "${OUT:-/tmp/gpu_out}"
