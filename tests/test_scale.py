"""compute.engine: ray on a real local Ray cluster: the same embeddings, rankings and mined negatives as one process,
and shards that survive a killed worker and a killed driver."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOPICS

# Every test here runs on a real local Ray cluster: the slow tier (make test-fast skips it).
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

SHARD_ROWS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One small cluster for the module: 2 CPUs, a 200 MB object store; the embedding cache in a temp folder."""
    from embtune.compute.shards import FAULT_DIR_ENV, start_local

    fault_dir = tmp_path_factory.mktemp("faults")
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EMBTUNE_CACHE")
    os.environ["EMBTUNE_CACHE"] = str(cache)
    start_local(num_cpus=2, object_store_mb=200, env_vars={FAULT_DIR_ENV: str(fault_dir)})
    yield {"faults": fault_dir, "cache": cache, "address": ray.get_runtime_context().gcs_address}
    ray.shutdown()
    if old is None:
        os.environ.pop("EMBTUNE_CACHE")
    else:
        os.environ["EMBTUNE_CACHE"] = old


@pytest.fixture(scope="module")
def corpus():
    """~400 short passages of topic words (some repeated verbatim: exact ties) and 30 queries."""
    rng = random.Random(0)
    words = {topic: text.split() for topic, text in TOPICS.items()}
    topics = list(words)
    texts = [" ".join(rng.sample(words[topics[i % len(topics)]], 5)) for i in range(380)]
    texts += texts[:20]  # duplicates
    queries = [" ".join(rng.sample(words[t], 3)) for t in topics for _ in range(5)][:30]
    return texts, queries


def compute(**changes):
    from embtune.compute import ComputeConfig

    return ComputeConfig(**{"engine": "ray", "workers": 2, "threads_per_worker": 1, "shard_rows": SHARD_ROWS,
                            "batch_size": 16, **changes})


@pytest.fixture(scope="module")
def encoded(cluster, corpus, tiny_model_dir):
    from embtune.compute.shards import encode_texts
    from embtune.retrieval.encoder import cache_stem, encode_batch, load_encoder

    texts, queries = corpus
    model, key = load_encoder(str(tiny_model_dir))
    shards = encode_texts(model, texts, cache_stem(model, key, texts), compute())
    return {"model": model, "key": key, "shards": shards, "local": encode_batch(model, texts, 16),
            "queries": encode_batch(model, queries, 16)}


def test_ray_embeddings_equal_the_local_engine(encoded, corpus, cluster):
    """Every shard written once, row order kept, vectors within 1e-6 of one process's encode; and ``encode``
    with a cache key goes through the engine when compute.engine is ray (and not otherwise)."""
    import pyarrow.parquet as pq

    from embtune.compute import ComputeConfig, activate
    from embtune.compute.encoding import encode, encode_corpus
    from embtune.compute.shards import ShardSet
    from embtune.retrieval.encoder import cache_dir

    texts, _ = corpus
    shards = encoded["shards"]
    assert shards.starts == list(range(0, len(texts), SHARD_ROWS)) and sorted(shards.encoded) == shards.starts
    rows = np.concatenate([pq.read_table(shards.path(s)).column("row").to_numpy() for s in shards.starts])
    assert rows.tolist() == list(range(len(texts)))
    assert np.abs(shards.matrix() - encoded["local"]).max() <= 1e-6

    activate(compute())
    try:
        through_encode = encode(encoded["model"], texts, 16, cache_key=encoded["key"])
    finally:
        activate(ComputeConfig())
    np.testing.assert_array_equal(through_encode, shards.matrix())  # the cached shards, not a new encode
    assert not list(cache_dir().glob("*.npy"))
    encode(encoded["model"], texts, 16, cache_key=encoded["key"])  # local: today's .npy
    assert len(list(cache_dir().glob("*.npy"))) == 1
    activate(compute())
    try:  # with the local engine's .npy present, Ray still hands back the shards, not the matrix file
        again = encode_corpus(encoded["model"], texts, 16, cache_key=encoded["key"])
    finally:
        activate(ComputeConfig())
    assert isinstance(again, ShardSet) and again.directory == shards.directory and again.encoded == []


