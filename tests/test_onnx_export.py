"""ONNX export: the exported model embeds like the torch model (fp32 exactly, int8 within a measured tolerance).

Reference numbers (2026-11-30, onnxruntime 1.32.0, CPU): all-MiniLM-L6-v2 fp32 max |diff| 1.8e-7; int8 (eager
attention export, fused graph, MatMuls and Attention dynamic-quantized with per-channel weights) worst cosine 0.976
over the short texts below (the same as the earlier recipe that quantized MatMuls only). Thresholds leave room for
other CPUs' kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import BertConfig, BertModel, BertTokenizerFast

pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime and onnx: pip install onnx onnxruntime")
pytest.importorskip("onnx", reason="ONNX export needs onnxruntime and onnx: pip install onnx onnxruntime")

from embtune.retrieval.onnx import OnnxEncoder, export_onnx  # noqa: E402
from embtune.sections.serve import ServeConfig  # noqa: E402
from embtune.serve.app import create_app  # noqa: E402
from embtune.serve.bundle import build_bundle  # noqa: E402

WORDS = "the a of and to in is for on with cat dog fish river city train music model search index query".split()
# Different lengths on purpose: a batch of them is padded, which is what the exported attention mask must handle.
TEXTS = [
    "the cat",
    "a dog in the river and the city on the train with music",
    "x",
    "search the index for the query",
    "How do I fine-tune an embedding model for retrieval on my own corpus of support tickets?",
    "faiss inner product index over normalized vectors",
    "Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32, ~90-token WordPiece vocabulary) with mean pooling and normalization."""
    root = tmp_path_factory.mktemp("tiny_onnx")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(root / "hf")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(root / "hf")
    model = SentenceTransformer(modules=[Transformer(str(root / "hf")), Pooling(32, "mean"), Normalize()],
                                device="cpu")
    model.max_seq_length = 64
    model.save(str(root / "st"))
    return root / "st"


def _compare(model_dir, onnx_path):
    """(worst cosine, max |diff|) of ONNX vs torch embeddings, batched and one text at a time."""
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    encoder = OnnxEncoder(model_dir, onnx_path)
    batched = encoder.encode(TEXTS)  # (n, dim)
    single = np.concatenate([encoder.encode([text]) for text in TEXTS])  # (n, dim), no padding
    worst_cos, max_diff = 1.0, 0.0
    for got in (batched, single):
        got = got / np.linalg.norm(got, axis=1, keepdims=True)
        worst_cos = min(worst_cos, float((got * expected).sum(1).min()))
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
    return worst_cos, max_diff


