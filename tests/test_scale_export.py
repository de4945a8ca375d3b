"""Export with compute.engine: ray on a real local Ray cluster: the bundle's FAISS index and the LanceDB table are
written from the corpus's shards and hold what the local engine's export holds; Chroma is written only below
``CHROMA_MAX_ROWS`` rows.

Each engine has its own embedding cache: a ``.npy`` the local engine wrote would be read by the Ray export instead
of its shards, and the shards would go untested.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.test_vectordb_export import _docs, _queries

# Every test here runs on a real local Ray cluster: the slow tier (make test-fast skips it).
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

SHARD_ROWS = 20  # the fixture's 72 documents: 4 shards, the last one partial
K = 10
FLOAT16_STEP = 2.0 ** -11  # float16's spacing in [0.5, 1): two values 1e-6 apart may round one step apart


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One small cluster for the module: 2 CPUs, a 200 MB object store; one temp embedding cache per engine."""
    from embtune.compute.shards import start_local

    caches = {"ray": tmp_path_factory.mktemp("ray_cache"), "local": tmp_path_factory.mktemp("local_cache")}
    old = os.environ.get("EMBTUNE_CACHE")
    start_local(num_cpus=2, object_store_mb=200)
    yield caches
    ray.shutdown()
    if old is None:
        os.environ.pop("EMBTUNE_CACHE", None)
    else:
        os.environ["EMBTUNE_CACHE"] = old


@contextmanager
def engine(name: str, caches: dict[str, Path]):
    """``compute.engine: name`` with that engine's cache; the local engine and the old cache afterwards."""
    from embtune.compute import ComputeConfig, activate

    old = os.environ.get("EMBTUNE_CACHE")
    os.environ["EMBTUNE_CACHE"] = str(caches[name])
    activate(ComputeConfig(engine="ray", workers=2, threads_per_worker=1, shard_rows=SHARD_ROWS, batch_size=16)
             if name == "ray" else ComputeConfig())
    try:
        yield
    finally:
        activate(ComputeConfig())
        if old is None:
            os.environ.pop("EMBTUNE_CACHE", None)
        else:
            os.environ["EMBTUNE_CACHE"] = old


@pytest.fixture(scope="module")
def docs(tiny_beir) -> list[dict]:
    """The vectordb tests' corpus, plus a field only the last shard has (the first shards' rows have it None)."""
    docs = _docs(tiny_beir)
    for doc in docs[60:]:
        doc["note"] = "late"
    return docs


def export(tiny_model_dir: Path, docs: list[dict], root: Path) -> dict[str, Path]:
    """A bundle with chroma and lancedb at the full dim and float32; one with lancedb alone at dim 16 and float16."""
    from embtune.sections.export import MilvusConfig, VectorDBConfig
    from embtune.serve.bundle import build_bundle
    from embtune.serve.vectordb import export_vectordb

    full, half = root / "bundle", root / "bundle16"
    build_bundle(tiny_model_dir, docs, full, device="cpu")
    # milvus in inserts of 8 rows: batches inside each 20-row shard, the last one of each shard partial
    export_vectordb(full, tiny_model_dir, docs, ["chroma", "lancedb", "milvus"], VectorDBConfig(), "tiny-corpus",
                    milvus=MilvusConfig(batch_size=8))
    build_bundle(tiny_model_dir, None, half, device="cpu")  # the model its QueryEncoder loads; no index
    export_vectordb(half, tiny_model_dir, docs, ["lancedb"], VectorDBConfig(dim=16, precision="float16"),
                    "tiny-corpus")
    return {"full": full, "half": half}


@pytest.fixture(scope="module")
def exported(cluster, tiny_model_dir, docs, tmp_path_factory):
    from embtune.retrieval.encoder import cache_dir

    root = tmp_path_factory.mktemp("exports")
    with engine("ray", cluster):
        on_ray = export(tiny_model_dir, docs, root / "ray")
        npy, shard_dirs = list(cache_dir().glob("*.npy")), list(cache_dir().glob("*.shards*"))
    assert not npy and len(shard_dirs) == 1  # every export read the one set of shards; none made the matrix file
    with engine("local", cluster):
        local = export(tiny_model_dir, docs, root / "local")
    return {"ray": on_ray, "local": local}


def test_bundle_index_on_ray_equals_the_local_one(exported, tiny_beir):
    """The Ray bundle's index is the same exact IndexFlatIP: the local vectors within 1e-6, the same top-10."""
    from embtune.serve.bundle import DOCS_FILE, INDEX_FILE, load_bundle

    ray_dir, local_dir = exported["ray"]["full"], exported["local"]["full"]
    on_ray, local = (faiss.read_index(str(d / INDEX_FILE)) for d in (ray_dir, local_dir))
    assert type(on_ray) is faiss.IndexFlatIP and (on_ray.ntotal, on_ray.d) == (local.ntotal, local.d) == (72, 32)
    assert np.abs(on_ray.reconstruct_n(0, 72) - local.reconstruct_n(0, 72)).max() <= 1e-6
    assert (ray_dir / DOCS_FILE).read_bytes() == (local_dir / DOCS_FILE).read_bytes()
    queries = load_bundle(local_dir, device="cpu").encode(_queries(tiny_beir))  # (72, 32)
    _, ray_top = on_ray.search(queries, K)
    _, local_top = local.search(queries, K)
    np.testing.assert_array_equal(ray_top, local_top)