def test_ray_openvino_int8_equals_the_local_engine(cluster, corpus, tiny_model_dir):
    """openvino-int8 on Ray: each worker loads the driver's very IR (its calibration) from LOADED_AS and writes
    the bits one process computes, whatever the shard split (the IR runs fixed shapes per text)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from embtune.compute.shards import encode_texts
    from embtune.retrieval.encoder import cache_stem, encode_batch, load_encoder

    texts, _ = corpus
    model, key = load_encoder(str(tiny_model_dir), backend="openvino-int8", calibration_texts=texts, threads=1)
    shards = encode_texts(model, texts, cache_stem(model, key, texts), compute(shard_rows=SHARD_ROWS + 7))
    np.testing.assert_array_equal(shards.matrix(), encode_batch(model, texts, 16))


def test_dense_and_bm25_top_k_equal_one_process(encoded, corpus):
    """Per-shard top-k merged on Ray == one exact search over the whole matrix (scores, rows, tie order), and
    sharded BM25 with corpus-wide statistics == FastBM25 over the whole corpus."""
    from embtune.compute.search import bm25_search, dense_search, texts_hash
    from embtune.compute.shards import plan_texts
    from embtune.retrieval.bm25 import BM25Config, FastBM25, build_tokenizer
    from embtune.retrieval.index import exact_search

    texts, queries = corpus
    shards, query_emb = encoded["shards"], encoded["queries"]
    scores, indices = dense_search(shards, query_emb, 25, compute())
    # FAISS's heap returns rows of equal score in no fixed order; the merge puts them in row order
    want_scores, want_indices = exact_search(shards.matrix(), query_emb, 40)
    order = np.lexsort((want_indices, -want_scores), axis=1)[:, :25]
    want_scores, want_indices = (np.take_along_axis(a, order, axis=1) for a in (want_scores, want_indices))
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(indices, want_indices)

    for settings in (BM25Config(), BM25Config(stemmer="", stopwords="", k1=1.2, b=0.5)):
        scores, indices = bm25_search(plan_texts(texts, SHARD_ROWS), queries, 25, settings, compute(),
                                      texts_hash(texts))
        tokenizer = build_tokenizer(settings)
        full = FastBM25(tokenizer.tokenize_many(texts), k1=settings.k1, b=settings.b)
        want_scores, want_indices = full.search(list(tokenizer.tokenize_many(queries)), 25)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(scores, want_scores)


def test_sharded_bm25_is_built_once_and_searched_without_the_texts(cluster, corpus, tmp_path):
    """The BM25 index of a corpus file is tokenized once (one folder of memory-mapped counts per shard): a second
    index over the same file builds nothing, and with the file gone it still ranks as ``FastBM25`` over the whole
    corpus does, score for score, and scores any rows as ``BM25Okapi.get_scores`` (the mining guards' scores)."""
    from rank_bm25 import BM25Okapi

    from embtune.compute.search import ShardedBM25
    from embtune.compute.shards import plan_jsonl
    from embtune.retrieval.bm25 import BM25Config, FastBM25, build_tokenizer

    texts, queries = corpus
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    items, corpus_hash = plan_jsonl(path, SHARD_ROWS)
    settings = BM25Config()
    first = ShardedBM25(items, corpus_hash, settings, compute())
    assert first.built == [item["start"] for item in items]
    path.unlink()  # nothing below may read the texts again
    index = ShardedBM25(items, corpus_hash, settings, compute())
    assert index.built == []
    scores, indices = index.search(queries, 25)
    tokenizer = build_tokenizer(settings)
    full = FastBM25(tokenizer.tokenize_many(texts))
    want_scores, want_indices = full.search(list(tokenizer.tokenize_many(queries)), 25)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)
    reference = BM25Okapi(list(tokenizer.tokenize_many(texts)))
    rows = np.array([0, 3, 41, 200, 399, 5])
    for query in queries[:5]:
        tokens = tokenizer(query)
        np.testing.assert_array_equal(index.doc_scores(tokens, rows), reference.get_scores(tokens)[rows])


