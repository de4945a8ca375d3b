"""Deployment sweep on seeded clustered vectors: the exact index is the ground truth for the approximate ones."""

import numpy as np
import pytest

from embtune.eval.sweep import best_compact, format_sweep, plot_sweep, sweep_model
from embtune.retrieval.encoder import normalize
from embtune.sections.eval import SweepConfig


@pytest.fixture(scope="module")
def sweep_rows():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 64))
    docs = normalize(centers[rng.integers(0, 40, 3000)] + 0.6 * rng.normal(size=(3000, 64)))  # (3000, 64)
    queries = normalize(docs[:200] + 0.3 * rng.normal(size=(200, 64)))  # each query is a noisy copy of a document
    doc_ids = [f"d{i}" for i in range(3000)]
    query_ids = [f"q{i}" for i in range(200)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(200)}
    cfg = SweepConfig(dims=[64, 32], ivf_nlist=32, ivf_nprobe=[1, 32], hnsw_ef_search=[16, 256], pq_bytes=[8])
    return sweep_model("m", docs, queries, doc_ids, query_ids, qrels, cfg)


def row(rows, dim, index, precision, **params):
    return next(r for r in rows if r["dim"] == dim and r["index"] == index and r["precision"] == precision
                and all(r["params"].get(k) == v for k, v in params.items()))


@pytest.mark.slow
def test_every_family_at_every_dim(sweep_rows):
    families = {(r["index"], r["precision"]) for r in sweep_rows if r["dim"] == 32}
    assert families == {("flat", "fp32"), ("flat", "int8"), ("flat", "int4"), ("flat", "binary"),
                        ("flat", "binary+rescore_bits"), ("flat", "binary+rescore_int8"),
                        ("flat", "binary+rescore_fp32"), ("ivf", "fp32"), ("hnsw", "fp32"), ("ivfpq", "pq8x8")}


def test_exact_and_exhaustive_indexes_match_flat(sweep_rows):
    for dim in (64, 32):
        assert row(sweep_rows, dim, "flat", "fp32")["recall@10_vs_exact"] == 1.0
        assert row(sweep_rows, dim, "ivf", "fp32", nprobe=32)["recall@10_vs_exact"] >= 0.99  # nprobe = nlist
        assert row(sweep_rows, dim, "hnsw", "fp32", efSearch=256)["recall@10_vs_exact"] >= 0.95
        assert row(sweep_rows, dim, "flat", "int8")["recall@10_vs_exact"] >= 0.9
        int4 = row(sweep_rows, dim, "flat", "int4")["recall@10_vs_exact"]
        assert 0.6 <= int4 <= row(sweep_rows, dim, "flat", "int8")["recall@10_vs_exact"]


def test_fewer_probes_and_binary_lose_recall_and_rescoring_wins_it_back(sweep_rows):
    assert row(sweep_rows, 64, "ivf", "fp32", nprobe=1)["recall@10_vs_exact"] < 0.99
    binary = row(sweep_rows, 64, "flat", "binary")["recall@10_vs_exact"]
    rescored = {docs: row(sweep_rows, 64, "flat", f"binary+rescore_{docs}", rescore_multiplier=10)["recall@10_vs_exact"]
                for docs in ("bits", "int8", "fp32")}
    assert binary < 0.9 and rescored["bits"] > binary + 0.05
    assert rescored["fp32"] >= rescored["int8"] - 0.02 and rescored["int8"] > rescored["bits"]
    more = row(sweep_rows, 64, "flat", "binary+rescore_fp32", rescore_multiplier=4)["recall@10_vs_exact"]
    assert rescored["fp32"] > more  # more candidates, more of the exact top 10 found


def test_bytes_per_vector_follow_precision(sweep_rows):
    n, dim = 3000, 64
    fp32 = row(sweep_rows, dim, "flat", "fp32")
    assert fp32["index_bytes"] == pytest.approx(n * dim * 4, rel=0.01)
    assert row(sweep_rows, dim, "flat", "int8")["index_bytes"] == pytest.approx(n * dim, rel=0.02)
    assert row(sweep_rows, dim, "flat", "int4")["index_bytes"] == pytest.approx(n * dim / 2, rel=0.02)
    assert row(sweep_rows, dim, "flat", "binary")["index_bytes"] == pytest.approx(n * dim / 8, rel=0.02)
    rescore = row(sweep_rows, dim, "flat", "binary+rescore_int8")
    assert rescore["bytes_per_vector"] == pytest.approx(dim / 8 + dim, rel=0.02)  # the int8 vectors count too
    assert row(sweep_rows, dim, "flat", "binary+rescore_bits")["bytes_per_vector"] == pytest.approx(dim / 8, rel=0.02)
    assert row(sweep_rows, 32, "flat", "fp32")["bytes_vs_fp32_flat"] == pytest.approx(0.5, rel=0.01)
    best = best_compact(sweep_rows, "m", 1 / 8)
    assert best["bytes_vs_fp32_flat"] <= 1 / 8


def test_table_and_plot(sweep_rows, tmp_path):
    text = format_sweep(sweep_rows)
    assert "hnsw/fp32(M=32,efSearch=256)" in text and text.count("\n") > len(sweep_rows)
    path = plot_sweep(sweep_rows + [{**r, "model": "other"} for r in sweep_rows], tmp_path / "sweep.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 300_000


def test_pareto_front_keeps_only_undominated_rows():
    from embtune.eval.sweep import pareto_front

    rows = [{"bytes_per_vector": b, "ndcg@10": n, "id": i}
            for i, (b, n) in enumerate([(10, 0.5), (20, 0.4), (30, 0.6), (30, 0.55), (40, 0.6), (50, 0.7)])]
    assert [r["id"] for r in pareto_front(rows)] == [0, 2, 5]
