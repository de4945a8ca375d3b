"""Export a SentenceTransformer's transformer to ONNX (fp32, and int8 dynamic-quantized) and encode with it.

sentence-transformers can do this itself (``SentenceTransformer(path, backend="onnx")`` and
``export_dynamic_quantized_onnx_model``), but both go through optimum, whose ONNX package (optimum-onnx 0.1.0)
pins transformers<4.58 and would downgrade the transformers 5 that training uses. So the export here uses
``torch.onnx.export``, onnxruntime's transformer graph optimizer and its own ``quantize_dynamic``, and writes the
layout sentence-transformers reads (``<model>/onnx/model.onnx``, inputs named after the tokenizer, output
``last_hidden_state``): where optimum is installed the same folder loads with ``backend="onnx"``.

Only the transformer goes to ONNX; pooling, normalization and any dense layers stay the model's own
sentence-transformers modules, run on the ONNX output, so they cannot drift from the torch model.

:class:`OnnxEncoder` batches texts by token length (longest first, each batch padded only to its own longest
text), or runs an int8 graph's texts one at a time (see ``OnnxEncoder.encode``), and returns the embeddings in input
order; ``embtune.retrieval.encoder.load_encoder(name, backend=...)`` is the one call that picks torch or ONNX.

Example::

    paths = export_onnx("runs/x/export/model", quantize=True)
    encoder = OnnxEncoder("runs/x/export/model", paths["int8"])
    embeddings = encoder.encode(["what is a transformer?"])  # (1, dim) float32
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"
# The ONNX file each ONNX backend runs, relative to the model folder.
BACKEND_FILES = {"onnx": f"{ONNX_DIR}/{FP32_FILE}", "onnx-int8": f"{ONNX_DIR}/{INT8_FILE}"}


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


ATTENTION_RECIPES = ("int8_after_first", "int8", "unfused")


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, num_heads: int = 0, hidden_size: int = 0,
                  attention: str = "int8_after_first") -> Path:
    """Write an int8 dynamic-quantized copy of an fp32 transformer graph (weights int8, activations at run time).

    The graph is first fused by onnxruntime's BERT optimizer (attention, layer norm, GELU), then its MatMuls and
    fused Attention ops (QKV projection) are quantized, per channel. ``attention``: ``int8_after_first`` leaves the
    first layer's Attention fp32 (its input is the embedding layer norm's output), ``int8`` quantizes every layer's,
    ``unfused`` leaves attention as separate ops (their MatMuls quantized). ``num_heads`` / ``hidden_size`` (the
    model config's) let the attention fusion match: with 0 the optimizer guesses them from the graph, and for
    all-MiniLM-L6-v2 it failed and left attention unfused.

    Why eager attention and this recipe: the graph exported through SDPA spends much of its time in a ``Where`` and
    an ``IsNaN`` over every attention matrix (transformers' SDPA masking); exported through eager attention, the
    optimizer can fuse attention and quantize it. Leaving the first layer's attention in fp32 kept the ranking
    closest to torch on the dev queries, and per-channel scales keep the vectors closer than per-tensor ones. The
    speeds and agreement of each recipe are in benchmarks/results/int8_recipes.json and encode_speed.json
    (scripts/bench_int8_recipes.py, scripts/bench_encode_speed.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if attention not in ATTENTION_RECIPES:
        raise ValueError(f"attention must be one of {ATTENTION_RECIPES}, got {attention!r}")
    options = FusionOptions("bert")
    options.enable_attention = attention != "unfused"
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as tmp:
        fused_path = Path(tmp) / "fused.onnx"
        # Fusion is pattern matching: a graph it does not recognise stays as it was, still correct.
        fused = optimize_model(str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=1, optimization_options=options)
        logger.info("fused operators: %s", fused.get_fused_operator_statistics())
        fused.save_model_to_file(str(fused_path))
        fused_attention = [node.name for node in fused.get_nodes_by_op_type("Attention")]  # in graph order
        # The fused graph has contrib ops (Attention, SkipLayerNormalization) that ONNX shape inference cannot
        # type; their outputs are float32.
        quantize_dynamic(str(fused_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Attention"],
                         nodes_to_exclude=fused_attention[:1] if attention == "int8_after_first" else [],
                         extra_options={"DefaultTensorType": 1})
    return int8_path


def export_onnx(model_dir: str | Path, out_dir: str | Path | None = None, quantize: bool = False,
                opset: int = 17) -> dict[str, Path]:
    """Write ``<out_dir>/model.onnx`` (and ``model_qint8.onnx`` when ``quantize``) for the model in ``model_dir``.

    Args:
        model_dir: a SentenceTransformer folder whose first module is a Hugging Face ``Transformer``.
        out_dir: where to write; default ``<model_dir>/onnx`` (where sentence-transformers looks).
        quantize: also write an int8 dynamic-quantized copy (:func:`quantize_int8`).
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
    # Eager attention traces to an additive mask that onnxruntime's optimizer fuses into one Attention op; the SDPA
    # path traces to a Where/IsNaN over every attention matrix (a quarter of the int8 graph's time, unfusable).
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("eager")
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
        config = hf_model.config
        paths["int8"] = quantize_int8(fp32_path, out_dir / INT8_FILE, getattr(config, "num_attention_heads", 0),
                                      getattr(config, "hidden_size", 0))
        logger.info("wrote int8 dynamic-quantized copy %s", paths["int8"])
    return paths


def onnx_file_for(model_dir: str | Path, backend: str, export_dir: str | Path) -> Path:
    """The ONNX file ``backend`` runs for ``model_dir``: the folder's own ``onnx/`` file when it has one, else one
    exported once into ``export_dir`` (written to a temporary folder and renamed, so concurrent callers never read
    a half-written file)."""
    if backend not in BACKEND_FILES:
        raise ValueError(f"unknown ONNX backend {backend!r}; expected one of {sorted(BACKEND_FILES)}")
    relative = Path(BACKEND_FILES[backend])
    own = Path(model_dir) / relative
    if own.is_file():
        return own
    export_dir = Path(export_dir)
    target = export_dir / relative.name
    if not target.is_file():
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=export_dir.name + ".", dir=export_dir.parent))
        try:
            export_onnx(model_dir, tmp, quantize=backend == "onnx-int8")
            if export_dir.exists():  # an earlier export without the int8 file, or a concurrent one
                for file in tmp.iterdir():
                    os.replace(file, export_dir / file.name)
            else:
                os.replace(tmp, export_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_dynamic_quantized(onnx_path: str | Path) -> bool:
    """Whether the graph quantizes activations at run time (``DynamicQuantizeLinear``, what ``quantize_dynamic``
    writes): its outputs then depend on everything in the input tensor, other texts of a batch included."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


class OnnxEncoder:
    """Encode texts with an exported ONNX transformer plus the model's own pooling/normalize modules.

    Drop-in for the part of ``SentenceTransformer`` the encoders use (``encode``, ``tokenizer``,
    ``max_seq_length``, ``similarity_fn_name``, ``get_embedding_dimension``).

    Args:
        model_dir: the SentenceTransformer folder (tokenizer and post-transformer modules come from it).
        onnx_path: the ONNX file; a relative path is taken from ``model_dir``.
        threads: onnxruntime intra-op threads (0 = its default, all cores).
        max_seq_length: truncate texts to this many tokens (0 = the model's own).
    """

    def __init__(self, model_dir: str | Path, onnx_path: str | Path = BACKEND_FILES["onnx"], threads: int = 0,
                 max_seq_length: int = 0):
        _require_onnxruntime()
        import onnxruntime as ort
        from sentence_transformers import SentenceTransformer

        from embtune.manifest import hash_path

        onnx_path = Path(onnx_path)
        if not onnx_path.is_absolute():
            onnx_path = Path(model_dir) / onnx_path
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {onnx_path} "
                                    "(write it with embtune.retrieval.onnx.export_onnx)")
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        # A dynamic-quantized graph takes each run's activation range over the whole input tensor, so a text's
        # vector would depend on the texts batched (and padded) with it: the same corpus encoded in another order,
        # by another engine or in shards of another size would differ. Such a graph runs one text per run, no
        # padding, on `threads` runs side by side (one onnxruntime thread each): a vector is its text's alone.
        self.per_text = is_dynamic_quantized(onnx_path)
        self.threads = threads or os.cpu_count() or 1
        options = ort.SessionOptions()
        if threads or self.per_text:
            options.intra_op_num_threads = 1 if self.per_text else threads
            options.inter_op_num_threads = 1  # the graph runs sequentially; a second pool only adds threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.onnx_path = onnx_path
        # Part of the embedding-cache file name (embtune.retrieval.encoder.encode): fp32 and int8 embeddings of
        # one model, or of two quantization recipes, never share a cache entry.
        self.cache_tag = f"onnx-{hash_path(onnx_path)[:12]}"

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @property
    def similarity_fn_name(self) -> str | None:
        return self.model.similarity_fn_name

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        """Tokens per text after truncation to ``max_seq_length`` (special tokens included): the bucketing key."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, normalize_embeddings: bool = False,
               show_progress_bar: bool = False, **_: object) -> np.ndarray:
        """Embeddings of ``texts`` as float32, shape (len(texts), dim), in input order.

        Texts are batched longest first by token length, so each batch pads to nearly its own length; the model's
        own ``preprocess`` tokenizes each batch (padding to the batch's longest text), so ONNX sees what torch
        would. A dynamic-quantized graph (``per_text``) runs each text alone instead, so its vector does not depend
        on the others (``batch_size`` is then unused). Extra keyword arguments of ``SentenceTransformer.encode`` are
        accepted and ignored.
        """
        dim = self.get_embedding_dimension()
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if not texts:
            return out
        if self.per_text:
            self._encode_per_text(texts, out, show_progress_bar)
        else:
            self._encode_batched(texts, out, batch_size, show_progress_bar)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _embed(self, features: dict) -> np.ndarray:
        """Run the graph on one tokenized batch, then the model's own pooling, dense and normalize modules."""
        feeds = {name: features[name].numpy().astype(np.int64, copy=False) for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)  # (batch, seq, hidden)
        features["token_embeddings"] = torch.from_numpy(hidden)
        for module in list(self.model)[1:]:
            features = module(features)
        return features["sentence_embedding"].float().numpy()  # (batch, dim)

    def _encode_per_text(self, texts: list[str], out: np.ndarray, progress: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        chunk = 256
        starts = range(0, len(texts), chunk)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches")
        threads = min(self.threads, len(texts))
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            run = pool.map if pool is not None else map  # one text (a served query): no pool to start
            for start in starts:
                # Tokenized here, in one thread: the fast tokenizer's settings are state that concurrent calls share.
                features = [self.model.preprocess([text]) for text in texts[start:start + chunk]]
                for row, vector in enumerate(run(self._embed, features), start):
                    out[row] = vector[0]

    def _encode_batched(self, texts: list[str], out: np.ndarray, batch_size: int, progress: bool) -> None:
        order = np.argsort(-self.token_lengths(texts), kind="stable")  # longest first, ties in input order
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches")
        for start in starts:
            rows = order[start:start + batch_size]
            out[rows] = self._embed(self.model.preprocess([texts[i] for i in rows]))  # back to input positions
