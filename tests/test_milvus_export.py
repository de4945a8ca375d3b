"""export.targets: [milvus] on the tiny fixtures, with the real pymilvus and milvus-lite (a Milvus server in this
process, its data in <bundle>/vectordb/milvus.db).

The reference is the served route: ``/search`` of the bundle's app (the core Retriever over the bundle's FAISS
index). Milvus's top-10, from the same query text, must be the same ids in the same order for >= 99% of the fixture
queries with a cosine model; for a cosine and a dot-product model (whose vectors neither side renormalizes) a query
may differ only by a float32 tie: at each differing rank both routes' scores agree to 1e-5 (the two engines sum
the inner product in different orders, so two documents 1e-6 apart can swap).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embtune.config import ConfigError
from embtune.manifest import Stage
from embtune.retrieval.spec import DenseSpec, RetrieverSpec
from embtune.schema import load_config
from embtune.sections.export import MilvusConfig, VectorDBConfig
from embtune.serve.bundle import MANIFEST_FILE, build_bundle
from embtune.serve.export import run as run_export
from embtune.serve.vectordb import (
    QueryEncoder,
    export_vectordb,
    milvus_collection_name,
    milvus_count,
    open_milvus,
)
from tests.served_route import dot_model, ids_of, only_ties, served_top10
from tests.test_vectordb_export import _docs, _queries

K = 10
ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER_BATCHES = 3
BATCH = 10  # the fixture's 72 documents: 8 inserts, the last one partial


def export_stage(model_dir: Path, tiny_beir: Path, run_dir: Path, *overrides: str) -> Path:
    """serve.export.run with export.targets [faiss, milvus]: the bundle as the pipeline's last stage writes it."""
    cfg = load_config(None, [f"run_dir={run_dir}", f"data.path={tiny_beir}", "tracking.report_to=none",
                             "export.targets=[faiss, milvus]", "export.model_name=tiny-export", *overrides])
    results = run_dir / "results.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    metrics = {m: 0.5 for m in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")}
    results.write_text(json.dumps({"split": "test", "num_queries": 18, "num_documents": 72,
                                   "results": {"finetuned": metrics}}))
    Stage("data_prep", cfg.run_dir, config={}).finish({"eval_dataset": tiny_beir})
    Stage("train", cfg.run_dir, config={}).finish({"model": model_dir})
    Stage("eval", cfg.run_dir, config={}).finish({"results": results})
    return Path(run_export(cfg)["bundle"])


@pytest.fixture(scope="module")
def cosine_bundle(tiny_model_dir, tiny_beir, tmp_path_factory) -> Path:
    return export_stage(tiny_model_dir, tiny_beir, tmp_path_factory.mktemp("milvus_cos") / "run",
                        f"export.milvus.batch_size={BATCH}")


