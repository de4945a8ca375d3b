"""The served route as the vector-database parity tests compare against it: the bundle's ``/search``, and the
dot-product model they export (tests/test_vectordb_export.py, tests/test_milvus_export.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app

K = 10


def dot_model(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model without its Normalize module, scoring by dot product: its vectors' norms differ."""
    from sentence_transformers import SentenceTransformer

    tiny = SentenceTransformer(str(tiny_model_dir), device="cpu")
    modules = [module for module in tiny if type(module).__name__ != "Normalize"]
    SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="dot").save(str(folder))
    return folder


def served_top10(bundle: Path, queries: list[str]) -> list[list[dict]]:
    """The served route: the bundle's /search, as a client calls it; each query's hits ({"id", "score", ...})."""
    with TestClient(create_app(bundle, ServeConfig(threads=1, cache_size=0))) as client:
        out = []
        for query in queries:
            response = client.post("/search", json={"query": query, "k": K})
            assert response.status_code == 200, response.text
            out.append(response.json()["hits"])
    return out


def ids_of(hits: list[list[dict]]) -> list[list[str]]:
    return [[hit["id"] for hit in row] for row in hits]


def only_ties(got: list[dict], want: list[dict], tolerance: float = 1e-5) -> bool:
    """The two rankings differ only where their scores at the same rank agree to ``tolerance`` (relative)."""
    return len(got) == len(want) and all(
        a["id"] == b["id"] or abs(a["score"] - b["score"]) <= tolerance * max(1.0, abs(b["score"]))
        for a, b in zip(got, want))
