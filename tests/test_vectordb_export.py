"""export.targets: the corpus in a real persistent Chroma collection and a LanceDB table, on the tiny fixtures.

The ground truth is FAISS's exact top-10 over the vectors the export stored (the faiss target's own index at the
full dimension): for every fixture query Chroma's and LanceDB's top-10 must be the same ids in the same order.
For a dot-product model the reference is the served route itself (the bundle's ``/search``): the same top-10 from
the same query text, a swap allowed only where both routes' scores tie to 1e-5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import chromadb
import faiss
import numpy as np
import pytest

from embtune.config import ConfigError
from embtune.dataio import document_text, load_corpus, load_queries
from embtune.manifest import Stage
from embtune.retrieval.encoder import encode, load_encoder, normalize
from embtune.retrieval.index import exact_search
from embtune.retrieval.spec import DenseSpec, RetrieverSpec
from embtune.schema import load_config
from embtune.sections.export import VectorDBConfig
from embtune.serve.bundle import DOCS_FILE, INDEX_FILE, build_bundle
from embtune.serve.export import run as run_export
from embtune.serve.vectordb import (
    ChromaEmbeddingFunction,
    QueryEncoder,
    chroma_settings,
    chroma_top_ids,
    export_vectordb,
    export_vectors,
    lancedb_top_ids,
    open_chroma,
    open_lancedb,
    write_chroma,
)
from tests.served_route import dot_model, only_ties, served_top10

K = 10
ROOT = Path(__file__).resolve().parents[1]


def _docs(tiny_beir: Path) -> list[dict]:
    """The fixture corpus with metadata of each kind a user's corpus may carry (strings, numbers, lists)."""
    docs = [{"_id": doc_id, **doc} for doc_id, doc in load_corpus(tiny_beir / "corpus.jsonl").items()]
    for i, doc in enumerate(docs):
        doc["lang"] = ["en", "de", "fr"][i % 3]
        doc["year"] = 2000 + i
        if i % 5 == 0:
            doc["tags"] = ["fixture", doc["title"]]
    return docs


def _queries(tiny_beir: Path) -> list[str]:
    return list(load_queries(tiny_beir / "queries.jsonl").values())


def _exact_top_ids(tiny_model_dir: Path, docs: list[dict], query_vectors: np.ndarray, dim: int,
                   precision: str) -> list[list[str]]:
    """FAISS exact top-K by cosine over the vectors the export stores (same cache, dimension and precision)."""
    model, key = load_encoder(str(tiny_model_dir))
    stored = export_vectors(encode(model, [document_text(d) for d in docs], cache_key=key), dim, precision)
    _, indices = exact_search(normalize(stored), normalize(query_vectors), K)  # (n_queries, K)
    return [[docs[j]["_id"] for j in row] for row in indices]


def _export(tiny_model_dir: Path, docs: list[dict], bundle_dir: Path, spec: RetrieverSpec | None = None,
            **settings) -> Path:
    build_bundle(tiny_model_dir, docs, bundle_dir, device="cpu", spec=spec)
    export_vectordb(bundle_dir, tiny_model_dir, docs, ["chroma", "lancedb"], VectorDBConfig(**settings), "tiny-corpus")
    return bundle_dir


@pytest.fixture(scope="module")
def full_bundle(tiny_model_dir, tiny_beir, tmp_path_factory) -> Path:
    return _export(tiny_model_dir, _docs(tiny_beir), tmp_path_factory.mktemp("vdb") / "bundle")


@pytest.fixture(scope="module")
def dot_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return dot_model(tiny_model_dir, tmp_path_factory.mktemp("dot") / "dot-model")


@pytest.fixture(scope="module")
def dot_bundle(dot_model_dir, tiny_beir, tmp_path_factory) -> Path:
    return _export(dot_model_dir, _docs(tiny_beir), tmp_path_factory.mktemp("vdb_dot") / "bundle")


@pytest.mark.parametrize("dim, precision", [(0, "float32"), (16, "float16")])
def test_chroma_and_lancedb_top10_equal_faiss_exact(tiny_model_dir, tiny_beir, tmp_path, full_bundle, dim, precision):
    docs = _docs(tiny_beir)
    bundle = full_bundle if dim == 0 else _export(tiny_model_dir, docs, tmp_path / "bundle", dim=dim,
                                                  precision=precision)
    query_vectors = QueryEncoder(bundle)(_queries(tiny_beir))  # (n_queries, dim)
    assert query_vectors.shape[1] == (dim or 32)
    expected = _exact_top_ids(tiny_model_dir, docs, query_vectors, dim, precision)
    assert len(expected) == 72
    assert chroma_top_ids(open_chroma(bundle), query_vectors, K) == expected
    assert lancedb_top_ids(open_lancedb(bundle), query_vectors, K) == expected
    if dim == 0:  # the faiss target itself (what `python -m embtune.serve` searches) ranks the same
        _, indices = faiss.read_index(str(bundle / INDEX_FILE)).search(query_vectors, K)
        assert [[docs[j]["_id"] for j in row] for row in indices] == expected


