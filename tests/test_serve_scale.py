"""Bundles that scale: approximate indexes (ivf_pq, hnsw) memory-mapped, documents on disk, BM25 saved at export.

The exact (flat) bundle over the same documents is the reference: an approximate bundle's top-10 must find most of
the exact top-10 (faiss's own tests' way), and the BM25 loaded from the bundle must rank as the one rebuilt from the
documents, bit for bit.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fastapi.testclient import TestClient

from embtune.retrieval.bm25 import BM25Config
from embtune.retrieval.docstore import DocStore, write_store
from embtune.retrieval.spec import BM25Index, DenseSpec, FusionSpec, Retriever, RetrieverSpec
from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app
from embtune.serve.bundle import build_bundle, load_bundle
from tests.conftest import FILLER, TOPICS

N_DOCS = 3000


def _docs(n: int = N_DOCS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = list(TOPICS.items())
    docs = []
    for i in range(n):
        topic, words = topics[i % len(topics)]
        text = " ".join(rng.choice(words.split() + FILLER) for _ in range(12))
        docs.append({"_id": f"d{i}", "title": topic, "text": text, "topic": topic})
    return docs


def _queries(n: int = 60, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words.split()) for _ in range(4)) for words in
            (rng.choice(list(TOPICS.values())) for _ in range(n))]


def _vectors(n: int, seed: int, dim: int = 32, clusters: int = 40) -> np.ndarray:
    """Seeded clustered unit vectors (n, dim): cluster structure, as real embeddings have, not isotropic noise."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_bundles")
    docs, vectors = _docs(), _vectors(N_DOCS, seed=1)
    hybrid = RetrieverSpec(dense=DenseSpec(), bm25=BM25Config(language="english"),
                           fusion=FusionSpec(method="rrf", depth=50))
    out = {"flat": build_bundle(tiny_model_dir, docs, root / "flat", device="cpu", spec=hybrid)}
    # The same seeded vectors under the three index kinds: the flat one is the exact reference.
    for kind, settings in (("flat", {}), ("ivf_pq", {"nprobe": 16, "k_factor": 8}), ("hnsw", {"ef_search": 128})):
        out[f"{kind}_seeded"] = build_bundle(tiny_model_dir, iter(docs), root / f"{kind}_seeded", device="cpu",
                                             index=kind, embeddings=vectors, **settings)
    return out


def _top10(bundle_dir, query_emb):
    bundle = load_bundle(bundle_dir, device="cpu")
    retriever = Retriever(bundle.spec, bundle.docs.ids, bundle.doc_texts, bundle.index)
    run = retriever.search([""] * len(query_emb), query_emb, k=10)
    return [list(run[str(i)]) for i in range(len(query_emb))], bundle


@pytest.mark.parametrize("kind", ["ivf_pq", "hnsw"])
def test_approximate_bundle_finds_the_exact_top10(bundles, kind):
    queries = _vectors(100, seed=2)
    exact, _ = _top10(bundles["flat_seeded"], queries)
    approximate, bundle = _top10(bundles[f"{kind}_seeded"], queries)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.9, f"{kind}: recall@10 {recall:.3f} against the flat bundle"
    recorded = bundle.manifest["index"]
    assert recorded["kind"] == kind and recorded["factory"]
    if kind == "ivf_pq":
        import faiss

        assert faiss.extract_index_ivf(bundle.index).nprobe == recorded["nprobe"] == 16
        assert recorded["factory"].startswith("IVF") and "PQ" in recorded["factory"]
    else:
        assert recorded["efSearch"] == 128


def test_a_control_recall_fails_with_one_list_probed_and_no_refine(bundles):
    # The recall test above can fail: probing 1 IVF list and ranking by the PQ codes alone misses the exact top-10.
    import faiss

    queries = _vectors(100, seed=2)
    exact, _ = _top10(bundles["flat_seeded"], queries)
    bundle = load_bundle(bundles["ivf_pq_seeded"], device="cpu")
    ivf = faiss.extract_index_ivf(bundle.index)
    ivf.nprobe = 1
    _, found = ivf.search(np.ascontiguousarray(queries), 10)
    ids = [[f"d{j}" for j in row if j >= 0] for row in found]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)])
    assert recall < 0.9


