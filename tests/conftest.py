"""Shared fixtures: a tiny BERT sentence-transformer built offline, and a tiny BEIR dataset.

The model is built once per session; tests that train copy its folder first.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = {
    "astronomy": "star planet orbit telescope galaxy comet nebula moon solar light",
    "cooking": "recipe oven flour butter sugar bake dough salt pan kitchen",
    "medicine": "patient dose vaccine trial disease cell clinical therapy immune drug",
    "finance": "market stock bond interest bank loan price inflation fund trade",
    "music": "guitar melody chord rhythm song piano concert tempo note band",
    "sport": "team goal match ball coach score player league season run",
}
FILLER = "the a of and in to with for on is are was by from that this".split()


def _vocab() -> list[str]:
    words = sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[f"w{i}" for i in range(64)]]


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary, mean pooling and normalization."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    # transformers 5 ignores ``vocab_file=`` here (the tokenizer came out with only its 5 special tokens, so every
    # word was [UNK] and every text embedded alike); the vocabulary is passed as a mapping instead.
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(_vocab())}, do_lower_case=True)
    config = BertConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    out = folder / "model"
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def build_tiny_beir(folder: Path, docs_per_topic: int = 12, seed: int = 0) -> Path:
    """A BEIR folder whose queries name a topic's words; each query's positive is one document of that topic."""
    rng = random.Random(seed)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = [], [], {"train": [], "test": []}
    for t, (topic, words) in enumerate(TOPICS.items()):
        vocab = words.split()
        for i in range(docs_per_topic):
            doc_id = f"{topic}-{i}"
            text = " ".join(rng.choice(vocab + FILLER) for _ in range(30))
            docs.append({"_id": doc_id, "title": topic, "text": text})
            query_words = [w for w in text.split() if w not in FILLER][:5] or vocab[:3]
            query_id = f"q-{topic}-{i}"
            queries.append({"_id": query_id, "text": " ".join(query_words)})
            qrels["test" if i % 4 == 0 else "train"].append((query_id, doc_id))
    with open(folder / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    with open(folder / "queries.jsonl", "w") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in queries)
    for split, rows in qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            handle.writelines(f"{q}\t{d}\t1\n" for q, d in rows)
    return folder


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory) -> Path:
    return build_tiny_beir(tmp_path_factory.mktemp("tiny_beir"))


@pytest.fixture
def minilm_dir() -> Path:
    from embtune.models import resolve_model

    return Path(resolve_model("minilm"))


@contextlib.contextmanager
def uvicorn_in_thread(app, **config):
    """Serve a FastAPI app on 127.0.0.1 (a free port) in a thread; yields ``http://127.0.0.1:<port>``. ``config``:
    more ``uvicorn.Config`` arguments (``http=`` a protocol class)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def parquet_twin(tiny_beir: Path, out: Path) -> Path:
    """tiny_beir with its corpus as two Parquet parts (corpus/), the queries and qrels as they are."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embtune.dataio import load_corpus

    out.mkdir()
    shutil.copy2(tiny_beir / "queries.jsonl", out / "queries.jsonl")
    shutil.copytree(tiny_beir / "qrels", out / "qrels")
    rows = [{"_id": doc_id, **doc} for doc_id, doc in load_corpus(tiny_beir / "corpus.jsonl").items()]
    (out / "corpus").mkdir()
    for part, chunk in enumerate((rows[:30], rows[30:])):
        pq.write_table(pa.Table.from_pylist(chunk), out / "corpus" / f"part-{part}.parquet")
    return out