def test_ivf_on_shards_is_trained_once_filled_per_shard_and_probing_every_list_is_exact(encoded, cluster):
    """ShardedIVF: one quantizer trained on a sample, each shard filled into its own saved index (a second open
    fills nothing); probing every list finds exact search's top-10 with its scores, probing one list finds fewer."""
    from embtune.compute.search import ShardedIVF, dense_search

    shards, queries = encoded["shards"], encoded["queries"]
    ivf = ShardedIVF(shards, compute(), nlist=8)
    assert ivf.filled == shards.starts
    assert ShardedIVF(shards, compute(), nlist=8).filled == []
    want_scores, want_rows = dense_search(shards, queries, 10, compute())

    def recall(rows):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), want_rows.tolist())])

    scores, rows = ivf.search(queries, 10, nprobe=8)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert recall(rows) >= 0.97  # rows of equal score (the duplicated passages) may swap at the 10th place
    _, rows_one = ivf.search(queries, 10, nprobe=1)
    assert recall(rows_one) < recall(rows)


def test_a_corpus_file_is_read_by_row_and_its_ivf_exported_on_disk(cluster, corpus, tiny_model_dir, tmp_path):
    """What a stage needs of a corpus file the driver never loads: texts and ids of given rows (read from their
    shard's byte range) equal to the file's, and the shards' IVF merged on disk into one index that finds what
    the sharded IVF finds."""
    import faiss

    from embtune.compute.export import write_ivf_ondisk
    from embtune.compute.search import ShardedIVF
    from embtune.compute.shards import encode_corpus, plan_corpus, read_rows
    from embtune.retrieval.encoder import encode_batch, load_encoder

    texts, queries = corpus
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    items, _ = plan_corpus(path, SHARD_ROWS)
    rows = [399, 0, 41, 40, 7]
    ids, got = read_rows(items, rows)
    assert ids == [f"d{r}" for r in rows] and got == [texts[r] for r in rows]
    shards = encode_corpus(str(tiny_model_dir), path, compute())
    assert shards.ids(np.array(rows)) == ids
    ivf = ShardedIVF(shards, compute(), nlist=8)
    assert write_ivf_ondisk(ivf, tmp_path / "index.faiss") == len(texts)
    index = faiss.read_index(str(tmp_path / "index.faiss"))  # its lists stay in the .ivfdata file
    index.nprobe = 3
    model, _ = load_encoder(str(tiny_model_dir))
    query_emb = encode_batch(model, queries, 16)
    merged_scores, merged_rows = index.search(query_emb, 10)
    sharded_scores, sharded_rows = ivf.search(query_emb, 10, nprobe=3)
    np.testing.assert_allclose(merged_scores, sharded_scores, atol=1e-5)
    assert np.mean([set(a) == set(b) for a, b in zip(merged_rows.tolist(), sharded_rows.tolist())]) >= 0.9


