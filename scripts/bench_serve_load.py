"""Goodput under overload: embtune's ``/v1/embeddings`` beside infinity-emb's, at 1, 32, 200 and 1,000 in flight.

Each server runs as a subprocess pinned to one core (``taskset -c --server-core``) on 127.0.0.1 and serves the same
model (all-MiniLM-L6-v2 from ``resolve_model``); this process, the load generator, pins itself to another core
(``--client-core``). For each level it keeps exactly ``in_flight`` requests open (closed loop: ``in_flight`` workers,
each on its own keep-alive connection, sending its next request when the last is answered, or, after a refusal,
when the server said: ``retry-after-ms``, else ``Retry-After``, as the openai client reads them, else 1 s). The
workers start one by one over ``--ramp-s`` (2 s), each opening its connection with its first request, and the level
is measured over the ``--seconds`` (15) after that ramp; no request is sent after the window (or after the level's
``--requests`` texts run out). Every request embeds one query, a distinct phrase of 5 SciFact words plus a unique
tag, and both servers get the same texts, so no cache answers. A level records, per server:

- ``goodput_per_s``: 200s answered inside the window, per second of it;
- ``p50_ms`` / ``p99_ms``: latency of the 200s sent inside the window, from send to the last byte;
- ``refused``: 503 or 429 answers; ``refusal_p99_ms``: their latency (what a refusal costs the client);
- ``errors``: anything else (other statuses, dropped connections, timeouts);
- ``whole_level``: the same figures over every request, the ramp included; ``timeline``: per second of the level,
  the 200s and refusals sent and their p99;
- ``tokens_per_text``: the mean tokens of the texts sent (the model's tokenizer), equal at every level;
- ``server_cpu_s`` (``server_loop_cpu_s`` on the event loop) and ``server_cpu_ms_per_200``: the server's CPU.

The run's ``overload_ratio`` is the target's ratio (goodput at 1,000 over goodput at 32) and the same ratio from the
server's CPU per 200 answered: the server's share of its core does not enter the second (other jobs on the machine
still do, through the caches they share).

``--ramp-s 0`` starts every worker at once: a thousand connections and requests arrive in the same instant, and the
refusals at the back of that burst wait for the ones ahead of them on the server's one event loop.

embtune: ``python -m embtune.serve up`` over an embeddings-only bundle (built once under ``runs/``), once per
``--backends`` entry: onnx-int8 (the fastest backend here, on which the targets are checked) and torch (the engine
infinity runs). infinity-emb: installed in its own
virtual environment, never a project dependency::

    python3.11 -m venv .bench-infinity
    .bench-infinity/bin/pip install torch==2.13.0 "infinity-emb[server,torch]==0.0.78"

    nice -n 5 python scripts/bench_serve_load.py    # writes benchmarks/results/serve_load.json

The previous content of the output file is kept under ``other_runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402

SCIFACT = "/work/shared/data/beir/scifact"
REFUSALS = (503, 429)


def vocabulary(corpus: Path, n_docs: int = 2000) -> list[str]:
    """Distinct lower-case words of 4+ letters from the first ``n_docs`` documents of a BEIR corpus.jsonl."""
    words: set[str] = set()
    with open(corpus) as handle:
        for i, line in enumerate(handle):
            if i == n_docs:
                break
            words.update(w.lower() for w in re.findall(r"[A-Za-z]{4,}", json.loads(line)["text"]))
    return sorted(words)


def queries(n: int, words: list[str], seed: int, tag: str) -> list[str]:
    """``n`` distinct 5-word queries (a unique tag each, so no cache can answer one).

    The tag's number has a fixed width, and every level uses the same tag (its words come from its own seed), so
    each level's texts have the same token lengths: a forward pass costs about its tokens, and a level whose tags
    were longer (``q1000x12345`` against ``q32x1234``) would be measured on heavier texts.
    """
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(5)) + f" {tag}{i:06d}" for i in range(n)]


async def drive(url: str, model: str, texts: list[str], in_flight: int, timeout_s: float,
                seconds: float = 0.0, ramp_s: float = 0.0) -> dict:
    """Send one embeddings request per text with ``in_flight`` open at all times, until the texts run out or, with
    ``seconds``, until the measured window ends; what came back.

    The workers start one by one over ``ramp_s`` (each opens its connection with its first request), and the
    measured window is the ``seconds`` after that: its goodput counts the 200s answered inside it, its latencies
    the requests sent inside it. ``whole_level`` keeps the same figures over everything sent, the ramp included.
    """
    import aiohttp

    next_index = 0
    sent: list[tuple[float, float, int]] = []  # (sent at, answered at, status), seconds into the level
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    connector = aiohttp.TCPConnector(limit=in_flight, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    window_end = ramp_s + seconds

    async def worker(session, index: int) -> None:
        nonlocal next_index
        await asyncio.sleep(ramp_s * index / in_flight)
        while next_index < len(texts) and not (seconds and time.perf_counter() - started_level > window_end):
            text = texts[next_index]
            next_index += 1
            started = time.perf_counter()
            try:
                async with session.post(url, json={"input": text, "model": model}) as response:
                    body = await response.read()
                    status = response.status
                    # As the openai client reads them: retry-after-ms first, then Retry-After (seconds).
                    retry_ms, retry_s = response.headers.get("retry-after-ms"), response.headers.get("Retry-After")
            except (asyncio.TimeoutError, aiohttp.ClientError) as err:
                kind = "timeout" if isinstance(err, asyncio.TimeoutError) else "connection"
                errors[kind] = errors.get(kind, 0) + 1
                examples.setdefault(kind, f"{type(err).__name__}: {err}")
                continue
            sent.append((started - started_level, time.perf_counter() - started_level, status))
            if status in REFUSALS:
                # As the openai client does: wait what the server says before the next request (1 s if nothing).
                await asyncio.sleep(float(retry_ms) / 1000 if retry_ms else float(retry_s) if retry_s else 1.0)
            elif status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                examples.setdefault(str(status), body[:300].decode(errors="replace"))

    started_level = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*[worker(session, i) for i in range(in_flight)])
    table = np.array(sent, dtype=np.float64).reshape(-1, 3)  # (requests, 3)
    at, answered, status = table[:, 0], table[:, 1], table[:, 2]
    ms = (answered - at) * 1000
    ok, refused = status == 200, np.isin(status, REFUSALS)

    def pct(values: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if len(values) else None

    def figures(chosen: np.ndarray, goodput: float) -> dict:
        return {"goodput_per_s": round(float(goodput), 1), "p50_ms": pct(ms[chosen & ok], 50),
                "p99_ms": pct(ms[chosen & ok], 99), "ok": int((chosen & ok).sum()),
                "refused": int((chosen & refused).sum()), "refusal_p50_ms": pct(ms[chosen & refused], 50),
                "refusal_p99_ms": pct(ms[chosen & refused], 99)}

    def by_second(kind: np.ndarray) -> list[dict]:
        second = np.floor(at[kind]).astype(int)
        return [{"second": int(t), "n": int((second == t).sum()), "p99_ms": pct(ms[kind][second == t], 99)}
                for t in np.unique(second)]

    wall = float(answered.max()) if len(answered) else 0.0  # the level ends with its last answer
    in_window = (at >= ramp_s) & (at <= window_end) if seconds else np.ones(len(at), dtype=bool)
    # The window ends when sending stops: at its set length, or earlier where the level's texts ran out.
    window_s = min(seconds, wall - ramp_s) if seconds else wall - ramp_s
    goodput = ((answered >= ramp_s) & (answered <= ramp_s + window_s) & ok).sum() / max(window_s, 1e-9)
    return {"in_flight": in_flight, "requests": next_index, **figures(in_window, goodput),
            "errors": errors, "error_examples": examples, "ramp_s": ramp_s, "window_s": round(window_s, 2),
            "wall_s": round(wall, 2), "whole_level": figures(np.ones(len(at), dtype=bool), ok.sum() / max(wall, 1e-9)),
            "timeline": {"ok": by_second(ok), "refused": by_second(refused)}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_bundle(folder: Path, model: str, backend: str) -> Path:
    """An embeddings-only bundle of ``model`` encoding with ``backend``, built once: the server encodes with the
    backend its bundle records, so each backend gets a bundle of its own (``<folder>/<backend>``)."""
    folder = folder / backend
    if (folder / "manifest.json").is_file():
        return folder
    from embtune.serve.bundle import build_bundle

    return build_bundle(resolve_model(model), None, folder, device="cpu", backend=backend)


def server_command(name: str, args: argparse.Namespace, port: int) -> tuple[list[str], str]:
    """The pinned command line that serves the model, and the embeddings URL it answers on."""
    pin = ["taskset", "-c", str(args.server_core)]
    if name == "embtune":
        command = [sys.executable, "-m", "embtune.serve", "up", "--bundle", str(args.bundle / args.backend),
                   "serve.host=127.0.0.1", f"serve.port={port}", "serve.log_level=warning",
                   "serve.threads=1", "serve.model_name=minilm", "serve.device=cpu", *args.serve]
        return pin + command, f"http://127.0.0.1:{port}/v1/embeddings"
    infinity = Path(args.infinity_venv) / "bin" / "infinity_emb"
    if not infinity.is_file():
        raise SystemExit(f"{infinity} not found: create the venv as this script's docstring says "
                         f"(--infinity-venv {args.infinity_venv})")
    command = [str(infinity), "v2", "--model-id", str(resolve_model(args.model)), "--served-model-name", "minilm",
               "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *args.infinity_args]
    return pin + command, f"http://127.0.0.1:{port}/embeddings"


async def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until the server answers one embeddings request with a 200."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with code {server.returncode} before answering")
            try:
                async with session.post(url, json={"input": "ready?", "model": "minilm"}) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not answering after {timeout}s")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server's process tree: its main thread (the event loop) as ``loop``, the rest as
    ``other``. The pinned command is ``taskset``, which execs the server, so ``pid`` is the server itself."""
    import psutil

    process = psutil.Process(pid)
    loop = other = 0.0
    for p in [process, *process.children(recursive=True)]:
        for thread in p.threads():
            if thread.id == p.pid and p.pid == pid:
                loop += thread.user_time + thread.system_time
            else:
                other += thread.user_time + thread.system_time
    return {"loop": loop, "other": other}


