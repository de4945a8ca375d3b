"""The stages' entry points with compute.engine: ray read the corpus file by row (embtune.compute.corpus), never
into a dict, and produce what the local engine produces: data_prep's training table, export's bundle (documents,
vectors, BM25 merged from the shards), from a BEIR folder or its Parquet twin."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import parquet_twin

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

SHARD_ROWS = 20  # tiny_beir's 72 documents: 4 shards, the last one partial


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from embtune.compute.shards import start_local

    old = os.environ.get("EMBTUNE_CACHE")
    os.environ["EMBTUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    start_local(num_cpus=2, object_store_mb=200)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("EMBTUNE_CACHE", None)
    else:
        os.environ["EMBTUNE_CACHE"] = old


def ray_compute():
    from embtune.compute import ComputeConfig

    return ComputeConfig(engine="ray", workers=2, threads_per_worker=1, shard_rows=SHARD_ROWS, batch_size=16)


def with_blank_lines(tiny_beir: Path, out: Path) -> Path:
    """tiny_beir with blank lines in its corpus file (rows are non-blank lines for every reader)."""
    import shutil

    shutil.copytree(tiny_beir, out)
    lines = (tiny_beir / "corpus.jsonl").read_text().splitlines()
    (out / "corpus.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n\n")
    return out


def test_corpus_file_reads_rows_as_load_corpus_and_its_bm25_merges_to_the_one_process_index(
        cluster, tiny_beir, tmp_path):
    from embtune.compute.corpus import ShardedBM25Index, open_corpus
    from embtune.dataio import DataError, document_text, load_corpus
    from embtune.retrieval.bm25 import BM25Config
    from embtune.retrieval.spec import BM25Index

    folder = with_blank_lines(tiny_beir, tmp_path / "beir")
    corpus = open_corpus(folder / "corpus.jsonl", compute=ray_compute())
    reference = load_corpus(folder / "corpus.jsonl")
    assert len(corpus) == len(reference) == 72 and list(corpus.ids) == list(reference)
    for include_title in (True, False):
        assert list(corpus.texts(include_title)) == [document_text(d, include_title) for d in reference.values()]
    doc_id = list(reference)[40]
    assert corpus.row_of(doc_id) == 40 and doc_id in corpus and "no-such-doc" not in corpus

    texts = corpus.texts(True)
    queries = [q["text"] for q in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())]
    settings = BM25Config()
    sharded = ShardedBM25Index(texts, settings, ray_compute())
    local = BM25Index(list(texts), settings)
    for got, want in zip(sharded.search(queries, 10), local.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    for got, query in zip(sharded.score_stats(queries), queries):
        want = local.all_scores(query)
        assert (got.low, got.high) == (want.min(), want.max())
        assert got.mean == pytest.approx(want.mean(), rel=1e-12) and got.std == pytest.approx(want.std(), rel=1e-12)
    loaded = BM25Index.load(sharded.save(tmp_path / "bm25"), settings)
    assert loaded.index.vocab == local.index.vocab
    np.testing.assert_array_equal(loaded.index.doc_freq, local.index.doc_freq)
    assert (loaded.index.weights != local.index.weights).nnz == 0  # the same float64 weights, entry by entry
    for got, want in zip(loaded.search(queries, 10), local.search(queries, 10)):
        np.testing.assert_array_equal(got, want)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="occurs at rows 0 and 1"):
        open_corpus(bad, compute=ray_compute())


def run_stages(root: Path, data: Path, model: Path, engine: str, fmt: str = "beir") -> dict[str, Path]:
    """data_prep, eval and export as the pipeline runs them (train's manifest names ``model``)."""
    from embtune.compute import ComputeConfig, activate
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import run as run_eval
    from embtune.manifest import Stage
    from embtune.schema import load_config
    from embtune.serve.export import run as run_export

    cfg = load_config(None, [f"run_dir={root}", f"data.format={fmt}", f"data.path={data}", "data.dev_fraction=0.3",
                             f"train.base_model={model}", "mining.method=hybrid", "mining.fusion=weighted",
                             "mining.rank_end=12", "mining.num_negatives=3", "mining.on_short=drop", "eval.dims=[]",
                             "eval.hybrid=[weighted]", "tracking.report_to=none",
                             "export.targets=[faiss, lancedb, milvus]", "export.model_name=tiny-stages",
                             f"compute.engine={engine}", "compute.workers=2", f"compute.shard_rows={SHARD_ROWS}",
                             "compute.batch_size=16"])
    activate(cfg.compute)
    try:
        prepared = run_data_prep(cfg)
        Stage("train", cfg.run_dir, config={}).finish({"model": model})
        evaluated = run_eval(cfg)
        exported = run_export(cfg)
    finally:
        activate(ComputeConfig())
    return {**prepared, **evaluated, **exported}


def test_stages_on_ray_read_the_corpus_by_row_and_give_the_local_table_results_and_bundle(
        cluster, tiny_beir, tiny_model_dir, tmp_path, monkeypatch):
    """data_prep -> eval -> export on Ray (from the Parquet twin) and locally (from the BEIR folder): the same
    training rows, metrics and deploy choice, and a bundle with the same documents, vectors and BM25 index. On Ray
    no stage calls load_corpus (the dict of every text)."""
    import faiss
    from datasets import load_from_disk

    import embtune.dataio
    from embtune.serve.bundle import BM25_DIR, DOCS_FILE, INDEX_FILE, load_bundle

    local = run_stages(tmp_path / "local", tiny_beir, tiny_model_dir, "local")
    twin = parquet_twin(tiny_beir, tmp_path / "pq")

    def no_dict(*args, **kwargs):
        raise AssertionError("load_corpus called on the Ray engine")

    monkeypatch.setattr(embtune.dataio, "load_corpus", no_dict)
    on_ray = run_stages(tmp_path / "ray", twin, tiny_model_dir, "ray", "parquet")
    monkeypatch.undo()

    report = json.loads(Path(on_ray["report"]).read_text())
    assert report["corpus"]["read_by_row"] and report["corpus"]["documents"] == 72
    columns = ["query_id", "query", "positive_id", "positive"] + [f"negative_{i}_id" for i in range(1, 4)]
    tables = [load_from_disk(str(run["train_table"])).select_columns(columns).to_list() for run in (local, on_ray)]
    assert len(tables[0]) > 0 and tables[0] == tables[1]

    results = [json.loads(Path(run["results"]).read_text()) for run in (local, on_ray)]
    assert results[0]["recommended"]["row"] == results[1]["recommended"]["row"]
    for row, metrics in results[0]["results"].items():
        assert results[1]["results"][row]["ndcg@10"] == pytest.approx(metrics["ndcg@10"], abs=1e-9), row

    bundles = [Path(run["bundle"]) for run in (local, on_ray)]
    assert (bundles[0] / DOCS_FILE).read_bytes() == (bundles[1] / DOCS_FILE).read_bytes()
    vectors = [faiss.read_index(str(b / INDEX_FILE)).reconstruct_n(0, 72) for b in bundles]
    assert np.abs(vectors[0] - vectors[1]).max() <= 1e-6
    # LanceDB and Milvus: written shard by shard from the corpus file's rows on Ray, as the local export writes them
    from embtune.serve.vectordb import milvus_top_ids, open_lancedb, open_milvus

    tables = [open_lancedb(b).to_arrow().sort_by("id") for b in bundles]
    for column in ("id", "text", "title"):
        assert tables[0].column(column).to_pylist() == tables[1].column(column).to_pylist()
    np.testing.assert_allclose(np.asarray(tables[0].column("vector").to_pylist()),
                               np.asarray(tables[1].column("vector").to_pylist()), atol=1e-6)
    top = []
    for bundle in bundles:
        with open_milvus(bundle, device="cpu") as milvus:
            top.append(milvus_top_ids(milvus.client, milvus.collection, vectors[0][:10], 5))
    assert top[0] == top[1]
    if (bundles[0] / BM25_DIR).is_dir():  # the deploy choice fuses BM25: the Ray bundle's is merged from shards
        served = [load_bundle(b, device="cpu").bm25 for b in bundles]
        queries = ["photosynthesis in plants", "neural network training"]
        for got, want in zip(served[1].search(queries, 10), served[0].search(queries, 10)):
            np.testing.assert_array_equal(got, want)
