#!/usr/bin/env bash
# Issue 12 on a lent GPU (the device tool; setup: scripts/gpu_env.sh): sweeps at once, each with its own embedding
# cache and result file under $OUT:
#   S1, S2  label-free dev variants (scripts/bench_scifact_labelfree.py --phase dev): SciFact train queries as
#           dev, test never read; what is chosen here then runs on 2 CPU cores, the shipped platform
#   D       supervised: the final phase, then the distilled phase (results.distilled in scifact_supervised.json)
# The first call (query-side variants, in the git history of this file) is in benchmarks/results/
# scifact_labelfree_dev.json.
set -uo pipefail
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LIMIT=${LIMIT:-230}
COMMON=(train.base_model=/tmp/minilm tracking.report_to=none)
sweep() {  # name variants [--symmetric]
  EMBTUNE_CACHE=/tmp/cache_$1 OMP_NUM_THREADS=4 timeout "$LIMIT" python3 scripts/bench_scifact_labelfree.py \
    --phase dev --variants "$2" ${3:-} --dev-out "$OUT/labelfree_dev_$1.json" --run-root "/tmp/lf_$1" \
    "${COMMON[@]}" > "$OUT/log_$1.txt" 2>&1
  echo "sweep $1 exit $?"
}
supervised() {
  export EMBTUNE_CACHE=/tmp/cache_D OMP_NUM_THREADS=4
  timeout "$LIMIT" bash -c "python3 scripts/bench_scifact_supervised.py --phase final --choice lr3e-5_ep2_bm25top30 \
      --stages data_prep,train,eval --run-root /tmp/sup ${COMMON[*]} \
    && python3 scripts/bench_scifact_supervised.py --phase distilled --run-root /tmp/sup ${COMMON[*]}" \
    > "$OUT/log_D.txt" 2>&1
  echo "supervised exit $?"
  cp benchmarks/results/scifact_supervised.json "$OUT/" || true
}
START=$(date +%s)
(while sleep 20; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; done) > "$OUT/gpu_mem.txt" &
MON=$!
sweep S1 sym_m4,sym_m8,sym_m4_lr5e-5 --symmetric &
sweep S2 sym_m4_keep --symmetric &
supervised &
wait %2 %3 %4
kill $MON
echo "wall $(( $(date +%s) - START )) s"
grep -h "^dev " "$OUT"/log_*.txt
