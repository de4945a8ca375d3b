"""Config section owned by the serve stage: ``export``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ExportConfig:
    """Bundle the fine-tuned model with its metrics and a model card."""

    out_dir: str = ""  # default: <run_dir>/bundle (the export stage keeps its manifest in <run_dir>/export)
    model_name: str = "embtune-model"
    index: bool = True  # embed the eval corpus into a FAISS index inside the bundle
    onnx: bool = False  # also write model/onnx/model.onnx (needs onnx + onnxruntime)
    onnx_int8: bool = False  # and a dynamic int8-quantized model_qint8.onnx (written with model.onnx)
    # Encoder that embeds the index corpus (embtune/retrieval/encoder.py); serve the bundle with the same
    # serve.backend. The ONNX backends write the ONNX file they need whatever export.onnx says.
    backend: Literal["torch", "onnx", "onnx-int8"] = "torch"