def run_server(name: str, words: list[str], args: argparse.Namespace) -> list[dict]:
    port = free_port()
    command, url = server_command(name, args, port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    log = open(args.server_log, "a") if args.server_log else subprocess.DEVNULL
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    levels = []
    try:
        asyncio.run(wait_ready(url, server))
        asyncio.run(drive(url, "minilm", queries(args.warmup, words, 0, f"warm{name}"), 8, args.timeout_s))
        for level, requests in zip(args.levels, args.requests):
            texts = queries(requests, words, level, "q")  # the same texts for every server
            load_before = [round(x, 2) for x in os.getloadavg()]
            cpu_before = thread_cpu(server.pid)
            result = asyncio.run(drive(url, "minilm", texts, level, args.timeout_s, args.seconds, args.ramp_s))
            cpu = {key: value - cpu_before.get(key, 0.0) for key, value in thread_cpu(server.pid).items()}
            # CPU seconds the server spent, on its event-loop thread and on all others (the encoder's): with the
            # machine shared, the cost of a request and of a refusal, which the latencies only show with noise.
            # The texts' cost: a forward pass costs about its tokens, so levels are compared on equal texts.
            sent = args.tokenizer(texts[:result["requests"]], add_special_tokens=True)["input_ids"]
            result = {"server": name, **result, "tokens_per_text": round(float(np.mean([len(ids) for ids in sent])), 2),
                      "load_average_before": load_before,
                      "server_cpu_s": round(sum(cpu.values()), 2), "server_loop_cpu_s": round(cpu["loop"], 2),
                      "server_loop_cpu_ms_per_answer": round(1000 * cpu["loop"] / max(1, result["ok"]
                                                                                       + result["refused"]), 3),
                      # All the server's CPU over the level per 200 it answered, refusals' cost included: what the
                      # goodput would be bounded by if the server had its core to itself at every level.
                      "server_cpu_ms_per_200": round(1000 * sum(cpu.values()) / max(1, result["whole_level"]["ok"]),
                                                     3)}
            if name == "embtune":
                result["backend"] = args.backend
            levels.append(result)
            print(f"{name:>8} {level:>5} in flight: {result['goodput_per_s']}/s, p50 {result['p50_ms']} ms, "
                  f"p99 {result['p99_ms']} ms, refused {result['refused']} (p99 {result['refusal_p99_ms']} ms), "
                  f"errors {result['errors']}, load {load_before[0]}", flush=True)
            time.sleep(args.pause_s)  # refused clients' retries and closed connections settle
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return levels


def checks(levels: list[dict], backend: str) -> dict[str, bool]:
    """The targets of issue 29 for embtune on ``backend``, each on its own."""
    ours = {lv["in_flight"]: lv for lv in levels if lv["server"] == "embtune" and lv["backend"] == backend}
    theirs = {lv["in_flight"]: lv for lv in levels if lv["server"] == "infinity"}
    out = {}
    if 32 in ours and 1000 in ours:
        out["goodput_1000_at_least_0.8x_goodput_32"] = ours[1000]["goodput_per_s"] >= 0.8 * ours[32]["goodput_per_s"]
        out["p99_of_200s_at_1000_under_1s"] = (ours[1000]["p99_ms"] or 0) <= 1000
    if 32 in ours:
        out["none_refused_at_32"] = ours[32]["refused"] == 0
    out["refusal_p99_at_most_10ms"] = all((lv["refusal_p99_ms"] or 0) <= 10 for lv in ours.values())
    if 1 in ours:
        out["p50_at_1_at_most_8ms"] = (ours[1]["p50_ms"] or 1e9) <= 8
    if theirs and ours:
        out["goodput_at_least_infinity_at_every_level"] = all(
            ours[n]["goodput_per_s"] >= theirs[n]["goodput_per_s"] for n in ours if n in theirs)
    return out


def overload_ratio(levels: list[dict], backend: str) -> dict[str, float | None]:
    """Goodput at 1,000 in flight over goodput at 32 for embtune on ``backend`` (the target's ratio), and the same
    ratio from the server's CPU per 200 answered (``server_cpu_ms_per_200`` at 32 over at 1,000).

    On a shared machine the server's share of its core moves between levels, and the goodput ratio with it; the
    CPU ratio is what the goodput ratio would be with the same share at both levels (other jobs still move it,
    through the caches they share with the server).
    """
    ours = {lv["in_flight"]: lv for lv in levels if lv["server"] == "embtune" and lv["backend"] == backend}
    if 32 not in ours or 1000 not in ours:
        return {"goodput_1000_over_32": None, "by_cpu_per_200": None}
    low, high = ours[32], ours[1000]
    return {"goodput_1000_over_32": round(high["goodput_per_s"] / max(low["goodput_per_s"], 1e-9), 3),
            "by_cpu_per_200": round(low["server_cpu_ms_per_200"] / max(high["server_cpu_ms_per_200"], 1e-9), 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", default=["embtune", "infinity"], choices=["embtune", "infinity"])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32, 200, 1000], help="requests in flight")
    parser.add_argument("--requests", type=int, nargs="+", default=[10000, 20000, 20000, 40000],
                        help="the most requests per level (one number per level): distinct texts generated")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="the measured window of a level, after its ramp (0 = send every request)")
    parser.add_argument("--ramp-s", type=float, default=2.0,
                        help="the workers of a level start one by one over this long, before its measured window "
                             "(whole_level in each level's record includes the ramp)")
    parser.add_argument("--backends", nargs="+", default=["onnx-int8", "torch"],
                        help="embtune's encoder backends (eval.backend), one bundle and server each; the targets "
                             "are checked on the first")
    parser.add_argument("--bundle", default="runs/serve_load_bundle", help="embtune's bundle (built when missing)")
    parser.add_argument("--model", default="minilm", help="SentenceTransformer folder or alias, for both servers")
    parser.add_argument("--serve", nargs="*", default=[], help="more serve.key=value overrides for embtune")
    parser.add_argument("--infinity-venv", default=".bench-infinity")
    parser.add_argument("--infinity-args", nargs="*", default=[], help="more infinity_emb v2 arguments")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--corpus", default=f"{SCIFACT}/corpus.jsonl", help="a BEIR corpus.jsonl (query words)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests before the levels")
    parser.add_argument("--pause-s", type=float, default=2.0, help="pause between levels")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="client timeout per request")
    parser.add_argument("--server-log", default="", help="where the servers' output goes (default: nowhere)")
    parser.add_argument("--note", default="", help="recorded as the run's note")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args(argv)
    provenance = Provenance.start(
        shlex.join(["python", "scripts/bench_serve_load.py", *(argv if argv is not None else sys.argv[1:])]))
    if len(args.requests) != len(args.levels):
        parser.error(f"--requests needs one number per level ({len(args.levels)}), got {len(args.requests)}")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.bundle = REPO / args.bundle if not Path(args.bundle).is_absolute() else Path(args.bundle)
    for backend in args.backends if "embtune" in args.servers else []:
        ensure_bundle(args.bundle, args.model, backend)
    from transformers import AutoTokenizer

    args.tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    os.sched_setaffinity(0, {args.client_core})
    words = vocabulary(Path(args.corpus))
    levels = []
    for name in args.servers:
        for backend in args.backends if name == "embtune" else [""]:
            args.backend = backend
            levels.extend(run_server(name, words, args))


    def version_of(package: str, python: str = sys.executable) -> str:
        code = f"from importlib import metadata; print(metadata.version({package!r}))"
        found = subprocess.run([python, "-c", code], capture_output=True, text=True)
        return found.stdout.strip() or "not installed"

    passed = checks(levels, args.backends[0])
    ratio = overload_ratio(levels, args.backends[0])
    result = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": args.note,
        "niceness": os.nice(0),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "setup": {
            "model": f"{args.model} ({resolve_model(args.model)})",
            "embtune": f"python -m embtune.serve up, a bundle per backend in {args.backends}, serve.threads=1, "
                       f"overrides {args.serve}, bundles under {args.bundle.name}",
            "infinity": f"infinity_emb v2 --engine torch --device cpu {' '.join(args.infinity_args)}",
            "pinning": f"server taskset -c {args.server_core}, load generator sched_setaffinity {{{args.client_core}}}",
            "traffic": "POST one query per request ({'input': text}); texts: 5 random SciFact words + a unique tag, "
                       "the same texts for every server",
            "client": "aiohttp on uvloop, one keep-alive connection per request in flight (closed loop); a refused "
                      "worker waits retry-after-ms, else Retry-After, else 1 s, before its next request (as the "
                      "openai client does)",
            "levels": args.levels, "requests_at_most": args.requests, "seconds_per_level": args.seconds,
            "ramp_s": args.ramp_s,
            "warmup": args.warmup,
        },
        "levels": levels,
        "passed": passed,
        "overload_ratio": ratio,
        **provenance.record(packages=("fastapi", "uvicorn", "aiohttp")),  # CPU model and vector flags included
        "infinity_emb_version": version_of("infinity-emb", str(Path(args.infinity_venv) / "bin" / "python"))
        if "infinity" in args.servers else None,
    }
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)  # the previous run kept under other_runs
    print(f"{args.backends[0]}: {passed}, {ratio} -> wrote {out}")
    return result


if __name__ == "__main__":
    main()