def test_mined_negatives_are_identical(encoded, corpus, tiny_model_dir):
    """mine_negatives over the engine's candidates (dense with the margin guard, BM25) == over one process's."""
    from embtune.compute import ComputeConfig, activate
    from embtune.compute.search import bm25_candidates, dense_candidates
    from embtune.data_prep.mining import Guards, Ranking, bm25_ranking, dense_ranking, mine_negatives
    from embtune.retrieval.bm25 import BM25Config, build_tokenizer

    texts, queries = corpus
    doc_ids = [f"d{i}" for i in range(len(texts))]
    corpus_dict = {d: {"title": "", "text": t} for d, t in zip(doc_ids, texts)}
    query_dict = {f"q{i}": q for i, q in enumerate(queries)}
    qrels = {f"q{i}": {doc_ids[(7 * i) % 380]: 1} for i in range(len(queries))}
    doc_texts = dict(zip(doc_ids, texts))
    query_texts = list(query_dict.values())

    def mine(ranking):
        rows, _ = mine_negatives(corpus_dict, query_dict, qrels, doc_texts, method="dense", num_negatives=3,
                                 ranking=ranking, guards=Guards(margin=0.05))
        return rows

    local = dense_ranking(encoded["local"], encoded["queries"], 30)
    activate(compute())
    try:
        scores, indices, score_docs = dense_candidates(str(tiny_model_dir), texts, query_texts, 30, compute(), 16)
    finally:
        activate(ComputeConfig())
    assert len(mine(Ranking(indices, scores, score_docs, "cosine"))) == len(queries)
    assert mine(Ranking(indices, scores, score_docs, "cosine")) == mine(local)

    settings = BM25Config()
    local = bm25_ranking(texts, query_texts, 30, "fast", build_tokenizer(settings))
    scores, indices, score_docs = bm25_candidates(texts, query_texts, 30, settings, compute())
    sharded = Ranking(indices, scores, score_docs, "bm25")
    positives = np.array([7 * i % 380 for i in range(len(queries))])
    np.testing.assert_array_equal(sharded.score_docs(3, positives), local.score_docs(3, positives))
    assert mine(sharded) == mine(local)