@pytest.mark.parametrize("variant", ["full", "half"])
def test_lancedb_on_ray_equals_the_local_one(exported, docs, tiny_beir, variant):
    """Same columns and types (the field missing from the first shards too), ids, text and metadata; vectors within
    1e-6 (one float16 step at half precision); the same top-10; the same manifest entry."""
    from embtune.serve.vectordb import QueryEncoder, lancedb_top_ids, open_lancedb

    ray_dir, local_dir = exported["ray"][variant], exported["local"][variant]
    on_ray, local = open_lancedb(ray_dir), open_lancedb(local_dir)
    assert on_ray.schema.remove_metadata() == local.schema.remove_metadata()
    assert b"embedding_functions" in on_ray.schema.metadata  # table.search("text") embeds queries on either
    ray_rows, local_rows = on_ray.to_arrow(), local.to_arrow()
    assert ray_rows.column("id").to_pylist() == [d["_id"] for d in docs]
    assert ray_rows.drop_columns(["vector"]).equals(local_rows.drop_columns(["vector"]))
    assert ray_rows.column("note").to_pylist() == [None] * 60 + ["late"] * 12
    vectors = [np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
               for t in (ray_rows, local_rows)]
    assert vectors[0].shape == (72, 32 if variant == "full" else 16)
    assert np.abs(vectors[0] - vectors[1]).max() <= (1e-6 if variant == "full" else FLOAT16_STEP)
    query_vectors = QueryEncoder(local_dir)(_queries(tiny_beir))
    assert lancedb_top_ids(on_ray, query_vectors, K) == lancedb_top_ids(local, query_vectors, K)
    settings = [json.loads((d / "manifest.json").read_text())["vectordb"] for d in (ray_dir, local_dir)]
    for entry in settings:
        entry["lancedb"] = {k: v for k, v in entry["lancedb"].items() if k == "path"}  # timings, sizes, shards
        entry.pop("chroma", None)
        if "milvus" in entry:  # timings and sizes; the fingerprint hashes the vectors, equal within 1e-6 only
            entry["milvus"] = {k: v for k, v in entry["milvus"].items()
                               if k not in ("write_seconds", "bytes", "fingerprint")}
    assert settings[0] == settings[1]


def test_chroma_on_ray_below_the_limit_equals_the_local_one(exported, docs):
    from embtune.serve.vectordb import open_chroma

    stored = [open_chroma(exported[e]["full"]).get(include=["embeddings", "documents", "metadatas"])
              for e in ("ray", "local")]
    by_id = [dict(zip(s["ids"], zip(s["embeddings"], s["documents"], s["metadatas"]))) for s in stored]
    assert sorted(by_id[0]) == sorted(by_id[1]) == sorted(d["_id"] for d in docs)
    for doc_id, (vector, text, meta) in by_id[0].items():
        want_vector, want_text, want_meta = by_id[1][doc_id]
        assert np.abs(np.asarray(vector) - np.asarray(want_vector)).max() <= 1e-6
        assert (text, meta) == (want_text, want_meta)


def test_milvus_on_ray_equals_the_local_one(exported, docs, tiny_beir):
    """Written shard by shard: the same rows (title, text, metadata), vectors within 1e-6, the same top-10."""
    from embtune.serve.vectordb import milvus_top_ids, open_milvus

    rows, top = [], []
    for where in ("ray", "local"):
        with open_milvus(exported[where]["full"]) as milvus:
            stored = milvus.client.query(milvus.collection, filter="", limit=1000,
                                         output_fields=["id", "title", "text", "metadata", "vector"])
            rows.append({row["id"]: row for row in stored})
            top.append(milvus_top_ids(milvus.client, milvus.collection, milvus.encoder(_queries(tiny_beir)), K))
    assert sorted(rows[0]) == sorted(rows[1]) == sorted(d["_id"] for d in docs)
    for doc_id, row in rows[0].items():
        want = rows[1][doc_id]
        assert (row["title"], row["text"], row["metadata"]) == (want["title"], want["text"], want["metadata"])
        assert np.abs(np.asarray(row["vector"]) - np.asarray(want["vector"])).max() <= 1e-6
    assert rows[0]["finance-0"]["metadata"].get("note") is None and rows[0][docs[-1]["_id"]]["metadata"]["note"]
    assert top[0] == top[1]


def test_chroma_on_ray_above_the_limit_is_refused_before_anything_is_written(cluster, tiny_model_dir, docs, tmp_path,
                                                                              monkeypatch):
    """Above CHROMA_MAX_ROWS the error names export.targets and lancedb, and the bundle is left as it was."""
    import embtune.serve.vectordb as vectordb
    from embtune.sections.export import VectorDBConfig

    monkeypatch.setattr(vectordb, "CHROMA_MAX_ROWS", len(docs) - 1)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with engine("ray", cluster), pytest.raises(ValueError, match=r"export\.targets: chroma .* Use lancedb"):
        vectordb.export_vectordb(bundle, tiny_model_dir, docs, ["lancedb", "chroma"], VectorDBConfig(), "tiny-corpus")
    assert list(bundle.iterdir()) == []
