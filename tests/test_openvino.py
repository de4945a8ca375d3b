"""The openvino (fp32 IR) and openvino-int8 (NNCF static int8) backends: they embed like torch, a vector depends on
its text alone, the int8 IR records its calibration, and export -> bundle -> server runs the bundle's IR.

The Ray engine's openvino-int8 shards are checked against one process in tests/test_scale.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer

pytest.importorskip("openvino", reason="the openvino backends need openvino and nncf: pip install openvino nncf")
pytest.importorskip("nncf", reason="the openvino backends need openvino and nncf: pip install openvino nncf")

from embtune.retrieval.openvino import (  # noqa: E402
    BACKEND_FILES,
    CALIBRATION_FILE,
    OpenVINOEncoder,
    calibration_sample,
    export_openvino,
)
from tests.test_onnx_export import TEXTS  # noqa: E402

# Calibration passages for the tiny model: its vocabulary's topic words (tests/conftest.py builds it from them).
CORPUS = [f"{a} {b} {c}" for a, b, c in zip(TEXTS * 6, TEXTS[1:] * 6, TEXTS[2:] * 6)]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model with both IRs in its own openvino/ folder."""
    model_dir = tmp_path_factory.mktemp("ov") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    paths = export_openvino(model_dir, calibration_texts=CORPUS)
    return model_dir, paths


def _cosines(model_dir, got):
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    return (got * expected).sum(1)  # both normalized: (n,)


def test_fp32_ir_embeds_as_torch(exported):
    model_dir, paths = exported
    got = OpenVINOEncoder(model_dir, paths["fp32"]).encode(TEXTS, normalize_embeddings=True)
    assert 1 - _cosines(model_dir, got).min() < 1e-5


def test_int8_ir_embeds_close_to_torch_and_records_its_calibration(exported):
    model_dir, paths = exported
    got = OpenVINOEncoder(model_dir, paths["int8"]).encode(TEXTS, normalize_embeddings=True)
    fp32 = OpenVINOEncoder(model_dir, paths["fp32"]).encode(TEXTS, normalize_embeddings=True)
    assert _cosines(model_dir, got).min() >= 0.98
    assert np.abs(got - fp32).max() > 1e-5  # it is quantized, else the bound above proves nothing
    recipe = json.loads((paths["int8"].parent / CALIBRATION_FILE).read_text())
    assert recipe["calibration_passages"] == len(calibration_sample(CORPUS)) and recipe["preset"] == "PERFORMANCE"


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_a_vector_depends_only_on_its_text(exported, which):
    """Any order, split, batch size or set of batch mates gives the same bits (the Ray engine relies on it)."""
    model_dir, paths = exported
    encoder = OpenVINOEncoder(model_dir, paths[which], threads=1)
    texts = TEXTS * 3 + CORPUS[:20]
    whole = encoder.encode(texts, batch_size=4)  # (n, dim)
    np.testing.assert_array_equal(whole, encoder.encode(texts[::-1], batch_size=64)[::-1])
    np.testing.assert_array_equal(whole, np.concatenate([encoder.encode(texts[:5]), encoder.encode(texts[5:])]))
    np.testing.assert_array_equal(whole, np.concatenate([encoder.encode([t]) for t in texts]))
    other = OpenVINOEncoder(model_dir, paths[which], threads=2)
    np.testing.assert_array_equal(whole, other.encode(texts))


def test_load_encoder_converts_once_and_int8_needs_a_corpus(tiny_model_dir, tmp_path, monkeypatch):
    from embtune.retrieval.encoder import LOADED_AS, encode, load_encoder, openvino_export_dir

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="openvino-int8.*calibration_texts"):
        load_encoder(str(tiny_model_dir), backend="openvino-int8")
    model, key = load_encoder(str(tiny_model_dir), backend="openvino-int8", calibration_texts=CORPUS, threads=1)
    assert not (tiny_model_dir / "openvino").exists()  # the model folder (and its content hash) is left alone
    assert model.model_file.parent == openvino_export_dir(str(tiny_model_dir), CORPUS)
    assert vars(model)[LOADED_AS]["model_file"] == str(model.model_file)  # what a Ray worker loads
    again, _ = load_encoder(str(tiny_model_dir), backend="openvino-int8", model_file=str(model.model_file))
    np.testing.assert_array_equal(encode(model, TEXTS), encode(again, TEXTS))
    assert key == load_encoder(str(tiny_model_dir))[1]  # one model key; the backend's tag goes into the file name
    fp32, _ = load_encoder(str(tiny_model_dir), backend="openvino")
    assert fp32.cache_tag != model.cache_tag and fp32.cache_tag.startswith("openvino-")


def test_backend_config_keys_accept_openvino():
    from embtune.schema import load_config

    cfg = load_config(None, ["data.path=/x", "eval.backend=openvino-int8"])
    assert cfg.eval.backend == "openvino-int8"


def test_int8_bundle_stores_the_ir_and_the_server_runs_it(tiny_model_dir, tmp_path):
    """build_bundle(backend="openvino-int8") calibrates on the bundle's documents, writes the IR under
    model/openvino/, embeds the index with it and records the backend; the server on that backend encodes with
    the bundle's IR (the same vectors as the bundle's index)."""
    from embtune.sections.serve import ServeConfig
    from embtune.serve.app import create_app
    from embtune.serve.bundle import build_bundle, load_bundle

    docs = [{"_id": str(i), "text": text} for i, text in enumerate(TEXTS)]
    bundle_dir = build_bundle(tiny_model_dir, docs, tmp_path / "bundle", backend="openvino-int8")
    ir = bundle_dir / "model" / BACKEND_FILES["openvino-int8"]
    assert ir.is_file() and (ir.parent / CALIBRATION_FILE).is_file()
    assert json.loads((bundle_dir / "manifest.json").read_text())["encoder_backend"] == "openvino-int8"
    bundle = load_bundle(bundle_dir, backend="openvino-int8", threads=1)
    assert isinstance(bundle.model, OpenVINOEncoder) and bundle.model.model_file == ir
    index_vectors = bundle.index.reconstruct_n(0, len(TEXTS))  # (n, dim): what export embedded
    with TestClient(create_app(bundle_dir, ServeConfig(threads=1))) as client:
        response = client.post("/v1/embeddings", json={"input": TEXTS})
        assert response.status_code == 200, response.text
        served = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert client.get("/health").json()["backend"] == "openvino-int8"
    np.testing.assert_allclose(served, index_vectors, atol=1e-6)


@pytest.mark.slow
def test_minilm_ir_matches_torch(tmp_path):
    """MiniLM: fp32 IR to ~1e-5 cosine of torch, int8 >= 0.98; an int8 vector is its text's alone. (Padding a text
    to a longer length left its bits unchanged here too, so no control shows the bucketing is needed; it is kept
    because nothing promises the kernels stay so.)"""
    from embtune.models import resolve_model

    model_dir = tmp_path / "minilm"
    shutil.copytree(resolve_model("minilm"), model_dir)
    paths = export_openvino(model_dir, calibration_texts=CORPUS + TEXTS)
    fp32 = OpenVINOEncoder(model_dir, paths["fp32"]).encode(TEXTS, normalize_embeddings=True)
    assert 1 - _cosines(model_dir, fp32).min() < 1e-5
    int8 = OpenVINOEncoder(model_dir, paths["int8"], threads=2)
    got = int8.encode(TEXTS, normalize_embeddings=True)
    assert _cosines(model_dir, got).min() >= 0.98
    alone = np.concatenate([int8.encode([t], normalize_embeddings=True) for t in TEXTS])
    np.testing.assert_array_equal(got, alone)