def _shard_files(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.parquet")}


def test_a_worker_killed_mid_encode_is_retried_with_nothing_lost_or_duplicated(cluster, corpus, encoded):
    """The actor encoding shard 120 is SIGKILLed before it writes; Ray Data restarts it, the shard is encoded
    again, and every row is in exactly one file, in order."""
    import pyarrow.parquet as pq

    from embtune.compute.shards import encode_texts

    texts, _ = corpus
    marker = cluster["faults"] / "kill-120"
    marker.touch()
    shards = encode_texts(encoded["model"], texts, "killed-worker", compute(workers=1))
    assert not marker.exists()  # the kill happened
    assert sorted(shards.encoded) == shards.starts
    files = sorted(shards.directory.glob("*.parquet"))
    rows = np.concatenate([pq.read_table(p).column("row").to_numpy() for p in files])
    assert rows.tolist() == list(range(len(texts)))
    assert not list(shards.directory.glob(".*.tmp"))  # the killed write left no partial file behind
    np.testing.assert_array_equal(shards.matrix(), encoded["shards"].matrix())


DRIVER = """
import os, signal, sys, threading, time
from pathlib import Path
import ray
sys.path.insert(0, {root!r})
from embtune.compute.shards import FAULT_DIR_ENV, encode_texts
from embtune.retrieval.encoder import load_encoder
ray.init(address={address!r}, log_to_driver=False,
         runtime_env={{"env_vars": {{"PYTHONPATH": {root!r}, FAULT_DIR_ENV: {faults!r}}}}})
texts = {texts!r}
directory = Path({directory!r})

def kill_after_three():
    while len(list(directory.glob("*.parquet"))) < 3:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_after_three, daemon=True).start()
from embtune.compute import ComputeConfig
model, _ = load_encoder({model!r})
encode_texts(model, texts, "killed-driver", ComputeConfig(engine="ray", workers=1, shard_rows=20, batch_size=16))
print("finished without being killed")
"""


def test_a_killed_driver_resumes_and_encodes_only_the_missing_shards(cluster, corpus, encoded, tiny_model_dir):
    """A driver SIGKILLed after 3 of 20 shards: the rerun keeps every shard file written before (same inode and
    mtime) and encodes exactly the others."""
    from embtune.compute.shards import encode_texts, shard_directory

    texts, _ = corpus
    directory = shard_directory("killed-driver", 20)
    slow = cluster["faults"] / "slow"
    slow.touch()  # 0.2 s per shard, so the driver dies mid-run
    try:
        script = DRIVER.format(root=str(Path(__file__).resolve().parents[1]), address=cluster["address"],
                               faults=str(cluster["faults"]), texts=texts, directory=str(directory),
                               model=str(tiny_model_dir))
        env = {**os.environ, "EMBTUNE_CACHE": str(cluster["cache"])}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    finally:
        slow.unlink()
    assert done.returncode == -9, done.stdout + done.stderr[-2000:]
    time.sleep(0.5)  # a shard in flight when the driver died may still land: that one is done too
    before = _shard_files(directory)
    assert 3 <= len(before) < 20

    shards = encode_texts(encoded["model"], texts, "killed-driver", compute(shard_rows=20))
    after = _shard_files(directory)
    assert len(after) == 20
    assert {name: after[name] for name in before} == before  # not one finished shard encoded again
    assert sorted(f"{s:012d}.parquet" for s in shards.encoded) == sorted(set(after) - set(before))
    assert np.abs(shards.matrix() - encoded["shards"].matrix()).max() <= 1e-6


def test_data_prep_mines_the_same_candidates_on_either_engine(encoded, corpus, tiny_model_dir):
    """data_prep's build_ranking with compute.engine=ray (sharded dense and BM25, fused) == with local. Without the
    verbatim duplicates: the local engine's FAISS returns equal-score rows in no fixed order, which moves their
    fused rank (the engine puts them in row order; test_dense_and_bm25_top_k_equal_one_process)."""
    from embtune.data_prep.run import build_ranking
    from embtune.schema import load_config

    texts, queries = corpus
    texts = texts[:380]
    doc_ids = [f"d{i}" for i in range(len(texts))]
    query_dict = {f"q{i}": q for i, q in enumerate(queries)}
    qrels = {f"q{i}": {doc_ids[(7 * i) % 380]: 1} for i in range(len(queries))}
    common = ["mining.method=hybrid", f"train.base_model={tiny_model_dir}", "mining.rank_end=20"]
    rankings = []
    for engine in ("local", "ray"):
        cfg = load_config(None, [*common, f"compute.engine={engine}", f"compute.shard_rows={SHARD_ROWS}"],
                          sections=["mining", "compute"])
        rankings.append(build_ranking(cfg, dict.fromkeys(doc_ids), dict(zip(doc_ids, texts)), query_dict, qrels))
    np.testing.assert_array_equal(rankings[0].indices, rankings[1].indices)
    np.testing.assert_array_equal(rankings[0].scores, rankings[1].scores)
    # mining.faiss_index: ivf on Ray searches the shards' IVF (not the matrix in the driver); probing every list
    # finds the exact dense candidates
    dense = ["mining.method=dense", f"train.base_model={tiny_model_dir}", "mining.rank_end=20", "compute.engine=ray",
             f"compute.shard_rows={SHARD_ROWS}"]
    exact, ivf = (build_ranking(load_config(None, [*dense, *extra], sections=["mining", "compute"]),
                                dict.fromkeys(doc_ids), dict(zip(doc_ids, texts)), query_dict, qrels)
                  for extra in ([], ["mining.faiss_index=ivf", "mining.ivf_nlist=8", "mining.ivf_nprobe=8"]))
    np.testing.assert_allclose(ivf.scores, exact.scores, atol=1e-5)
    assert np.mean([set(a) == set(b) for a, b in zip(ivf.indices.tolist(), exact.indices.tolist())]) >= 0.9


def test_faiss_and_lancedb_written_from_shards(encoded, tmp_path):
    """A flat index filled shard by shard holds the matrix; an IVF index trained on a sample keeps recall@10 against
    exact search; a LanceDB table appended shard by shard has every row once."""
    import lancedb

    from embtune.compute.export import write_faiss_index, write_lancedb_table
    from embtune.retrieval.index import exact_search

    shards, query_emb = encoded["shards"], encoded["queries"]
    flat = write_faiss_index(shards, tmp_path / "flat.faiss")
    np.testing.assert_array_equal(flat.reconstruct_n(0, flat.ntotal), shards.matrix())
    ivf = write_faiss_index(shards, tmp_path / "ivf.faiss", kind="ivf", nlist=8, nprobe=4, train_rows=400)
    _, exact = exact_search(shards.matrix(), query_emb, 10)
    _, approx = ivf.search(query_emb, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall

    write_lancedb_table(shards, tmp_path / "lance", "corpus")
    table = lancedb.connect(str(tmp_path / "lance")).open_table("corpus").to_arrow()
    assert table.column("id").to_pylist() == [str(i) for i in range(shards.num_rows)]
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vectors, shards.matrix())


def assert_same_run(got: dict, want: dict, tol: float = 1e-6) -> None:
    """The same documents at the same scores for every query, up to the order of exact ties at the cut: the
    sharded search keeps the lower row of a tie, FAISS's heap any one of them."""
    assert got.keys() == want.keys()
    for qid in want:
        got_scores, want_scores = sorted(got[qid].values()), sorted(want[qid].values())
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=tol)
        cut = want_scores[0] + tol if want_scores else 0.0
        assert {d for d, s in got[qid].items() if s > cut} == {d for d, s in want[qid].items() if s > cut}, qid


