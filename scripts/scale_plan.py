"""The figures of docs/scale.md's 100M plan, computed from measured result files (no new measurement).

    python scripts/scale_plan.py            # -> benchmarks/results/scale_plan.json

Inputs: ``gpu.json`` (the H200's measured training throughput: achieved TFLOPS of MiniLM at seq 256, bf16) and
``serve_scale.json`` (the 10M bundle: its index file's bytes, its build time on this machine). Every derived figure
says how it is derived; docs/scale.md quotes them through check_claims tags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import write_result  # noqa: E402

from embtune.manifest import Provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PASSAGES, TOKENS, DIM = 100_000_000, 256, 384
# MiniLM-L6 (all-MiniLM-L6-v2): 6 layers, hidden 384, FFN 1536; non-embedding parameters per layer: attention
# 4 * (384 * 384 + 384), FFN 2 * 384 * 1536 + 1536 + 384, two LayerNorms 4 * 384 (the count
# bench_train_throughput.train_flops takes from the model).
LAYERS, HIDDEN, FFN = 6, 384, 1536
PARAMS = LAYERS * (4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN * FFN + FFN + HIDDEN + 4 * HIDDEN)


def main() -> int:
    provenance = Provenance.start()
    gpu = json.loads((RESULTS / "gpu.json").read_text())
    serve = json.loads((RESULTS / "serve_scale.json").read_text())
    # Forward only: 2 FLOPs per non-embedding parameter per token, plus attention scores and values
    # (4 * layers * hidden * seq per token), as train_flops counts them for the forward pass.
    flops_per_passage = TOKENS * (2 * PARAMS + 4 * LAYERS * HIDDEN * TOKENS)
    tflops = gpu["train_throughput"]["achieved_tflops"]["plain"]
    passages_per_s = tflops * 1e12 / flops_per_passage
    encode_gpu_hours = PASSAGES / passages_per_s / 3600

    vectors = serve["vectors"]
    index_bytes = serve["bundle_bytes"]["corpus.faiss"]
    measured_ivf_pq = index_bytes / vectors
    docs_bytes = sum(v for k, v in serve["bundle_bytes"].items() if k.startswith("docs"))
    bytes_per_vector = {
        "flat_fp32": 4 * DIM,  # IndexFlatIP: the float32 vectors
        "ivf_pq_measured": round(measured_ivf_pq, 1),  # IVF + PQ48 codes + 8-bit refine codes + ids, from the file
        "ivf_pq48_alone": 48 + 8,  # PQ code + int64 id (no refine: recall too low, see serve_scale.json)
        "sq8": DIM,  # 8-bit scalar quantization: one byte a dimension (Milvus IVF_SQ8's encoding too)
        "hnsw32_fp32": 4 * DIM + 2 * 32 * 4,  # vectors + level-0 links (2 * M int32); upper levels add ~1/M of that
    }
    build_s = serve["build"]["build_bundle_s"]
    out = {
        "benchmark": "scale_plan",
        "passages": PASSAGES, "tokens": TOKENS, "dim": DIM,
        "encode": {
            "source": "gpu.json train_throughput.achieved_tflops.plain (H200, MiniLM, seq 256, bf16, training); "
                      "assumes an encode-only pass reaches the training pass's achieved TFLOPS (not measured)",
            "achieved_tflops": tflops, "non_embedding_params": PARAMS,
            "gflops_per_passage": round(flops_per_passage / 1e9, 2),
            "passages_per_s_per_gpu": round(passages_per_s),
            "gpu_hours": round(encode_gpu_hours, 1),
        },
        "bytes_per_vector": bytes_per_vector,
        "index_gb_at_100m": {k: round(v * PASSAGES / 1e9, 1) for k, v in bytes_per_vector.items()},
        "docs_bytes_per_passage_measured": round(docs_bytes / vectors, 1),
        "index_build": {
            "source": "serve_scale.json build.build_bundle_s: generating, writing docs and training + filling the "
                      "IVF-PQ index of 10M vectors on 2 shared CPU cores",
            "measured_s_at_10m": build_s,
            "linear_estimate_h_at_100m_one_machine": round(build_s * PASSAGES / vectors / 3600, 1),
        },
    }
    out.update(provenance.record())
    write_result(RESULTS / "scale_plan.json", out)
    print(json.dumps(out["encode"]), json.dumps(out["index_gb_at_100m"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
