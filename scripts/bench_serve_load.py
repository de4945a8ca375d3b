"""Load benchmark of ``serve``: requests/s and latency with micro-batching on and off, in one run.

Builds a bundle from all-MiniLM-L6-v2 (``resolve_model("minilm")``) with a small index, then for each mode starts
the server in a subprocess on 127.0.0.1 and sends a fixed number of ``/v1/embeddings`` requests, each with one
distinct text (so the LRU cache never answers), from ``--concurrency`` keep-alive connections of ``wrk``, a C load
generator (a Python client on the same cores cost more CPU than the server and capped both modes alike). Each mode
stops after ``--requests`` answers or ``--max-seconds``, whichever comes first. Writes one JSON file.

    apt-get install wrk    # Debian/Ubuntu; macOS: brew install wrk
    nice -n 10 python scripts/bench_serve_load.py --out benchmarks/results/serve_load.json

``--input query`` (default) sends search-query-length texts (10-16 tokens), the traffic an embedding server behind
search sees; ``--input passage`` sends 60-120-token passages (indexing traffic), where a CPU forward pass is
compute-bound and batching saves little. Bar: 0 errors in both modes and ratio (on ÷ off requests/s) >= 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embtune.manifest import machine, versions  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from serve.bundle import build_bundle  # noqa: E402

TOPICS = ["python", "faiss", "retrieval", "tokenizer", "gpu", "embedding", "docker", "database", "cache", "index"]
VERBS = ["install", "debug", "speed up", "configure", "test", "deploy", "monitor", "profile"]


WORDS = ("index shard replica query vector cosine latency batch cache token model encoder layer pooling "
         "throughput memory disk network cluster node request response server client thread queue").split()


def make_texts(n: int, tag: str, kind: str = "query") -> list[str]:
    """``n`` distinct texts: short queries (10-16 tokens) or passages (60-120 tokens)."""
    if kind == "query":
        return [f"{tag} {i}: how do I {VERBS[i % len(VERBS)]} the {TOPICS[(i // 8) % len(TOPICS)]} setup on "
                f"server {i % 97}" for i in range(n)]
    texts = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * (3 + i % 5)) % len(WORDS)] for j in range(50 + i % 40)]
        texts.append(f"{tag} passage {i}. " + " ".join(words) + ".")
    return texts


def write_bodies(path: Path, texts: list[str], encoding_format: str) -> Path:
    """One JSON request body per line, for the wrk script."""
    with open(path, "w") as handle:
        for text in texts:
            handle.write(json.dumps({"input": text, "model": "minilm", "encoding_format": encoding_format}) + "\n")
    return path


def make_docs(n: int) -> list[dict]:
    return [{"_id": f"doc{i}", "title": f"{TOPICS[i % len(TOPICS)]} guide {i}",
             "text": f"How to {VERBS[i % len(VERBS)]} {TOPICS[(i * 7) % len(TOPICS)]} in production, part {i}.",
             "topic": TOPICS[i % len(TOPICS)]} for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, port: int, microbatch: bool, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "serve", "up", "--bundle", str(bundle), "serve.host=127.0.0.1",
               f"serve.port={port}", "serve.log_level=warning", f"serve.max_batch_size={args.max_batch_size}",
               f"serve.max_wait_ms={args.max_wait_ms}", "serve.max_inputs=8", "serve.model_name=minilm",
               f"serve.device={args.device}", f"serve.threads={args.threads}",
               f"serve.microbatch={str(microbatch).lower()}"]
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


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("this benchmark needs wrk (a C HTTP load generator): `apt-get install wrk` on Debian/Ubuntu, "
                         "`brew install wrk` on macOS")
    return path


def load(base_url: str, bodies: Path, requests: int, concurrency: int, threads: int, max_seconds: float,
         server_pid: int) -> dict:
    """Send ``requests`` requests (one body each) with wrk over ``concurrency`` connections; stop at the deadline."""
    per_thread = -(-requests // threads)  # ceil
    command = [wrk_binary(), f"-t{threads}", f"-c{concurrency}", f"-d{int(max_seconds)}s", "--timeout", "60s",
               "-s", str(REPO / "scripts" / "serve_load.lua"), base_url, "--", str(bodies), str(per_thread),
               str(threads)]
    cpu_before = cpu_seconds(server_pid)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Each wrk thread prints WRK_THREAD_DONE after its share; wrk itself would idle until -d, so SIGINT it then
    # (wrk stops on SIGINT and still prints its summary). The run's time is the moment the last thread finished.
    done_threads, finished, result_line = 0, None, ""
    for line in proc.stdout:
        if line.startswith("WRK_THREAD_DONE"):
            done_threads += 1
            if done_threads == threads:
                finished = time.perf_counter()
                server_cpu = cpu_seconds(server_pid) - cpu_before
                proc.send_signal(signal.SIGINT)
        elif line.startswith("WRK_RESULT "):
            result_line = line
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    if finished is None:  # stopped by -d before every thread had its share
        finished = time.perf_counter()
        server_cpu = cpu_seconds(server_pid) - cpu_before
    wall = finished - started
    if not result_line:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr[-2000:]}")
    result = json.loads(result_line[len("WRK_RESULT "):])
    errors = result["errors"]
    error_count = sum(errors.values())
    ok = result["requests"] - errors["status"]
    seconds = wall
    lat = result["latency_us"]
    health = httpx.get(f"{base_url}/health", timeout=30).json()
    return {
        "requests_target": per_thread * threads,
        "ok": ok,
        "errors": error_count,
        "error_kinds": errors,
        "stopped_by_deadline": result["requests"] < per_thread * threads,
        "wall_s": round(seconds, 2),
        "requests_per_s": round(ok / seconds, 1),
        "latency_ms": {"p50": round(lat["p50"] / 1000, 1), "p90": round(lat["p90"] / 1000, 1),
                       "p99": round(lat["p99"] / 1000, 1), "max": round(lat["max"] / 1000, 1)},
        # CPU the server process spent per answered request (all its threads).
        "server_cpu_ms_per_request": round(server_cpu * 1000 / max(ok, 1), 2),
        "wrk_duration_s": round(result["duration_us"] / 1e6, 2),  # until SIGINT reached it
        "server_batcher": health["batcher"],
        "server_cache": health["cache"],
    }


def run_mode(bundle: Path, microbatch: bool, bodies: Path, warmup: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(bundle, port, microbatch, args)
    try:
        asyncio.run(wait_healthy(base_url, server))
        # Warm-up (not measured): first forward passes allocate; distinct texts so the cache stays cold.
        load(base_url, warmup, args.warmup, min(args.concurrency, args.warmup), args.wrk_threads, 60, server.pid)
        load_average = os.getloadavg()
        result = load(base_url, bodies, args.requests, args.concurrency, args.wrk_threads, args.max_seconds,
                      server.pid)
        result["load_average_before"] = [round(x, 2) for x in load_average]
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


def wrk_version() -> str:
    out = subprocess.run([wrk_binary(), "--version"], capture_output=True, text=True)
    return (out.stdout + out.stderr).split("[")[0].replace("wrk", "").strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=300, help="per-mode time limit")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests before each mode")
    parser.add_argument("--docs", type=int, default=200, help="documents in the bundle's index (0 = no index)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="server CPU threads per forward pass (0 = torch default); both modes use the same")
    parser.add_argument("--encoding-format", choices=["float", "base64"], default="base64",
                        help="base64 is what the openai client asks for by default")
    parser.add_argument("--input", choices=["query", "passage"], default="query",
                        help="query: 10-16 tokens per text; passage: 60-120 tokens")
    parser.add_argument("--device", default="cpu", help="server torch device (cpu, cuda)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (it needs little CPU)")
    parser.add_argument("--model", default="minilm", help="SentenceTransformer folder or alias to serve")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args(argv)
    wrk_binary()  # fail before building anything when wrk is missing

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="embtune-bench-") as tmp:
        bundle = build_bundle(resolve_model(args.model), make_docs(args.docs) if args.docs else None,
                              Path(tmp) / "bundle", device="cpu")
        modes = {}
        for name, microbatch in (("microbatch_on", True), ("microbatch_off", False)):
            # distinct within and across modes (and from the warm-up): no cache hits
            bodies = write_bodies(Path(tmp) / f"{name}.jsonl", make_texts(args.requests, name, args.input),
                                  args.encoding_format)
            warmup = write_bodies(Path(tmp) / f"{name}-warmup.jsonl", make_texts(args.warmup, f"warm {name}",
                                                                                 args.input), args.encoding_format)
            modes[name] = run_mode(bundle, microbatch, bodies, warmup, args)

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
        "model": f"{'all-MiniLM-L6-v2 (minilm)' if args.model == 'minilm' else args.model}, torch {args.device}",
        "setup": {"requests_per_mode": args.requests, "concurrency": args.concurrency, "index_docs": args.docs,
                  "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                  "encoding_format": args.encoding_format, "device": args.device,
                  "input": f"one distinct {args.input} per request ({'10-16' if args.input == 'query' else '60-120'}"
                           " tokens)",
                  "server": "uvicorn subprocess on 127.0.0.1, one worker",
                  "client": f"wrk {wrk_version()}, {args.wrk_threads} threads, keep-alive, scripts/serve_load.lua"},
        "modes": modes,
        "ratio": ratio,
        "server_cpu_ratio": round(cpu_off / cpu_on, 2) if cpu_on else None,  # off ÷ on CPU per request
        "errors": errors,
        "bar": {"errors": 0, "ratio_min": 3.0},
        "passed": errors == 0 and ratio is not None and ratio >= 3.0,
        "machine": machine(),
        "versions": {**versions(), "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
                     "wrk": wrk_version()},
    }
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio {ratio} (bar >= 3), errors {errors} (bar 0) -> {'PASS' if result['passed'] else 'FAIL'}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
