"""Throughput of the LLM client: concurrent vs sequential against a server with a fixed latency per request.

    python scripts/bench_synthesis_throughput.py --requests 96 --concurrency 16 --latency-ms 200 \
        --out benchmarks/results/synthesis_throughput.json

The server is tests/fake_openai_server.py in its own process (so its threads do not share our GIL), answering
every chat completion after a fixed delay. Both clients send the same number of distinct requests, each to its
own fresh answer cache, so the fsync per answer is part of what is measured. The bar is ratio >= 10.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.llm.client import ChatRequest, generate_all  # noqa: E402
from embtune.llm.config import LLMConfig  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

BAR = 10.0


def measure(base_url: str, n: int, concurrency: int, tag: str) -> dict:
    requests = [ChatRequest(id=f"{tag}{i}", messages=[{"role": "user", "content": f"passage {tag} {i}"}],
                            document_hash=f"{tag}{i}") for i in range(n)]
    cfg = LLMConfig(endpoint=base_url, model="fake", concurrency=concurrency, progress=False, timeout_s=30)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = generate_all(requests, cfg, Path(tmp) / "cache.jsonl")
        seconds = time.perf_counter() - started
    if run.stats.failed:
        raise RuntimeError(f"{run.stats.failed} requests failed: {run.stats.errors}")
    return {"concurrency": concurrency, "requests": n, "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 2), "http_requests": run.stats.http_requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--out", default="benchmarks/results/synthesis_throughput.json")
    args = parser.parse_args()
    provenance = Provenance.start()

    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"),
                               "--latency-ms", str(args.latency_ms)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        base_url = f"http://127.0.0.1:{port}/v1"
        measure(base_url, 4, 4, "warmup")  # imports, first connections
        sequential = measure(base_url, args.requests, 1, "seq")
        concurrent = measure(base_url, args.requests, args.concurrency, "conc")
    finally:
        server.stdin.close()  # the server exits when its stdin closes
        server.wait(timeout=10)

    ratio = round(concurrent["requests_per_s"] / sequential["requests_per_s"], 2)
    result = {
        "benchmark": "synthesis_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "server": f"tests/fake_openai_server.py, fixed {args.latency_ms:g} ms per request, 127.0.0.1",
        "sequential": sequential,
        "concurrent": concurrent,
        "ratio": ratio,
        "ideal_ratio": args.concurrency,
        "bar": BAR,
        "passed": ratio >= BAR,
        **provenance.record(packages=("openai", "httpx2")),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)  # the previous run goes under other_runs
    print(json.dumps({k: result[k] for k in ("sequential", "concurrent", "ratio", "passed")}, indent=2))
    if not result["passed"]:
        sys.exit(f"ratio {ratio} is below the bar of {BAR}")


if __name__ == "__main__":
    main()