def test_retriever_searches_shards_as_it_searches_the_matrix(cluster, corpus, encoded):
    """Eval, the probe and the label-free teacher search a Ray-encoded corpus through the core Retriever without
    its matrix: dense at the full and a Matryoshka dim, fused with BM25 under whole-corpus statistics, and with
    some rows replaced (the probe's cut passages), all as over the matrix."""
    from embtune.compute import ComputeConfig, activate
    from embtune.retrieval.bm25 import BM25Config
    from embtune.retrieval.spec import DenseSpec, FusionSpec, Retriever, RetrieverSpec, replace_rows

    texts, queries = corpus
    shards, query_emb = encoded["shards"], encoded["queries"]
    matrix = shards.matrix()
    ids = [f"d{i}" for i in range(len(texts))]
    dense = RetrieverSpec(dense=DenseSpec())
    specs = [dense, dense.replace(dense=DenseSpec(dim=matrix.shape[1] // 2)),
             dense.replace(bm25=BM25Config(), fusion=FusionSpec(method="weighted", dense_weight=0.6, depth=30))]
    cut_rows, cut_vectors = [3, 77, 150, 399], matrix[[10, 11, 12, 13]] * 0.5 + matrix[[20, 21, 22, 23]] * 0.5
    activate(compute())
    try:
        for sharded_emb, matrix_emb in ((shards, matrix), (replace_rows(shards, cut_rows, cut_vectors),
                                                           replace_rows(matrix, cut_rows, cut_vectors))):
            sharded = Retriever(dense, ids, texts, sharded_emb)
            local = Retriever(dense, ids, texts, matrix_emb)
            for spec in specs:
                assert_same_run(sharded.search(queries, query_emb, 10, spec=spec),
                                local.search(queries, query_emb, 10, spec=spec))
            got = sharded.score_stats(specs[2], list(map(str, range(len(queries)))), queries, query_emb)
            want = local.score_stats(specs[2], list(map(str, range(len(queries)))), queries, query_emb)
            for qid, stats in want["dense"].items():
                np.testing.assert_allclose(list(vars(got["dense"][qid]).values()), list(vars(stats).values()),
                                           rtol=1e-9, atol=1e-12)
        assert matrix[3].tolist() != cut_vectors[0].tolist() and shards.overrides == {}  # views, not edits
    finally:
        activate(ComputeConfig())


def test_eval_and_labelfree_on_ray_give_the_local_results(cluster, tiny_beir, tiny_model_dir, tmp_path):
    """The eval stage and label-free data_prep run with compute.engine=ray (corpus in shards, searched there)
    and with the local engine: the same metrics, the same teacher labels and the same corpus embeddings."""
    from datasets import load_from_disk

    from embtune.compute import ComputeConfig, activate
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import run as run_eval
    from embtune.schema import load_config

    def recipe(engine: str, *extra: str, data=tiny_beir):
        return load_config(None, [f"run_dir={tmp_path / engine}", "data.format=beir", f"data.path={data}",
                                  f"train.base_model={tiny_model_dir}", "eval.dims=[8]", "eval.hybrid=[weighted]",
                                  "tracking.report_to=none", f"compute.engine={engine}", "compute.workers=2",
                                  f"compute.shard_rows={SHARD_ROWS}", *extra])

    def shard_dirs() -> set[Path]:  # encoded corpora (BM25's shards, bm25_*, are counted apart)
        return {p for p in (cluster["cache"] / "embeddings").glob("*.shards*") if not p.name.startswith("bm25_")}

    results = {}
    before = shard_dirs()
    for engine in ("ray", "local"):  # ray first: its corpus is not yet in the embedding cache as one matrix
        cfg = recipe(engine)
        activate(cfg.compute)
        try:
            results[engine] = json.loads(Path(run_eval(cfg)["results"]).read_text())
        finally:
            activate(ComputeConfig())
        if engine == "ray":
            assert len(shard_dirs() - before) == 1  # the corpus went to shards (the same ones for every dim)
    assert set(results["ray"]["results"]) == set(results["local"]["results"]) >= {"base", "bm25",
                                                                                 "base+bm25_weighted"}
    for row, metrics in results["local"]["results"].items():
        got = results["ray"]["results"][row]
        for name, value in metrics.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, abs=1e-9), (row, name)
        for dim, dim_metrics in metrics.get("dims", {}).items():
            assert got["dims"][dim] == pytest.approx(dim_metrics, abs=1e-9), (row, dim)
        assert results["ray"]["per_query"][row] == results["local"]["per_query"][row]  # query by query

    from tests.test_labelfree import sentence_corpus

    passages = sentence_corpus(tmp_path / "passages")
    tables, embeddings = {}, {}
    for engine in ("ray", "local"):
        cfg = recipe(engine, "data.queries=labelfree", f"run_dir={tmp_path / 'labelfree' / engine}",
                     "labelfree.depth=8", "labelfree.probe_queries=20",
                     "labelfree.max_unknown_share=1", "labelfree.max_single_letter_share=1",
                     "labelfree.min_headroom=0", "mining.batch_size=16", data=passages)
        activate(cfg.compute)
        before = shard_dirs()
        try:
            outputs = run_data_prep(cfg)
        finally:
            activate(ComputeConfig())
        assert len(shard_dirs() - before) == (engine == "ray")
        tables[engine] = load_from_disk(outputs["train_table"]).to_list()
        embeddings[engine] = np.load(outputs["corpus_embeddings"])
        manifest = json.loads((tmp_path / "labelfree" / engine / "data_prep" / "manifest.json").read_text())
        tables[f"{engine}_choice"] = manifest["teacher_choice"]
    assert np.abs(embeddings["ray"] - embeddings["local"]).max() <= 1e-6
    assert tables["ray_choice"]["choice"] == tables["local_choice"]["choice"]
    assert len(tables["ray"]) == len(tables["local"]) > 0
    for got, want in zip(tables["ray"], tables["local"]):
        assert got["query"] == want["query"] and got["candidates"] == want["candidates"]
        np.testing.assert_allclose(got["teacher_scores"], want["teacher_scores"], atol=1e-5)
        np.testing.assert_allclose(got["base_scores"], want["base_scores"], atol=1e-5)


GERMAN = {"Datei": ["Datei", "Dateien"], "Verzeichnis": ["Verzeichnis", "Verzeichnisse", "Verzeichnissen"],
          "Befehl": ["Befehl", "Befehle", "Befehlen"], "kopieren": ["kopieren", "kopiert", "kopierte"],
          "Rechner": ["Rechner", "Rechners", "Rechnern"], "Sicherung": ["Sicherung", "Sicherungen"],
          "Benutzer": ["Benutzer", "Benutzern", "Benutzers"], "Zeichen": ["Zeichen", "Zeichens"]}


def test_ray_mining_tokenizes_a_german_corpus_as_one_process(cluster, tmp_path):
    """bm25.language: auto on the Ray engine: the whole corpus decides (German stemmer, no English stop words), as
    in one process; the workers alone would have fallen back to English."""
    from embtune.data_prep.run import build_ranking
    from embtune.schema import load_config

    rng = random.Random(1)
    function = "die der und ist mit dem den das nicht auch auf ein eine wird".split()
    texts = [" ".join(rng.choice(rng.choice(list(GERMAN.values()))) if rng.random() < 0.4 else rng.choice(function)
                      for _ in range(14)) for _ in range(200)]
    doc_ids = [f"d{i}" for i in range(len(texts))]
    queries = {f"q{i}": " ".join(rng.choice(forms) for forms in rng.sample(list(GERMAN.values()), 2))
               for i in range(20)}
    qrels = {q: {doc_ids[(11 * i) % 200]: 1} for i, q in enumerate(queries)}
    rankings = {}
    for engine, language in (("local", "auto"), ("ray", "auto"), ("local", "english")):
        cfg = load_config(None, ["mining.method=bm25", "mining.rank_end=10", f"compute.engine={engine}",
                                 f"compute.shard_rows={SHARD_ROWS}", f"bm25.language={language}"],
                          sections=["mining", "compute", "bm25"])
        rankings[engine, language] = build_ranking(cfg, dict.fromkeys(doc_ids), dict(zip(doc_ids, texts)), queries,
                                                   qrels)
    np.testing.assert_array_equal(rankings["local", "auto"].indices, rankings["ray", "auto"].indices)
    np.testing.assert_array_equal(rankings["local", "auto"].scores, rankings["ray", "auto"].scores)
    assert not np.array_equal(rankings["local", "auto"].scores, rankings["local", "english"].scores)


def test_ray_mining_normalizes_the_weighted_fusion_over_the_whole_corpus(encoded, corpus, tiny_model_dir):
    """The engine's candidate lists know the corpus size, so the weighted fusion's whole-corpus statistics cover
    every document, also those no candidate list reaches (40 documents of other words at the end here)."""
    from embtune.data_prep.run import build_ranking
    from embtune.schema import load_config

    texts, queries = corpus
    texts = texts[:380] + [" ".join(f"w{(7 * i + j) % 64}" for j in range(5)) for i in range(40)]
    doc_ids = [f"d{i}" for i in range(len(texts))]
    query_dict = {f"q{i}": q for i, q in enumerate(queries)}
    qrels = {f"q{i}": {doc_ids[(7 * i) % 380]: 1} for i in range(len(queries))}
    rankings = {}
    for method in ("hybrid", "dense"):
        for engine in ("local", "ray"):
            cfg = load_config(None, [f"mining.method={method}", "mining.fusion=weighted", "mining.rank_end=10",
                                     f"train.base_model={tiny_model_dir}", f"compute.engine={engine}",
                                     f"compute.shard_rows={SHARD_ROWS}"], sections=["mining", "compute"])
            rankings[method, engine] = build_ranking(cfg, dict.fromkeys(doc_ids), dict(zip(doc_ids, texts)),
                                                     query_dict, qrels)
    assert rankings["dense", "ray"].num_docs == rankings["hybrid", "ray"].num_docs == len(texts)
    np.testing.assert_array_equal(rankings["hybrid", "local"].indices, rankings["hybrid", "ray"].indices)
