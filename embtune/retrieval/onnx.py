"""Export a SentenceTransformer's transformer to ONNX (optionally int8 dynamic-quantized) and encode with it.

sentence-transformers can do this itself (``SentenceTransformer(path, backend="onnx")`` and
``export_dynamic_quantized_onnx_model``), but both go through optimum, whose ONNX package (optimum-onnx 0.1.0)
pins transformers<4.58 and would downgrade the transformers 5 that training uses. So the export here uses
``torch.onnx.export`` and onnxruntime's own ``quantize_dynamic``, and writes the layout sentence-transformers
reads (``<model>/onnx/model.onnx``, inputs named after the tokenizer, output ``last_hidden_state``): where
optimum is installed the same folder loads with ``backend="onnx"``.

Only the transformer goes to ONNX; pooling, normalization and any dense layers stay the model's own
sentence-transformers modules, run on the ONNX output, so they cannot drift from the torch model.

Example::

    paths = export_onnx("runs/x/export/model", quantize=True)
    encoder = OnnxEncoder("runs/x/export/model", paths["int8"])
    embeddings = encoder.encode(["what is a transformer?"])  # (1, dim) float32
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"


class _LastHiddenState(torch.nn.Module):
    """The Hugging Face model called with keyword inputs, returning only last_hidden_state (what ONNX exports)."""

    def __init__(self, hf_model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.hf_model = hf_model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.hf_model(**dict(zip(self.input_names, inputs))).last_hidden_state  # (batch, seq, hidden)


def _require_onnxruntime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the PyPI packages onnx and onnxruntime: "
                          "pip install onnx onnxruntime") from None


def export_onnx(model_dir: str | Path, out_dir: str | Path | None = None, quantize: bool = False,
                opset: int = 17) -> dict[str, Path]:
    """Write ``<out_dir>/model.onnx`` (and ``model_qint8.onnx`` when ``quantize``) for the model in ``model_dir``.

    Args:
        model_dir: a SentenceTransformer folder whose first module is a Hugging Face ``Transformer``.
        out_dir: where to write; default ``<model_dir>/onnx`` (where sentence-transformers looks).
        quantize: also write an int8 dynamic-quantized copy (weights int8, activations quantized at run time).
        opset: ONNX opset.

    Returns:
        ``{"fp32": path}`` plus ``{"int8": path}`` when quantized.
    """
    _require_onnxruntime()
    from sentence_transformers import SentenceTransformer

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir / ONNX_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(str(model_dir), device="cpu")
    hf_model = model[0].auto_model.eval()
    tokenizer = model.tokenizer
    input_names = list(tokenizer.model_input_names)

    # The sample batch must contain padding: with an all-ones mask transformers skips the attention mask,
    # and the trace would bake that shortcut into the graph.
    sample = tokenizer(["a short one", "a somewhat longer sample sentence for tracing the graph"],
                       padding=True, return_tensors="pt")
    assert bool((sample["attention_mask"] == 0).any()), "tracing batch must be padded"
    args = tuple(sample[name] for name in input_names)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes["last_hidden_state"] = {0: "batch", 1: "sequence"}

    fp32_path = out_dir / FP32_FILE
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about Python branches on tensor shapes in transformers' masking code; tests check that the
        # graph gives torch's embeddings for padded batches and single texts alike.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # dynamo=False: the torch.export-based exporter needs onnxscript and does not trace transformers 5's
        # masking code as reliably; the TorchScript exporter covers BERT-style encoders.
        torch.onnx.export(_LastHiddenState(hf_model, input_names), args, str(fp32_path), input_names=input_names,
                          output_names=["last_hidden_state"], dynamic_axes=dynamic_axes, opset_version=opset,
                          dynamo=False)
    paths = {"fp32": fp32_path}
    logger.info("exported %s to %s", model_dir, fp32_path)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = out_dir / INT8_FILE
        # Per-channel weight scales: per-tensor int8 drops MiniLM's worst-case cosine to torch from 0.98 to 0.91.
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
        paths["int8"] = int8_path
        logger.info("wrote int8 dynamic-quantized copy %s", int8_path)
    return paths


class OnnxEncoder:
    """Encode texts with an exported ONNX transformer plus the model's own pooling/normalize modules.

    Args:
        model_dir: the SentenceTransformer folder (tokenizer and post-transformer modules come from it).
        onnx_path: the ONNX file; a relative path is taken from ``model_dir``.
        threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(self, model_dir: str | Path, onnx_path: str | Path = f"{ONNX_DIR}/{FP32_FILE}", threads: int = 0):
        _require_onnxruntime()
        import onnxruntime as ort
        from sentence_transformers import SentenceTransformer

        onnx_path = Path(onnx_path)
        if not onnx_path.is_absolute():
            onnx_path = Path(model_dir) / onnx_path
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {onnx_path} (write it with embtune.retrieval.onnx.export_onnx)")
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = self.model.tokenizer
        self.max_seq_length = self.model.max_seq_length

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of ``texts`` as float32, shape (len(texts), dim), in input order."""
        out = []
        for start in range(0, len(texts), batch_size):
            features = self.model.preprocess(texts[start:start + batch_size])
            feeds = {name: features[name].numpy().astype(np.int64) for name in self.input_names}
            (hidden,) = self.session.run(["last_hidden_state"], feeds)  # (batch, seq, hidden)
            features["token_embeddings"] = torch.from_numpy(hidden)
            for module in list(self.model)[1:]:  # pooling, dense, normalize: the model's own modules
                features = module(features)
            out.append(features["sentence_embedding"].float().numpy())  # (batch, dim)
        return np.concatenate(out) if out else np.zeros((0, self.get_embedding_dimension()), dtype=np.float32)