def test_bm25_loaded_from_the_bundle_ranks_as_the_rebuilt_one(bundles):
    bundle = load_bundle(bundles["flat"], device="cpu")
    assert bundle.bm25 is not None  # index/bm25, written at export
    rebuilt = BM25Index(list(bundle.doc_texts), bundle.spec.bm25)
    queries = _queries(80, seed=3) + ["", "unknownword", "the the"]
    loaded_scores, loaded_rows = bundle.bm25.search(queries, 20)
    scores, rows = rebuilt.search(queries, 20)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_array_equal(loaded_scores, scores)


def test_the_server_starts_on_a_memory_mapped_index_and_reads_hits_from_disk(bundles):
    bundle_dir = bundles["ivf_pq_seeded"]
    with TestClient(create_app(bundle_dir, ServeConfig())) as client:
        health = client.get("/health").json()
        assert health["index"]["kind"] == "ivf_pq" and health["index_size"] == N_DOCS
        assert health["startup"]["rss_gb"] > 0 and health["startup"]["process_s"] > 0
        query = "a query the tiny model encodes"
        hits = client.post("/search", json={"query": query, "k": 5}).json()["hits"]
        assert len(hits) == 5
        store = DocStore(bundle_dir / "index" / "docs.jsonl")
        for hit in hits:
            doc = store[store.row_of(hit["id"])]
            assert hit["text"] == doc["text"] and hit["metadata"] == {"topic": doc["topic"]}
        # the filter index still works over the on-disk store
        topic = hits[0]["metadata"]["topic"]
        filtered = client.post("/search", json={"query": query, "k": 5, "filter": {"topic": topic}})
        assert filtered.status_code == 200
        assert all(hit["metadata"]["topic"] == topic for hit in filtered.json()["hits"])


def test_docstore_reads_rows_and_ids_and_refuses_duplicate_ids(tmp_path):
    docs = _docs(50)
    rows, fields = write_store(docs, tmp_path / "docs.jsonl")
    assert rows == 50 and fields == ["topic"]
    for mapped in (True, False):  # memory-mapped arrays, or each entry read by pread: the same answers
        store = DocStore(tmp_path / "docs.jsonl", mapped=mapped)
        assert [store[i] for i in (0, 17, 49, -1)] == [docs[0], docs[17], docs[49], docs[49]]
        assert store[10:13] == docs[10:13] and len(store) == 50
        assert all(store.row_of(d["_id"]) == i for i, d in enumerate(docs))
        assert "d7" in store.ids and "nope" not in store.ids
        with pytest.raises(KeyError):
            store.row_of("nope")
    with pytest.raises(ValueError, match="'d3' occurs at rows 3 and 50"):
        write_store(docs + [dict(docs[3])], tmp_path / "dup.jsonl")
    assert json.loads((tmp_path / "docs.jsonl").read_text().splitlines()[17]) == docs[17]


def test_retune_changes_the_served_search_settings_without_a_rebuild(bundles, tmp_path):
    import shutil

    import faiss

    from embtune.serve.bundle import retune_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundles["ivf_pq_seeded"], copy)
    before = (copy / "index" / "corpus.faiss").read_bytes()
    assert retune_bundle(copy, nprobe=3, k_factor=2)["nprobe"] == 3
    bundle = load_bundle(copy, device="cpu")
    assert faiss.extract_index_ivf(bundle.index).nprobe == 3
    assert faiss.downcast_index(bundle.index).k_factor == 2
    assert (copy / "index" / "corpus.faiss").read_bytes() == before


def test_a_bundle_written_before_offsets_and_saved_bm25_still_serves_alike(bundles, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundles["flat"], old)
    for name in ("docs.offsets.npy", "docs.idhash.npy"):
        (old / "index" / name).unlink()
    shutil.rmtree(old / "index" / "bm25")
    legacy, current = load_bundle(old, device="cpu"), load_bundle(bundles["flat"], device="cpu")
    assert isinstance(legacy.docs, list) and legacy.bm25 is None and isinstance(current.docs, DocStore)
    query = "a query the tiny model encodes"
    with TestClient(create_app(old, ServeConfig())) as client_old, \
            TestClient(create_app(bundles["flat"], ServeConfig())) as client_new:
        hits_old = client_old.post("/search", json={"query": query, "k": 10}).json()["hits"]
        hits_new = client_new.post("/search", json={"query": query, "k": 10}).json()["hits"]
    assert hits_old == hits_new and len(hits_new) == 10