@pytest.fixture(scope="module")
def dot_bundle(tiny_model_dir, tiny_beir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("milvus_dot")
    return export_stage(dot_model(tiny_model_dir, root / "dot-model"), tiny_beir, root / "run")


@pytest.mark.parametrize("which", ["cosine", "dot"])
def test_milvus_top10_equals_the_served_search(which, cosine_bundle, dot_bundle, tiny_beir):
    bundle = cosine_bundle if which == "cosine" else dot_bundle
    queries = _queries(tiny_beir)
    served = served_top10(bundle, queries)
    with open_milvus(bundle) as milvus:
        found = milvus.search(queries, K)
    assert len(served) == 72 and all(len(ids) == K for ids in ids_of(served))
    differ = [i for i, (got, want) in enumerate(zip(ids_of(found), ids_of(served))) if got != want]
    not_ties = [(queries[i], ids_of(found)[i], ids_of(served)[i]) for i in differ if not only_ties(found[i], served[i])]
    assert not not_ties, f"{len(not_ties)} queries rank otherwise than /search, e.g. {not_ties[0]}"
    if which == "cosine":
        assert 1 - len(differ) / len(served) >= 0.99, f"{len(differ)} of {len(served)} queries differ from /search"
    entry = json.loads((bundle / MANIFEST_FILE).read_text())["vectordb"]["milvus"]
    assert (entry["metric"], entry["index_type"], entry["num_rows"]) == ("IP", "FLAT", 72)
    assert (entry["similarity_fn_name"], entry["renormalized"]) == (
        ("cosine", True) if which == "cosine" else ("dot", False))


def test_the_dot_product_parity_can_fail(dot_bundle, tiny_beir):
    """The export before the fix stored every model's documents renormalized (a cosine space). Searched that way,
    the very vectors Milvus holds rank otherwise than the dot-product /search for some query beyond ties, so the dot
    parity above does not hold by accident. (Renormalizing only the queries could not show it: a query's scale
    multiplies all of its inner products alike.)"""
    queries = _queries(tiny_beir)
    served = ids_of(served_top10(dot_bundle, queries))
    with open_milvus(dot_bundle) as milvus:
        rows = milvus.client.query(milvus.collection, filter='id != ""', output_fields=["id", "vector"], limit=1000)
        query_vectors = QueryEncoder(dot_bundle, renormalize=True)(queries)  # (n_queries, dim)
    ids = [row["id"] for row in rows]
    documents = np.asarray([row["vector"] for row in rows], dtype=np.float32)  # (n_docs, dim), with their norms
    assert len(ids) == 72 and np.ptp(np.linalg.norm(documents, axis=1)) > 1e-3  # not unit vectors
    documents /= np.linalg.norm(documents, axis=1, keepdims=True)  # what the old export stored
    scores = query_vectors @ documents.T  # (n_queries, n_docs) cosine
    cosine_top = [[ids[i] for i in np.argsort(-row, kind="stable")[:K]] for row in scores]
    differ = [q for q, (got, want) in enumerate(zip(cosine_top, served)) if got != want]
    margin = np.sort(scores, axis=1)[:, -K - 1:]  # a swap by a tie would need two scores within float noise
    assert any(np.diff(margin[q]).min() > 1e-5 for q in differ)


def test_a_truncated_dot_product_model_ranks_as_the_served_search(tiny_model_dir, tiny_beir, tmp_path):
    """export.vectordb.dim below a dot-product model's: /search serving that dim (retriever.json dense.dim)
    renormalizes the prefix, so Milvus stores it renormalized and ranks as /search does."""
    docs, queries = _docs(tiny_beir), _queries(tiny_beir)
    model_dir = dot_model(tiny_model_dir, tmp_path / "dot-model")
    bundle = build_bundle(model_dir, docs, tmp_path / "bundle", device="cpu",
                          spec=RetrieverSpec(dense=DenseSpec(dim=16)))
    export_vectordb(bundle, model_dir, docs, ["milvus"], VectorDBConfig(dim=16), "tiny-corpus")
    served = served_top10(bundle, queries)
    with open_milvus(bundle) as milvus:
        found = milvus.search(queries, K)
    assert all(only_ties(got, want) for got, want in zip(found, served))
    entry = json.loads((bundle / MANIFEST_FILE).read_text())["vectordb"]["milvus"]
    assert (entry["similarity_fn_name"], entry["renormalized"]) == ("dot", True)


def test_documents_metadata_and_bm25_are_stored(tiny_model_dir, tiny_beir, tmp_path):
    docs = _docs(tiny_beir)
    bundle = build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    settings = export_vectordb(bundle, tiny_model_dir, docs, ["milvus"], VectorDBConfig(), "tiny-corpus",
                               milvus=MilvusConfig(batch_size=BATCH))
    entry = settings["milvus"]
    assert entry["uri"] == "vectordb/milvus.db" and entry["lite"] and entry["collection"] == "tiny_corpus"
    assert (entry["rows_written"], entry["rows_already_stored"], entry["bytes"] > 0) == (72, 0, True)
    with open_milvus(bundle) as milvus:
        rows = milvus.client.query(milvus.collection, filter="", output_fields=["id", "title", "text", "metadata"],
                                   limit=1000)
        by_id = {row["id"]: row for row in rows}
        assert len(rows) == len(by_id) == 72
        for doc in docs:
            row = by_id[doc["_id"]]
            assert (row["title"], row["text"]) == (doc["title"], doc["text"])
            assert row["metadata"] == {k: v for k, v in doc.items() if k not in ("_id", "title", "text")}
        # Milvus's full-text search: a document's own rare words find it first.
        target = docs[5]
        hits = milvus.client.search(milvus.collection, data=[target["text"]], anns_field="sparse", limit=3,
                                    search_params={"metric_type": "BM25"}, output_fields=["id"])
        assert hits[0][0]["id"] == target["_id"]


def test_a_different_export_replaces_the_collection(tiny_model_dir, tiny_beir, tmp_path):
    """Another corpus under the same collection name: dropped and written again, not merged into."""
    docs = _docs(tiny_beir)
    bundle = build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    export_vectordb(bundle, tiny_model_dir, docs, ["milvus"], VectorDBConfig(), "tiny-corpus")
    again = export_vectordb(bundle, tiny_model_dir, docs[:10], ["milvus"], VectorDBConfig(), "tiny-corpus")
    assert (again["milvus"]["num_rows"], again["milvus"]["rows_written"]) == (10, 10)
    dim16 = export_vectordb(bundle, tiny_model_dir, docs[:10], ["milvus"], VectorDBConfig(dim=16), "tiny-corpus")
    assert (dim16["milvus"]["rows_written"], dim16["milvus"]["rows_already_stored"]) == (10, 0)


KILLED_EXPORT = """
import json, os, signal, sys
from pymilvus import MilvusClient

insert, calls = MilvusClient.insert, []

def insert_then_die(self, *args, **kwargs):
    out = insert(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)  # as an OOM kill or a preempted node would: no cleanup runs
    return out

MilvusClient.insert = insert_then_die
from embtune.sections.export import MilvusConfig, VectorDBConfig
from embtune.serve.vectordb import export_vectordb

bundle, model, docs = sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read())
export_vectordb(bundle, model, docs, ["milvus"], VectorDBConfig(), "tiny-corpus", milvus=MilvusConfig(batch_size=10))
print("finished")
"""


@pytest.mark.slow
def test_a_killed_export_is_completed_by_the_rerun(tiny_model_dir, tiny_beir, tmp_path):
    """SIGKILL after 3 of the 8 inserts; the rerun inserts only the other 42 rows: 72 rows, each id once."""
    docs = _docs(tiny_beir)
    bundle = build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(bundle), str(tiny_model_dir),
                          str(tmp_path / "docs.json"), str(KILL_AFTER_BATCHES)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert "finished" not in out.stdout

    from embtune.serve.vectordb import milvus_client, release_milvus

    lite = str(bundle / "vectordb" / "milvus.db")
    client = milvus_client(lite)
    try:
        assert milvus_count(client, "tiny_corpus") == KILL_AFTER_BATCHES * BATCH  # killed mid-write
    finally:
        release_milvus(client, lite)

    rerun = export_vectordb(bundle, tiny_model_dir, docs, ["milvus"], VectorDBConfig(), "tiny-corpus",
                            milvus=MilvusConfig(batch_size=BATCH))["milvus"]
    assert (rerun["rows_already_stored"], rerun["rows_written"], rerun["num_rows"]) == (30, 42, 72)
    with open_milvus(bundle) as milvus:
        ids = [row["id"] for row in milvus.client.query(milvus.collection, filter="", output_fields=["id"],
                                                        limit=1000)]
    assert sorted(ids) == sorted(doc["_id"] for doc in docs)  # every id, none twice


@pytest.mark.parametrize("override, message", [
    ("export.targets=[faiss, weaviate]", "export.targets[1]: unknown target 'weaviate'"),
    ("export.milvus.batch_size=0", "export.milvus.batch_size must be >= 1"),
    ("export.milvus.index_type=HNSW", "key 'export.milvus.index_type' expects one of 'FLAT' | 'AUTOINDEX', got 'HNSW'"),
    ("export.milvus.urii=x", "export.milvus.urii"),
])
def test_config_errors_name_the_key(override, message, tiny_beir):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"data.path={tiny_beir}", override])


def test_collection_names(tiny_model_dir, tiny_beir, tmp_path):
    assert milvus_collection_name("minilm-scifact.v2") == "minilm_scifact_v2"
    assert milvus_collection_name("2024-model") == "_2024_model"
    bundle = build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    with pytest.raises(ValueError, match="export.milvus.collection 'bad-name'"):
        export_vectordb(bundle, tiny_model_dir, _docs(tiny_beir), ["milvus"], VectorDBConfig(), "tiny",
                        milvus=MilvusConfig(collection="bad-name"))
