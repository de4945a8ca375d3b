"""Convert a SentenceTransformer's transformer to OpenVINO IR (fp32, and NNCF static int8) and encode with it.

The ``openvino`` and ``openvino-int8`` backends of :func:`embtune.retrieval.encoder.load_encoder`. The transformer
goes through the same ONNX export as the ONNX backends (``embtune.retrieval.onnx.export_onnx``), then
``openvino.convert_model``; the int8 copy is ``nncf.quantize`` (static post-training quantisation: activation scales
fixed from calibration passages, so at run time a text's activations are quantised with scales that do not depend on
the other texts of its batch). Files follow sentence-transformers' OpenVINO layout (``<model>/openvino/``), and the
calibration recipe is written beside them (``openvino_calibration.json``).

Pooling, dense layers and normalisation stay the model's own sentence-transformers modules, as in
:class:`embtune.retrieval.onnx.OnnxEncoder`.

Why fixed shapes: a vector must depend only on its text (the Ray engine's shards must equal one process's encode).
Each text is padded to its length bucket (a multiple of ``BUCKET_TOKENS``, a function of the text alone) and runs
with up to ``ROWS_PER_RUN`` texts of its bucket, so a text always meets the same kernels on the same sequence length.
The number of rows in a run does not change a row's bits (checked for MiniLM's int8 IR with 1, 3, 7 and 16 rows, and
by tests/test_openvino.py), so a lone query runs alone, without filler rows. Speeds and agreement with torch:
benchmarks/results/encode_speed.json (scripts/bench_encode_speed.py).

Example::

    paths = export_openvino("runs/x/export/model", calibration_texts=corpus_texts)
    encoder = OpenVINOEncoder("runs/x/export/model", paths["int8"])
    embeddings = encoder.encode(["what is a transformer?"])  # (1, dim) float32
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from embtune.retrieval.onnx import OnnxEncoder

logger = logging.getLogger(__name__)

IR_DIR = "openvino"
FP32_FILE = "openvino_model.xml"
INT8_FILE = "openvino_model_qint8_quantized.xml"  # sentence-transformers' name for a static int8 IR
CALIBRATION_FILE = "openvino_calibration.json"
# The IR each OpenVINO backend runs, relative to the model folder.
BACKEND_FILES = {"openvino": f"{IR_DIR}/{FP32_FILE}", "openvino-int8": f"{IR_DIR}/{INT8_FILE}"}
# Calibration: this many corpus passages, evenly spaced through the corpus (a fixed sample, so the same corpus gives
# the same IR). The measurements used about 300; see encode_speed.json for the recorded recipe.
CALIBRATION_SIZE = 300
BUCKET_TOKENS = 16
ROWS_PER_RUN = 16
TOKENIZE_CHUNK = 1024  # texts tokenized at once by encode()


def _require_openvino() -> None:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        raise ImportError("the openvino backends need the PyPI packages openvino and nncf: "
                          "pip install openvino nncf") from None


def calibration_sample(texts: list[str], size: int = CALIBRATION_SIZE) -> list[str]:
    """``size`` non-empty passages evenly spaced through ``texts`` (all of them when there are fewer)."""
    texts = [t for t in texts if t.strip()]
    if len(texts) <= size:
        return texts
    return [texts[int(i)] for i in np.linspace(0, len(texts) - 1, size)]


def calibration_hash(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(calibration_sample(texts)).encode()).hexdigest()[:12]


def quantize_openvino(fp32_path: str | Path, int8_path: str | Path, model_dir: str | Path,
                      calibration_texts: list[str], max_seq_length: int = 0) -> Path:
    """Write an NNCF static int8 copy of an fp32 IR, calibrated on a sample of ``calibration_texts`` (corpus
    passages), each tokenized alone by the model's own tokenizer; the recipe goes to ``openvino_calibration.json``."""
    _require_openvino()
    import nncf
    import openvino as ov
    from sentence_transformers import SentenceTransformer

    sample = calibration_sample(calibration_texts)
    if not sample:
        raise ValueError("openvino-int8 calibration needs at least one non-empty corpus passage")
    model = SentenceTransformer(str(model_dir), device="cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    ir = ov.Core().read_model(str(fp32_path))
    names = [port.get_any_name() for port in ir.inputs]
    items = [{name: model.preprocess([text])[name].numpy().astype(np.int64) for name in names} for text in sample]
    # model_type TRANSFORMER: NNCF's transformer recipe (SmoothQuant on the MatMuls, softmax and layer norms kept in
    # float); preset PERFORMANCE: symmetric int8 activations, the fastest kernels.
    quantized = nncf.quantize(ir, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(items))
    int8_path = Path(int8_path)
    ov.save_model(quantized, str(int8_path), compress_to_fp16=False)
    recipe = {"method": "nncf.quantize (static post-training int8)", "model_type": "TRANSFORMER",
              "preset": "PERFORMANCE", "calibration_passages": len(sample),
              "calibration_of": len(calibration_texts), "sample": "evenly spaced through the corpus, each alone",
              "calibration_sha256_12": calibration_hash(calibration_texts), "max_seq_length": model.max_seq_length,
              "nncf": nncf.__version__, "openvino": ov.__version__}
    (int8_path.parent / CALIBRATION_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    return int8_path


def export_openvino(model_dir: str | Path, out_dir: str | Path | None = None,
                    calibration_texts: list[str] | None = None, max_seq_length: int = 0) -> dict[str, Path]:
    """Write ``<out_dir>/openvino_model.xml`` (+ ``.bin``) for the model in ``model_dir``, and with
    ``calibration_texts`` (corpus passages) its static int8 copy (:func:`quantize_openvino`).

    Returns ``{"fp32": path}`` plus ``{"int8": path}`` when calibrated. ``out_dir`` defaults to
    ``<model_dir>/openvino`` (where sentence-transformers looks).
    """
    _require_openvino()
    import openvino as ov

    from embtune.retrieval.onnx import export_onnx

    out_dir = Path(out_dir) if out_dir else Path(model_dir) / IR_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / FP32_FILE
    if not fp32_path.is_file():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            onnx_path = export_onnx(model_dir, tmp)["fp32"]
            ov.save_model(ov.convert_model(str(onnx_path)), str(fp32_path), compress_to_fp16=False)
    paths = {"fp32": fp32_path}
    if calibration_texts is not None:
        paths["int8"] = quantize_openvino(fp32_path, out_dir / INT8_FILE, model_dir, calibration_texts, max_seq_length)
    return paths


class OpenVINOEncoder(OnnxEncoder):
    """Encode texts with an OpenVINO IR of the transformer plus the model's own pooling/normalize modules.

    The same interface as :class:`OnnxEncoder` (``encode``, ``tokenizer``, ``max_seq_length``, ...).

    Args:
        model_dir: the SentenceTransformer folder (tokenizer and post-transformer modules come from it).
        ir_path: the ``.xml`` file; a relative path is taken from ``model_dir``.
        threads: OpenVINO inference threads (0 = its default, all cores).
        max_seq_length: truncate texts to this many tokens (0 = the model's own).
    """

    def __init__(self, model_dir: str | Path, ir_path: str | Path = BACKEND_FILES["openvino"], threads: int = 0,
                 max_seq_length: int = 0):
        _require_openvino()
        import openvino as ov
        from sentence_transformers import SentenceTransformer

        ir_path = Path(ir_path)
        if not ir_path.is_absolute():
            ir_path = Path(model_dir) / ir_path
        if not ir_path.is_file():
            raise FileNotFoundError(f"OpenVINO IR not found: {ir_path} "
                                    "(write it with embtune.retrieval.openvino.export_openvino)")
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        # f32: the CPU plugin's default on AMX/avx512_bf16 machines is bf16, which is not the fp32 model (and for the
        # int8 IR, its float parts). Streams: one per thread, each a single-threaded executor, and the runs of an
        # encode go to whichever stream is free (AsyncInferQueue). A run of 16 short texts is too small to split
        # across cores without the threads waiting on each other; whole runs in parallel cost less CPU per text
        # (scripts/bench_encode_speed.py, benchmarks/results/encode_speed.json). Every stream runs the same
        # single-threaded kernels, so a vector does not depend on which stream ran it, nor on ``threads``.
        self.streams = threads or len(os.sched_getaffinity(0)) or 1
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams,
                  "INFERENCE_NUM_THREADS": self.streams, "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = ov.Core().compile_model(str(ir_path), "CPU", config)
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.per_text = False
        self.threads = threads
        self.model_file = ir_path
        bin_path = ir_path.with_suffix(".bin")
        digest = hashlib.sha256(ir_path.read_bytes() + (bin_path.read_bytes() if bin_path.is_file() else b""))
        # Part of the embedding-cache file name: fp32 and int8 embeddings of one model never share a cache entry.
        self.cache_tag = f"openvino-{digest.hexdigest()[:12]}"

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, normalize_embeddings: bool = False,
               show_progress_bar: bool = False, **_: object) -> np.ndarray:
        """Embeddings of ``texts`` as float32 (len(texts), dim), in input order; each depends on its text alone.

        Texts are grouped by length bucket (see the module docstring) and run ``ROWS_PER_RUN`` at a time, so
        ``batch_size`` is unused (accepted like ``SentenceTransformer.encode``'s other keyword arguments).
        """
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        progress = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(texts), desc="Encoding")
        with self.lock:  # one encode at a time: the queue's callback and the request are the encoder's own
            # Tokenized once, a chunk at a time (the token arrays of a whole corpus would not fit): a text's bucket
            # depends on its own length only, so chunking changes nothing in what each text runs with.
            for start in range(0, len(texts), TOKENIZE_CHUNK):
                chunk = texts[start:start + TOKENIZE_CHUNK]
                features = self.model.preprocess(chunk)  # padded to the chunk's longest text
                tokens = {name: features[name].numpy().astype(np.int64) for name in self.input_names}
                lengths = features["attention_mask"].sum(1).numpy()  # (len(chunk),)
                self._encode_runs(tokens, self._runs(lengths), out[start:start + len(chunk)])
                if progress is not None:
                    progress.update(len(chunk))
        if progress is not None:
            progress.close()
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    @staticmethod
    def _runs(lengths: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(bucket, rows)`` runs: texts of one length bucket, ``ROWS_PER_RUN`` at most, longest bucket first."""
        buckets = -(-lengths // BUCKET_TOKENS) * BUCKET_TOKENS  # (n,) padded length of each text
        order = np.argsort(-buckets, kind="stable")  # longest bucket first, input order within a bucket
        runs = []
        for bucket in np.unique(buckets)[::-1]:
            rows = order[buckets[order] == bucket]
            runs += [(int(bucket), rows[i:i + ROWS_PER_RUN]) for i in range(0, len(rows), ROWS_PER_RUN)]
        return runs

    def _run_inputs(self, tokens: dict[str, np.ndarray], rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The model's inputs for ``rows`` of ``tokens``, padded (or cut: only padding lies past a text's own
        length) to ``length``: {name: (len(rows), length) int64}."""
        pad_id = self.tokenizer.pad_token_id or 0
        filled = {}
        for name, values in tokens.items():
            values = values[rows, :length]
            if values.shape[1] < length:
                padded = np.full((len(rows), length), pad_id if name == "input_ids" else 0, dtype=np.int64)
                padded[:, :values.shape[1]] = values
                values = padded
            filled[name] = np.ascontiguousarray(values)
        return filled

    def _encode_runs(self, tokens: dict[str, np.ndarray], runs, out: np.ndarray) -> None:
        """Run every ``(bucket, rows)`` run on the streams; pool each finished run into ``out[rows]`` while the next
        ones run, so at most a few runs' token states are held at once."""
        if len(runs) == 1:  # a lone query: no queue to fill
            bucket, rows = runs[0]
            inputs = self._run_inputs(tokens, rows, bucket)
            out[rows] = self._pool(inputs, self.request.infer(inputs)[self.compiled.output(0)])
            return
        done: dict[int, np.ndarray] = {}  # run index -> its token states, filled by OpenVINO's callback thread

        def finished(request, index: int) -> None:
            done[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # copied: the request is reused

        self.queue.set_callback(finished)
        inputs: dict[int, dict[str, np.ndarray]] = {}

        def pool_finished() -> None:
            for index in list(done):
                out[runs[index][1]] = self._pool(inputs.pop(index), done.pop(index))

        for index, (bucket, rows) in enumerate(runs):
            inputs[index] = self._run_inputs(tokens, rows, bucket)
            self.queue.start_async(inputs[index], index)  # waits for a free stream
            pool_finished()
        self.queue.wait_all()
        pool_finished()

    def _pool(self, inputs: dict[str, np.ndarray], hidden) -> np.ndarray:
        """The model's own modules after the transformer over its token states; (rows, dim)."""
        features = {name: torch.from_numpy(inputs[name]) for name in self.input_names}
        features["token_embeddings"] = torch.from_numpy(np.array(hidden, dtype=np.float32))  # (rows, length, hidden)
        with torch.no_grad():
            for module in list(self.model)[1:]:
                features = module(features)
        return features["sentence_embedding"].float().numpy()  # (rows, dim)