def test_float16_is_stored_at_half_precision(tiny_model_dir, tiny_beir, tmp_path):
    bundle = _export(tiny_model_dir, _docs(tiny_beir), tmp_path / "bundle", dim=16, precision="float16")
    vector_type = open_lancedb(bundle).schema.field("vector").type
    assert str(vector_type.value_type) == "halffloat" and vector_type.list_size == 16
    manifest = json.loads((bundle / "manifest.json").read_text())["vectordb"]
    assert (manifest["dim"], manifest["precision"], manifest["metric"]) == (16, "float16", "cosine")


def test_query_texts_are_embedded_like_the_export(full_bundle, tiny_beir):
    """Chroma's and LanceDB's embedding functions (loaded from the bundle) rank as the exported vectors do."""
    queries = _queries(tiny_beir)[:5]
    query_vectors = QueryEncoder(full_bundle)(queries)
    collection = open_chroma(full_bundle)
    assert collection.query(query_texts=queries, n_results=K)["ids"] == chroma_top_ids(collection, query_vectors, K)
    table = open_lancedb(full_bundle)
    by_text = [[row["id"] for row in table.search(q).distance_type("cosine").limit(K).to_list()] for q in queries]
    assert by_text == lancedb_top_ids(table, query_vectors, K)


def test_documents_and_metadata_are_kept(full_bundle, tiny_beir):
    docs = {d["_id"]: d for d in _docs(tiny_beir)}
    stored = open_chroma(full_bundle).get(include=["documents", "metadatas"])
    assert sorted(stored["ids"]) == sorted(docs)
    for doc_id, text, meta in zip(stored["ids"], stored["documents"], stored["metadatas"]):
        doc = docs[doc_id]
        assert text == doc["text"]
        assert (meta["title"], meta["lang"], meta["year"]) == (doc["title"], doc["lang"], doc["year"])
        assert ("tags" in meta) == ("tags" in doc) and json.loads(meta.get("tags", "null")) == doc.get("tags")
    rows = {row["id"]: row for row in open_lancedb(full_bundle).to_arrow().to_pylist()}
    assert sorted(rows) == sorted(docs)
    for doc_id, row in rows.items():
        doc = docs[doc_id]
        assert (row["text"], row["title"], row["lang"], row["year"]) == (doc["text"], doc["title"], doc["lang"],
                                                                         doc["year"])
        assert row["tags"] == (json.dumps(doc["tags"]) if "tags" in doc else None)


