"""A tiny OpenAI-compatible server on 127.0.0.1 for tests and benchmarks: ``/v1/chat/completions`` with faults.

``/v1/embeddings`` answers deterministic unit vectors (``EMBEDDING_DIM`` values from each text's sha256), with the
same faults, so endpoint evaluation can be tested for retries without a model.

It can answer 429, 500, a malformed JSON body, empty ``choices``, or hang past the client's timeout, for the first
N requests or always, and add a fixed latency to every request. It counts what it received and what it answered.

In a test::

    with FakeOpenAIServer(fault="429", fault_times=2) as server:
        ...  # base_url=server.base_url; afterwards server.received, server.answered

As a process (the throughput benchmark)::

    python tests/fake_openai_server.py --latency-ms 200   # prints "PORT <n>", serves until stdin closes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("429", "500", "malformed", "empty_choices", "hang")
EMBEDDING_DIM = 8


def fake_embedding(text: str) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    values = [b - 127.5 for b in digest[:EMBEDDING_DIM]]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def default_reply(messages: list[dict]) -> str:
    """Three deterministic 'queries' derived from the last user message (distinct per prompt)."""
    prompt = messages[-1]["content"] if messages else ""
    tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return "\n".join(f"{i}. synthetic query {tag} number {i}" for i in (1, 2, 3))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connects under a burst of concurrent clients


class FakeOpenAIServer:
    """Args:
    fault: one of ``FAULTS`` or None.
    fault_times: the fault hits the first ``fault_times`` requests; None = every request.
    latency_s: added to every answer.
    hang_s: how long a ``hang`` fault holds the request before answering normally.
    reply: messages -> assistant text for normal answers.
    """

    def __init__(self, fault: str | None = None, fault_times: int | None = None, latency_s: float = 0.0,
                 hang_s: float = 5.0, reply: Callable[[list[dict]], str] = default_reply, port: int = 0):
        self.lock = threading.Lock()
        self.set_fault(fault, fault_times)
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.reply = reply
        self.requests = 0  # every POST to /v1/chat/completions
        self.received: Counter[str] = Counter()  # last user message -> requests received
        self.answered: Counter[str] = Counter()  # last user message -> 200 answers with content sent
        self.embedding_requests = 0  # every POST to /v1/embeddings
        self.embedded_texts = 0  # texts in embeddings requests answered 200
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being handled at the same moment
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), self._handler())
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_fault(self, fault: str | None, fault_times: int | None = None) -> None:
        """Change the fault; ``fault_times`` counts from now."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        with self.lock:
            self.fault = fault
            self.fault_left = fault_times

    def _take_fault(self) -> str | None:
        with self.lock:
            if self.fault is None:
                return None
            if self.fault_left is None:
                return self.fault
            if self.fault_left > 0:
                self.fault_left -= 1
                return self.fault
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path in ("/health", "/v1/models"):
                    self._send(200, json.dumps({"status": "ok", "data": [{"id": "fake", "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") == "/v1/embeddings":
                    self._embeddings(json.loads(body))
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                request = json.loads(body)
                messages = request.get("messages", [])
                prompt = messages[-1]["content"] if messages else ""
                with server.lock:
                    server.requests += 1
                    server.received[prompt] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._chat(request, messages, prompt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _embeddings(self, request: dict) -> None:
                with server.lock:
                    server.embedding_requests += 1
                fault = server._take_fault()
                if fault == "429":
                    self._send(429, b'{"error": {"message": "Rate limit reached"}}', {"Retry-After": "0"})
                    return
                if fault == "500":
                    self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
                    return
                texts = request.get("input")
                texts = [texts] if isinstance(texts, str) else texts
                data = [{"object": "embedding", "index": i, "embedding": fake_embedding(t)}
                        for i, t in enumerate(texts)]
                tokens = sum(len(t.split()) for t in texts)
                self._send(200, json.dumps({"object": "list", "data": data, "model": request.get("model"),
                                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode())
                with server.lock:
                    server.embedded_texts += len(texts)

            def _chat(self, request: dict, messages: list[dict], prompt: str) -> None:
                fault = server._take_fault()
                if server.latency_s:
                    time.sleep(server.latency_s)
                if fault == "429":
                    error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}
                    self._send(429, json.dumps(error).encode(), {"Retry-After": "0"})
                    return
                if fault == "500":
                    self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
                    return
                if fault == "malformed":
                    self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "trunc')
                    return
                if fault == "hang":
                    server._stopping.wait(server.hang_s)
                text = server.reply(messages)
                completion = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", "fake"),
                    "choices": [] if fault == "empty_choices" else [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    ],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())},
                }
                try:
                    self._send(200, json.dumps(completion).encode())
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (timeout) before the answer
                if fault != "empty_choices":
                    with server.lock:
                        server.answered[prompt] += 1

        return Handler

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--fault-times", type=int)
    args = parser.parse_args()
    server = FakeOpenAIServer(fault=args.fault, fault_times=args.fault_times, latency_s=args.latency_ms / 1000,
                              port=args.port).start()
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin (or ends us)
    server.stop()


if __name__ == "__main__":
    main()
