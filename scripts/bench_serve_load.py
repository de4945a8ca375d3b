"""Load benchmark of ``serve``: requests/s and latency with micro-batching on and off, in one run.

Builds a bundle from all-MiniLM-L6-v2 (``resolve_model("minilm")``) with a small index, then for each mode starts
the server in a subprocess on 127.0.0.1 and sends a fixed number of ``/v1/embeddings`` requests (one short,
distinct text each, so the LRU cache never answers) from ``--concurrency`` asyncio clients. Each mode stops after
``--requests`` requests or ``--max-seconds``, whichever comes first. Writes one JSON file.

    nice -n 10 python scripts/bench_serve_load.py --out benchmarks/results/serve_load.json

Bar: 0 errors in both modes and ratio (on ÷ off requests/s) >= 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embtune.manifest import machine, versions  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from serve.bundle import build_bundle  # noqa: E402

TOPICS = ["python", "faiss", "retrieval", "tokenizer", "gpu", "embedding", "docker", "database", "cache", "index"]
VERBS = ["install", "debug", "speed up", "configure", "test", "deploy", "monitor", "profile"]


def make_texts(n: int, tag: str) -> list[str]:
    """``n`` distinct short queries (about 10-14 tokens each)."""
    return [f"{tag} {i}: how do I {VERBS[i % len(VERBS)]} the {TOPICS[(i // 8) % len(TOPICS)]} setup on server {i % 97}"
            for i in range(n)]


def make_docs(n: int) -> list[dict]:
    return [{"_id": f"doc{i}", "title": f"{TOPICS[i % len(TOPICS)]} guide {i}",
             "text": f"How to {VERBS[i % len(VERBS)]} {TOPICS[(i * 7) % len(TOPICS)]} in production, part {i}.",
             "topic": TOPICS[i % len(TOPICS)]} for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, port: int, microbatch: bool, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from serve.app import main; main(sys.argv[1:])",
               "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-inputs", "8", "--model-name", "minilm", "--device", "cpu", "--threads", str(args.threads)]
    if not microbatch:
        command.append("--no-microbatch")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env)


async def wait_healthy(base_url: str, server: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with code {server.returncode} before becoming healthy")
            try:
                response = await http.get("/health")
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout}s")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def load(base_url: str, texts: list[str], concurrency: int, max_seconds: float, encoding_format: str,
               server_pid: int) -> dict:
    """Send one request per text from ``concurrency`` workers; stop at the end of ``texts`` or at the deadline."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(texts) and time.perf_counter() < deadline:
                text = texts[next_index]
                next_index += 1
                sent = time.perf_counter()
                try:
                    response = await http.post("/v1/embeddings", json={"input": text, "model": "minilm",
                                                                       "encoding_format": encoding_format})
                    ok = response.status_code == 200 and len(response.json()["data"]) == 1
                    if not ok:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                if ok:
                    latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pid) - cpu_before
        health = (await http.get("/health")).json()
    lat_ms = np.array(latencies) * 1000
    return {
        "requests_sent": next_index,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:5],
        "stopped_by_deadline": next_index < len(texts),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 1) if latencies else None,
                       "p99": round(float(np.percentile(lat_ms, 99)), 1) if latencies else None,
                       "max": round(float(lat_ms.max()), 1) if latencies else None},
        # CPU the server process spent per answered request (all its threads): what batching saves, whether or
        # not the load generator on the same cores is what limits requests/s.
        "server_cpu_ms_per_request": round(server_cpu * 1000 / max(len(latencies), 1), 2),
        "server_batcher": health["batcher"],
        "server_cache": health["cache"],
    }


async def run_mode(bundle: Path, microbatch: bool, texts: list[str], args: argparse.Namespace) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(bundle, port, microbatch, args)
    try:
        await wait_healthy(base_url, server)
        # Warm-up (not measured): first forward passes allocate; distinct texts so the cache stays cold.
        await load(base_url, [f"warm-up {i}" for i in range(args.warmup)], min(args.concurrency, args.warmup),
                   60, args.encoding_format, server.pid)
        result = await load(base_url, texts, args.concurrency, args.max_seconds, args.encoding_format, server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(f"microbatch={'on' if microbatch else 'off'}: {result['requests_per_s']} req/s, "
          f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, errors {result['errors']}, "
          f"texts/pass {result['server_batcher']['mean_texts_per_pass']}, "
          f"server CPU {result['server_cpu_ms_per_request']} ms/request", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=300, help="per-mode time limit")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests before each mode")
    parser.add_argument("--docs", type=int, default=200, help="documents in the bundle's index")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="server CPU threads per forward pass (0 = torch default); both modes use the same")
    parser.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="embtune-bench-") as tmp:
        bundle = build_bundle(resolve_model("minilm"), make_docs(args.docs), Path(tmp) / "bundle", device="cpu")
        modes = {}
        for name, microbatch in (("microbatch_on", True), ("microbatch_off", False)):
            texts = make_texts(args.requests, tag=name)  # distinct within and across modes: no cache hits
            modes[name] = asyncio.run(run_mode(bundle, microbatch, texts, args))

    on, off = modes["microbatch_on"]["requests_per_s"], modes["microbatch_off"]["requests_per_s"]
    ratio = round(on / off, 2) if off else None
    errors = modes["microbatch_on"]["errors"] + modes["microbatch_off"]["errors"]
    cpu_on = modes["microbatch_on"]["server_cpu_ms_per_request"]
    cpu_off = modes["microbatch_off"]["server_cpu_ms_per_request"]
    import fastapi
    import uvicorn

    result = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "scripts/bench_serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "niceness": os.nice(0),
        "model": "all-MiniLM-L6-v2 (resolve_model('minilm')), torch CPU",
        "setup": {"requests_per_mode": args.requests, "concurrency": args.concurrency, "index_docs": args.docs,
                  "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                  "encoding_format": args.encoding_format, "input": "one short distinct string per request",
                  "server": "uvicorn subprocess on 127.0.0.1, one worker; client: httpx.AsyncClient in this process"},
        "modes": modes,
        "ratio": ratio,
        "server_cpu_ratio": round(cpu_off / cpu_on, 2) if cpu_on else None,  # off ÷ on CPU per request
        "errors": errors,
        "bar": {"errors": 0, "ratio_min": 3.0},
        "passed": errors == 0 and ratio is not None and ratio >= 3.0,
        "machine": machine(),
        "versions": {**versions(), "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
                     "httpx": httpx.__version__},
    }
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio {ratio} (bar >= 3), errors {errors} (bar 0) -> {'PASS' if result['passed'] else 'FAIL'}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
