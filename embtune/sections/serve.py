"""Config section for the HTTP server: ``serve``, read by ``python -m embtune.serve up [CONFIG] [serve.key=value ...]``.

What ``/search`` retrieves is not here: it is the bundle's ``retriever.json`` (the spec eval recommended).

Example (YAML)::

    serve:
      bundle_dir: runs/scifact/bundle
      port: 8000
      api_key: ""          # or set EMBTUNE_API_KEY; empty = no auth
      microbatch: true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass
class ServeConfig:
    """How ``serve.app`` loads an export bundle and answers requests."""

    bundle_dir: str = ""  # default: the recipe's export.out_dir, else <run_dir>/bundle
    host: str = "127.0.0.1"  # loopback unless asked: the server has no TLS
    port: int = 8000
    # Bearer token required on every route except /health; empty = none. EMBTUNE_API_KEY overrides an empty value.
    api_key: str = ""
    model_name: str = ""  # the `model` reported in responses; default: the bundle folder's name
    # The encoder backend is not a serve key: queries are encoded with the backend that built the bundle's index
    # (manifest.json "encoder_backend", chosen by eval.backend at export), so queries and documents share one encoder.
    # relative to <bundle>/model; "" = the backend's own (onnx/model.onnx, onnx/model_qint8.onnx, openvino/*.xml)
    onnx_file: str = ""
    device: str = ""  # "" = cuda when available, else cpu
    # CPU threads per forward pass (torch intra-op, or onnxruntime); 0 = the library default (all cores). On a
    # small shared machine 1 is often much faster: idle cores are rare and OpenMP threads spin waiting for each other.
    threads: int = 0
    # Micro-batching: the requests that queued while the encoder was busy share its next forward pass, up to
    # max_batch_size texts and max_batch_tokens tokens (a pass costs about its tokens; 0 = no token bound); with
    # max_wait_ms > 0 the first request on an idle encoder waits that long for others (0: a lone request pays no
    # wait). Off = one request per forward pass (the benchmark baseline).
    microbatch: bool = True
    max_batch_size: int = 64
    max_batch_tokens: int = 4096
    max_wait_ms: float = 0.0
    cache_size: int = 4096  # LRU of full-dimension embeddings keyed by text; 0 = off
    # Request limits, answered with a 400 that names the limit.
    max_inputs: int = 256
    max_input_chars: int = 20000
    max_input_tokens: int = 0  # 0 = the model's max_seq_length; longer inputs are refused, never truncated
    max_k: int = 100
    # Admission control: a request to /v1/embeddings or /search gets 503 with Retry-After: retry_after_s at once,
    # instead of waiting in an unbounded queue, when max_queue requests are already in the server (waiting for or
    # in a forward pass or a search), or when it would wait more than max_queue_wait_ms for its forward pass (the
    # queue ahead at the recent cost per text; the bound that follows the machine's speed). Sizing: docs/serve.md.
    max_queue: int = 32
    max_queue_wait_ms: float = 500.0
    retry_after_s: int = 1
    # An admitted request still waiting for its forward pass this long after it arrived is answered 503 without
    # being encoded (by then its answer is late; the pass goes to requests that can still be answered in time);
    # a request whose client has gone is dropped unencoded at any age. 0 = never drop for age.
    drop_after_ms: float = 1000.0
    # Seconds an idle keep-alive connection stays open. Longer than clients' pool idle timeouts (httpx 5 s, aiohttp
    # 15 s) and load balancers' (often 60 s): a server that closes first races a client reusing the connection,
    # and the client sees a dropped connection. uvicorn's own default is 5 s.
    timeout_keep_alive: int = 75
    # /search: `rerank: true` on a bundle whose retriever.json has no rerank uses this cross-encoder
    cross_encoder: str = ""  # CrossEncoder folder or hub name; empty = rerank unavailable
    rerank_candidates: int = 50  # first-stage hits the cross-encoder rescores
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # log every request (costs throughput)

    removed_keys: ClassVar[dict[str, str]] = {
        "backend": "the server encodes with the backend the bundle records (manifest.json encoder_backend); choose it "
                   "with eval.backend before the export",
    }

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("serve.host must not be empty (127.0.0.1 for loopback only)")
        if self.threads < 0:
            raise ValueError(f"serve.threads must be >= 0 (0 = library default), got {self.threads}")
        if self.max_batch_size < 1:
            raise ValueError(f"serve.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 0:
            raise ValueError(f"serve.max_batch_tokens must be >= 0 (0 = no bound), got {self.max_batch_tokens}")
        if self.drop_after_ms < 0:
            raise ValueError(f"serve.drop_after_ms must be >= 0 (0 = never), got {self.drop_after_ms}")
        if self.max_wait_ms < 0:
            raise ValueError(f"serve.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.cache_size < 0:
            raise ValueError(f"serve.cache_size must be >= 0 (0 = off), got {self.cache_size}")
        if self.max_inputs < 1:
            raise ValueError(f"serve.max_inputs must be >= 1, got {self.max_inputs}")
        if self.max_input_chars < 1:
            raise ValueError(f"serve.max_input_chars must be >= 1, got {self.max_input_chars}")
        if self.max_input_tokens < 0:
            raise ValueError(f"serve.max_input_tokens must be >= 0 (0 = the model's limit), "
                             f"got {self.max_input_tokens}")
        if self.max_k < 1:
            raise ValueError(f"serve.max_k must be >= 1, got {self.max_k}")
        if self.max_queue < 1:
            raise ValueError(f"serve.max_queue must be >= 1, got {self.max_queue}")
        if self.max_queue_wait_ms <= 0:
            raise ValueError(f"serve.max_queue_wait_ms must be > 0, got {self.max_queue_wait_ms}")
        if self.retry_after_s < 1:
            raise ValueError(f"serve.retry_after_s must be >= 1 (HTTP Retry-After is whole seconds), "
                             f"got {self.retry_after_s}")
        if self.timeout_keep_alive < 1:
            raise ValueError(f"serve.timeout_keep_alive must be >= 1 second, got {self.timeout_keep_alive}")
        if self.rerank_candidates < 1:
            raise ValueError(f"serve.rerank_candidates must be >= 1, got {self.rerank_candidates}")