def test_tiny_fp32_and_int8_match_torch(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    paths = export_onnx(model_dir, quantize=True)
    assert paths["fp32"] == model_dir / "onnx" / "model.onnx" and paths["int8"].is_file()

    cos, diff = _compare(model_dir, paths["fp32"])
    assert cos > 0.9999 and diff < 1e-4, (cos, diff)
    cos, diff = _compare(model_dir, paths["int8"])
    assert cos > 0.98, cos



def test_int8_graph_has_fused_quantized_attention(tiny_model_dir, tmp_path):
    """The speed recipe (embtune.retrieval.onnx.quantize_int8): attention exported eagerly fuses into one op per
    layer, quantized after the first; the SDPA export left a Where over every attention matrix, a quarter of the run
    time."""
    import onnx

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    paths = export_onnx(model_dir, quantize=True)
    ops = [node.op_type for node in onnx.load(str(paths["int8"])).graph.node]
    assert ops.count("QAttention") == 1 and ops.count("Attention") == 1  # the first layer's stays fp32
    assert "Where" not in ops and "IsNaN" not in ops


@pytest.mark.slow
def test_minilm_fp32_and_int8_match_torch(tmp_path):
    from embtune.models import resolve_model

    model_dir = tmp_path / "minilm"
    shutil.copytree(resolve_model("minilm"), model_dir)
    paths = export_onnx(model_dir, quantize=True)
    cos, diff = _compare(model_dir, paths["fp32"])
    assert cos > 0.9999 and diff < 1e-4, (cos, diff)
    cos, diff = _compare(model_dir, paths["int8"])
    assert cos > 0.97, cos  # measured 0.976


def test_server_with_onnx_backend_matches_torch(tiny_model_dir, tmp_path):
    # The index embedded by the backend that serves it (another one is refused: tests/test_parity_settings.py).
    bundle = build_bundle(tiny_model_dir, [{"_id": "a", "text": "the cat"}, {"_id": "b", "text": "a dog"}],
                          tmp_path / "bundle", device="cpu", backend="onnx")
    expected = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(TEXTS[:3], normalize_embeddings=True)
    with TestClient(create_app(bundle, ServeConfig(backend="onnx"))) as client:
        response = client.post("/v1/embeddings", json={"input": TEXTS[:3]})
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert client.post("/search", json={"query": "a dog", "k": 1}).json()["hits"][0]["id"] == "b"
        assert client.get("/health").json()["backend"] == "onnx"


def test_missing_onnx_file_names_the_path(tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        OnnxEncoder(tiny_model_dir, "onnx/nope.onnx")


# --- the core encoder's backends (embtune.retrieval.encoder.load_encoder / encode) ---------------------------------


def _torch_embeddings(model_dir, texts):
    return SentenceTransformer(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True)


def test_bucketing_restores_input_order(tiny_model_dir, tmp_path):
    """Batches go longest first; each embedding must come back at its text's position. TEXTS is not in length
    order, so a missed restore would put another text's embedding (cosine far from 1) in the row."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    export_onnx(model_dir)
    encoder = OnnxEncoder(model_dir)
    lengths = encoder.token_lengths(TEXTS)
    assert list(np.argsort(-lengths, kind="stable")) != list(range(len(TEXTS)))  # bucketing does reorder
    got = encoder.encode(TEXTS, batch_size=2)  # (n, dim), 4 batches
    expected = _torch_embeddings(model_dir, TEXTS)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    alone = np.concatenate([encoder.encode([text]) for text in TEXTS])  # no padding, no reordering
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_int8_vector_is_its_text_alone(tiny_model_dir, tmp_path):
    """Dynamic int8 takes a run's activation range over the whole input, so batched texts would move each other's
    vectors (the Ray engine's shards then differed from one process's encode). The int8 graph runs each text on
    its own: any order, batch size, thread count or split of the corpus gives the same bits."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    paths = export_onnx(model_dir, quantize=True)
    int8 = OnnxEncoder(model_dir, paths["int8"], threads=2)
    assert int8.per_text and not OnnxEncoder(model_dir, paths["fp32"]).per_text
    texts = TEXTS * 3
    whole = int8.encode(texts, batch_size=4)  # (n, dim)
    np.testing.assert_array_equal(whole, int8.encode(texts[::-1], batch_size=64)[::-1])
    split = np.concatenate([int8.encode(texts[:5]), int8.encode(texts[5:])])
    np.testing.assert_array_equal(whole, split)
    one_thread = OnnxEncoder(model_dir, paths["int8"], threads=1)
    np.testing.assert_array_equal(whole, np.concatenate([one_thread.encode([t]) for t in texts]))
    # What per-text running prevents: the graph fed a padded batch gives other vectors for the same texts.
    int8.per_text = False
    assert np.abs(int8.encode(texts, batch_size=len(texts)) - whole).max() > 1e-6


@pytest.mark.parametrize("backend, min_cos", [("onnx", 0.9999), ("onnx-int8", 0.98)])
def test_load_encoder_backends_match_torch(tiny_model_dir, tmp_path, monkeypatch, backend, min_cos):
    """load_encoder(backend=...) exports a folder without onnx/ once into the cache and embeds like torch
    (fp32 to rounding; int8 within the measured quantization error)."""
    from embtune.retrieval.encoder import encode, load_encoder, onnx_export_dir

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    model, key = load_encoder(str(tiny_model_dir), backend=backend, threads=1)
    assert not (tiny_model_dir / "onnx").exists()  # the model folder (and its content hash) is left alone
    assert onnx_export_dir(str(tiny_model_dir)).is_dir()
    got = encode(model, TEXTS, batch_size=3)
    cos = (got * _torch_embeddings(tiny_model_dir, TEXTS)).sum(1)
    assert cos.min() > min_cos, (backend, cos.min())
    torch_model, torch_key = load_encoder(str(tiny_model_dir))
    assert key == torch_key  # one model key; the backend's tag goes into the cache file name


def test_cache_never_mixes_backends(tiny_model_dir, tmp_path, monkeypatch):
    """torch and int8 embeddings of the same model and texts under the same key: two cache files, and the int8
    encoder gets its own embeddings back, not torch's."""
    from embtune.retrieval.encoder import cache_dir, encode, load_encoder

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    torch_model, key = load_encoder(str(tiny_model_dir))
    int8_model, int8_key = load_encoder(str(tiny_model_dir), backend="onnx-int8")
    assert key == int8_key
    from_torch = encode(torch_model, TEXTS, cache_key=key)
    from_int8 = encode(int8_model, TEXTS, cache_key=key)
    assert len(list(cache_dir().glob("*.npy"))) == 2
    # int8 differs from fp32 (measured 1e-4 here; fp32 ONNX vs torch is ~1e-7), else this test would prove nothing
    assert np.abs(from_int8 - from_torch).max() > 2e-5
    np.testing.assert_array_equal(from_int8, encode(int8_model, TEXTS))  # what int8 computes without a cache
    np.testing.assert_array_equal(encode(int8_model, TEXTS, cache_key=key), from_int8)  # a cache hit, its own
    np.testing.assert_array_equal(encode(torch_model, TEXTS, cache_key=key), from_torch)


def test_unknown_backend_is_refused(tiny_model_dir):
    from embtune.retrieval.encoder import load_encoder

    with pytest.raises(ValueError, match="unknown encoder backend 'onnx-fp16'.*'onnx-int8'"):
        load_encoder(str(tiny_model_dir), backend="onnx-fp16")


def test_int8_bundle_is_built_and_served_with_int8(tiny_model_dir, tmp_path):
    """build_bundle(backend="onnx-int8") writes the ONNX files, embeds the index with them and says so in the
    manifest; load_bundle on the same backend finds each document by its own text."""
    import json

    from embtune.serve.bundle import load_bundle

    docs = [{"_id": str(i), "text": text} for i, text in enumerate(TEXTS)]
    bundle_dir = build_bundle(tiny_model_dir, docs, tmp_path / "bundle", backend="onnx-int8")
    assert (bundle_dir / "model" / "onnx" / "model_qint8.onnx").is_file()
    assert json.loads((bundle_dir / "manifest.json").read_text())["encoder_backend"] == "onnx-int8"
    bundle = load_bundle(bundle_dir, backend="onnx-int8", threads=1)
    _, indices = bundle.index.search(bundle.encode(TEXTS), 1)
    assert indices[:, 0].tolist() == list(range(len(TEXTS)))


def test_backend_settings_are_config_keys(tiny_model_dir, tmp_path, monkeypatch):
    """eval.backend picks the encoder eval measures with; a wrong value names the key and the choices."""
    from embtune.config import ConfigError
    from embtune.eval.run import load_encoder as eval_encoder
    from embtune.schema import load_config

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.path=/x", "eval.backend=onnx-int8", "eval.threads=1", "export.backend=onnx"])
    assert (cfg.eval.backend, cfg.export.backend) == ("onnx-int8", "onnx")
    assert isinstance(eval_encoder(str(tiny_model_dir), cfg), OnnxEncoder)
    for key in ("eval.backend", "export.backend"):
        with pytest.raises(ConfigError, match=rf"{key}.*'onnx-int8'"):
            load_config(None, ["data.path=/x", f"{key}=tensorrt"])
    assert ServeConfig(backend="onnx-int8").onnx_file == ""  # "" = the backend's own file


def test_export_stage_indexes_with_its_backend(tiny_model_dir, tiny_beir, tmp_path):
    """export.backend=onnx-int8: the export stage writes both ONNX files, embeds the bundle's index with int8 and
    records it; serving the bundle on that backend finds a document by its own text."""
    import json

    from embtune.schema import load_config
    from embtune.serve.bundle import load_bundle
    from embtune.serve.export import run as export_run

    run_dir = tmp_path / "run"
    results = tmp_path / "results.json"
    row = dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"), 0.5)
    results.write_text(json.dumps({"split": "test", "results": {"finetuned": {**row, "dims": {"32": row}}}}))
    for stage, outputs in {"data_prep": {"eval_dataset": str(tiny_beir)}, "train": {"model": str(tiny_model_dir)},
                           "eval": {"results": str(results)}}.items():
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "manifest.json").write_text(json.dumps({"outputs": outputs}))
    cfg = load_config(None, [f"data.path={tiny_beir}", f"run_dir={run_dir}", "export.backend=onnx-int8"])
    bundle_dir = Path(export_run(cfg)["bundle"])
    assert sorted(p.name for p in (bundle_dir / "model" / "onnx").iterdir()) == ["model.onnx", "model_qint8.onnx"]
    assert json.loads((bundle_dir / "manifest.json").read_text())["encoder_backend"] == "onnx-int8"
    bundle = load_bundle(bundle_dir, backend="onnx-int8", threads=1)
    first = bundle.docs[0]
    _, indices = bundle.index.search(bundle.encode([(first.get("title", "") + " " + first["text"]).strip()]), 1)
    assert indices[0, 0] == 0