@pytest.mark.slow
def test_a_fresh_process_reopens_and_queries_by_text(full_bundle, tiny_beir):
    """Persistence: another Python process opens both stores from disk and embeds query text itself."""
    queries = _queries(tiny_beir)[:3]
    script = (
        "import json, sys\n"
        "from serve.vectordb import open_chroma, open_lancedb\n"
        "bundle, queries = sys.argv[1], json.loads(sys.argv[2])\n"
        "chroma = open_chroma(bundle).query(query_texts=queries, n_results=10)['ids']\n"
        "table = open_lancedb(bundle)\n"
        "lance = [[r['id'] for r in table.search(q).distance_type('cosine').limit(10).to_list()] for q in queries]\n"
        "print(json.dumps({'chroma': chroma, 'lancedb': lance}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(full_bundle), json.dumps(queries)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    query_vectors = QueryEncoder(full_bundle)(queries)
    assert result["chroma"] == chroma_top_ids(open_chroma(full_bundle), query_vectors, K)
    assert result["lancedb"] == lancedb_top_ids(open_lancedb(full_bundle), query_vectors, K)


def test_export_stage_writes_every_target(tiny_model_dir, tiny_beir, tmp_path):
    """serve.export.run with export.targets [faiss, chroma, lancedb]: one bundle, three searchable copies."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "tracking.report_to=none",
                             "export.targets=[faiss, chroma, lancedb]", "export.model_name=tiny-export"])
    results = tmp_path / "results.json"
    metrics = {m: 0.5 for m in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")}
    results.write_text(json.dumps({"split": "test", "num_queries": 18, "num_documents": 72,
                                   "results": {"finetuned": metrics}}))
    Stage("data_prep", cfg.run_dir, config={}).finish({"eval_dataset": tiny_beir})
    Stage("train", cfg.run_dir, config={}).finish({"model": tiny_model_dir})
    Stage("eval", cfg.run_dir, config={}).finish({"results": results})
    bundle = Path(run_export(cfg)["bundle"])
    assert (bundle / INDEX_FILE).is_file() and (bundle / DOCS_FILE).is_file()
    settings = json.loads((bundle / "manifest.json").read_text())["vectordb"]
    assert settings["name"] == "tiny-export" and settings["num_docs"] == 72
    assert open_chroma(bundle).count() == 72 and open_lancedb(bundle).count_rows() == 72
    for target in ("chroma", "lancedb"):
        assert settings[target]["bytes"] > 0 and settings[target]["write_seconds"] >= 0


@pytest.mark.parametrize("override, message", [
    ("export.targets=[faiss, qdrant]", "export.targets[1]: unknown target 'qdrant'"),
    ("export.targets=[chroma, chroma]", "export.targets lists a target twice"),
    ("export.vectordb.dim=-1", "export.vectordb.dim must be >= 0"),
    ("export.vectordb.precision=int8", "export.vectordb.precision"),
    ("export.vectordb.chroma_ef_search=0", "export.vectordb.chroma_ef_search must be >= 1"),
])
def test_config_errors_name_the_key(override, message, tiny_beir):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"data.path={tiny_beir}", override])


def test_bad_names_and_dims_are_refused(tiny_model_dir, tiny_beir, tmp_path):
    docs = _docs(tiny_beir)
    build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    with pytest.raises(ValueError, match="export.vectordb.name 'x'"):
        export_vectordb(tmp_path / "bundle", tiny_model_dir, docs, ["chroma"], VectorDBConfig(), "x")
    with pytest.raises(ValueError, match="export.vectordb.dim 64 is larger than the model's dimension 32"):
        export_vectordb(tmp_path / "bundle", tiny_model_dir, docs, ["lancedb"], VectorDBConfig(dim=64), "tiny")


def test_exporting_again_in_one_process_replaces_the_stores(tiny_model_dir, tiny_beir, tmp_path):
    docs = _docs(tiny_beir)
    bundle = _export(tiny_model_dir, docs, tmp_path / "bundle")
    first = open_chroma(bundle)  # a client of the first export stays open in this process
    assert first.count() == 72
    export_vectordb(bundle, tiny_model_dir, docs[:10], ["chroma", "lancedb"], VectorDBConfig(), "tiny-corpus")
    assert open_chroma(bundle).count() == 10 and open_lancedb(bundle).count_rows() == 10


def _by_text(bundle: Path, queries: list[str]) -> dict[str, list[list[dict]]]:
    """Chroma's and LanceDB's top-K for query texts, embedded by the embedding functions the stores carry, searched
    in the metric the manifest records: hits {"id", "score"} with the served route's score (1 - distance: Chroma's
    ip distance is 1 - dot, LanceDB's dot and both cosine distances likewise)."""
    settings = json.loads((bundle / "manifest.json").read_text())["vectordb"]
    result = open_chroma(bundle).query(query_texts=queries, n_results=K, include=["distances"])
    chroma = [[{"id": i, "score": 1 - d} for i, d in zip(ids, distances)]
              for ids, distances in zip(result["ids"], result["distances"])]
    table = open_lancedb(bundle)
    lance = [[{"id": row["id"], "score": 1 - row["_distance"]}
              for row in table.search(q).distance_type(settings["lancedb"]["metric"]).limit(K).to_list()]
             for q in queries]
    return {"chroma": chroma, "lancedb": lance}


def _not_ties(found: list[list[dict]], served: list[list[dict]]) -> list[int]:
    """The queries whose top-K differs from the served one other than by a float32 tie."""
    return [i for i, (got, want) in enumerate(zip(found, served)) if not only_ties(got, want)]


@pytest.mark.parametrize("dim", [0, 16])
def test_dot_product_model_ranks_as_the_served_search(dot_model_dir, dot_bundle, tiny_beir, tmp_path, dim):
    """A dot-product model: at its full dim the stores hold its own vectors and rank by the raw inner product (ip,
    dot); a Matryoshka prefix is renormalized, as /search serving that dim (retriever.json dense.dim) does."""
    queries = _queries(tiny_beir)
    bundle = dot_bundle if dim == 0 else _export(dot_model_dir, _docs(tiny_beir), tmp_path / "bundle",
                                                 spec=RetrieverSpec(dense=DenseSpec(dim=dim)), dim=dim)
    served = served_top10(bundle, queries)
    assert len(served) == 72 and all(len(row) == K for row in served)
    differ = {target: len(_not_ties(found, served)) for target, found in _by_text(bundle, queries).items()}
    assert differ == {"chroma": 0, "lancedb": 0}, f"queries ranked otherwise than /search: {differ}"
    settings = json.loads((bundle / "manifest.json").read_text())["vectordb"]
    metrics = (settings["metric"], settings["renormalized"], settings["chroma"]["metric"],
               settings["lancedb"]["metric"])
    assert metrics == (("dot", False, "ip", "dot") if dim == 0 else ("cosine", True, "cosine", "cosine"))
    assert settings["similarity_fn_name"] == "dot"


def test_dot_product_vectors_keep_their_norms(dot_model_dir, dot_bundle, tiny_beir):
    """Both stores hold the model's own document vectors bit for bit, and queries keep their norms too."""
    docs = _docs(tiny_beir)
    model, key = load_encoder(str(dot_model_dir))
    own = encode(model, [document_text(d) for d in docs], cache_key=key)  # (72, 32), not normalized
    assert np.ptp(np.linalg.norm(own, axis=1)) > 0.01
    rows = {row["id"]: row["vector"] for row in open_lancedb(dot_bundle).to_arrow().to_pylist()}
    assert np.array_equal(np.array([rows[d["_id"]] for d in docs], np.float32), own)
    stored = open_chroma(dot_bundle).get(ids=[d["_id"] for d in docs], include=["embeddings"])
    assert np.array_equal(np.asarray(stored["embeddings"], np.float32), own)
    queries = _queries(tiny_beir)[:5]
    assert np.array_equal(QueryEncoder(dot_bundle)(queries), encode(model, queries, role="query"))


def test_the_dot_product_parity_can_fail(dot_model_dir, dot_bundle, tiny_beir, tmp_path):
    """What the stores searched before, a cosine space (documents and queries renormalized), ranks otherwise than the
    dot-product /search for many queries beyond a tie, so the parity above does not hold by accident.

    Renormalizing only the queries is no control: it scales each query's inner products by one factor, so an
    inner-product store ranks as before (checked below). A differing hit counts only when its served score (the dot
    product) differs from the served hit's at that rank by more than a tie."""
    queries = _queries(tiny_beir)
    served = served_top10(dot_bundle, queries)
    docs = _docs(tiny_beir)
    model, key = load_encoder(str(dot_model_dir))
    own = encode(model, [document_text(d) for d in docs], cache_key=key)  # (72, 32): what /search holds
    row = {d["_id"]: i for i, d in enumerate(docs)}
    query_vectors = QueryEncoder(dot_bundle)(queries)  # (72, 32) with their norms, as /search embeds them
    cosine_queries = normalize(query_vectors)

    def rescored(top_ids: list[list[str]]) -> list[list[dict]]:
        return [[{"id": i, "score": float(q @ own[row[i]])} for i in ids] for q, ids in zip(query_vectors, top_ids)]

    write_chroma(tmp_path / "chroma", "cosine-space", list(row), [d["text"] for d in docs], {}, export_vectors(own),
                 ChromaEmbeddingFunction(str(dot_bundle)), ef_search=1000)
    collection = chromadb.PersistentClient(path=str((tmp_path / "chroma").resolve()),
                                           settings=chroma_settings()).get_collection("cosine-space")
    chroma_cosine = _not_ties(rescored(chroma_top_ids(collection, cosine_queries, K)), served)
    table = open_lancedb(dot_bundle)
    lance_cosine = _not_ties(rescored(lancedb_top_ids(table, cosine_queries, K, metric="cosine")), served)
    assert min(len(chroma_cosine), len(lance_cosine)) >= len(queries) // 2, (len(chroma_cosine), len(lance_cosine))
    assert not _not_ties(rescored(lancedb_top_ids(table, cosine_queries, K, metric="dot")), served)


def test_cosine_vectors_are_unchanged(tiny_model_dir, full_bundle, tiny_beir):
    """A cosine model's stores hold its normalized vectors bit for bit, as before dot-product models kept norms."""
    docs = _docs(tiny_beir)
    model, key = load_encoder(str(tiny_model_dir))
    want = normalize(encode(model, [document_text(d) for d in docs], cache_key=key))  # (72, 32)
    rows = {row["id"]: row["vector"] for row in open_lancedb(full_bundle).to_arrow().to_pylist()}
    assert np.array_equal(np.array([rows[d["_id"]] for d in docs], np.float32), want)
    stored = open_chroma(full_bundle).get(ids=[d["_id"] for d in docs], include=["embeddings"])
    # Chroma normalizes a cosine space's vectors once more itself, so they agree to float32 rounding, not bits.
    np.testing.assert_allclose(np.asarray(stored["embeddings"], np.float32), want, rtol=0, atol=1e-6)
    settings = json.loads((full_bundle / "manifest.json").read_text())["vectordb"]
    assert (settings["metric"], settings["renormalized"], settings["chroma"]["metric"],
            settings["lancedb"]["metric"]) == ("cosine", True, "cosine", "cosine")
