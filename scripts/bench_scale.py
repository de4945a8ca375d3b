"""compute.engine: ray against local on a synthetic corpus of short passages, ONNX int8 MiniLM.

    python scripts/bench_scale.py                       # 30k and 300k passages -> benchmarks/results/scale.json
    python scripts/bench_scale.py --small 3000 --large 0 --out /tmp/scale.json   # a quick look
    python scripts/bench_scale.py --pipeline 30000 300000 3000000 --shard-rows 25000 --nprobe 256 \
        --deadline 12:10                            # the stages on the Ray engine -> scale.json's pipeline_runs

``--pipeline`` (``child_pipeline``): per corpus size, one driver process runs the stages' entry points, data_prep
(hybrid mining: BM25 and an IVF on shards), eval (the encoder, BM25 and their weighted fusion, the fusion weight
chosen on a dev split) and export (an IVF-PQ bundle, with BM25 merged from the shards when the chosen retriever
fuses it), with ``compute.engine: ray`` on a BEIR folder written for the size, with a ``StaticEmbedding`` encoder
built from MiniLM's tokenizer and word table (the plumbing, not retrieval quality). It records the driver's sampled
peak RSS, seconds per stage, BM25 ms per query and the mining IVF's recall@10 against exact search; the file's
other keys are kept (``benchlib.write_result``).

The corpus: SciFact corpus sentences (read from /work/shared at run time, never copied into the repo), shuffled
with a seed; past the first pass over the sentences each passage is a sentence with its words shuffled, so passages
stay short and distinct. Written as BEIR ``corpus.jsonl`` files into a scratch folder.

Measured, each in its own process (peak RSS is per process) with its own empty embedding cache:
- ``local``: one process, ``encode_batch`` over all texts, onnxruntime at one thread;
- ``ray_1`` / ``ray_2``: ``encode_corpus`` on a local Ray cluster, 1 or 2 actors of one thread each; docs/s over
  the whole call (actor start and model load included) and over the actors' encode time alone;
- ``mismatched_queries``: SciFact train queries' dense top-10 from the local matrix (the core ``Retriever``, one
  query at a time, as eval and ``/search`` search) against the Ray shards (``dense_search``, one query at a time as
  the ``Retriever`` searches shards): queries whose ten rows differ;
- ``driver_rss``: the Ray driver's peak RSS at ``--small`` and at ``--large`` passages;
- ``resume``: a Ray driver SIGKILLed (with the cluster it started) once 40% of the shards are written, then rerun:
  the shards it found (``resumed_shards``) and how many of those it wrote again (``reencoded_shards``, by inode and
  mtime).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCIFACT = Path("/work/shared/data/beir/scifact")
MODEL, BACKEND, SEQ = "minilm", "onnx-int8", 128


def sentences() -> list[str]:
    out = []
    with open(SCIFACT / "corpus.jsonl") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    return out


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = sentences()
    with open(path, "w") as handle:
        for i in range(n):
            if i % len(pool) == 0:
                rng.shuffle(pool)
            text = pool[i % len(pool)]
            if i >= len(pool):  # a later pass: the same sentence's words in another order
                words = text.split()
                rng.shuffle(words)
                text = " ".join(words)
            handle.write(json.dumps({"_id": f"p{i}", "title": "", "text": text}) + "\n")


def write_mixed_corpus(path: Path, n: int, seed: int = 0) -> None:
    """The --pipeline corpus: past the first pass over the sentences, a passage is a sentence with three of its
    words replaced by words of other sentences, shuffled. A mean-pooled static encoder ignores word order, so
    ``write_corpus``'s reshuffled copies would be hundreds of identical vectors (ties everywhere in the ANN
    recall); these are distinct near-duplicates instead."""
    rng = random.Random(seed)
    pool = sentences()
    with open(path, "w") as handle:
        for i in range(n):
            text = pool[i % len(pool)]
            if i >= len(pool):
                words = text.split()
                for _ in range(3):
                    words[rng.randrange(len(words))] = rng.choice(rng.choice(pool).split())
                rng.shuffle(words)
                text = " ".join(words)
            handle.write(json.dumps({"_id": f"p{i}", "title": "", "text": text}) + "\n")


def train_queries(n: int) -> list[str]:
    train = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]}
    queries = [json.loads(line) for line in open(SCIFACT / "queries.jsonl")]
    return [q["text"] for q in queries if q["_id"] in train][:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# --- one measurement per process ------------------------------------------------------------------------------------

def child_local(corpus: Path, arrays: Path, queries: int, backend: str) -> dict:
    import numpy as np

    from embtune.compute.shards import read_source
    from embtune.retrieval.encoder import encode_batch, load_encoder
    from embtune.retrieval.fusion import ranked
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    model, _ = load_encoder(MODEL, SEQ, backend=backend, threads=1)
    _, texts = read_source({"kind": "jsonl", "path": str(corpus), "offset": 0, "length": corpus.stat().st_size}, 0)
    began = time.perf_counter()
    matrix = encode_batch(model, texts, 64, progress=True)  # (n, 384)
    seconds = time.perf_counter() - began
    query_texts = train_queries(queries)
    query_emb = encode_batch(model, query_texts, 64)
    # The exact top-10 as eval and /search compute it: the core Retriever, one query at a time.
    doc_ids = [str(i) for i in range(len(texts))]
    run = Retriever(RetrieverSpec(dense=DenseSpec()), doc_ids, texts, matrix).search(query_texts, query_emb, 10)
    top = np.array([[int(d) for d in ranked(run[str(i)], 10)] for i in range(len(query_texts))], dtype=np.int64)
    np.save(f"{arrays}.top10.npy", top)
    np.save(f"{arrays}.queries.npy", query_emb)
    return {"passages": len(texts), "seconds": round(seconds, 1), "docs_per_s": round(len(texts) / seconds, 1),
            "peak_rss_mb": round(peak_rss_mb())}


def child_ray(corpus: Path, arrays: Path | None, workers: int, shard_rows: int, queries_from: str,
              backend: str) -> dict:
    import numpy as np

    from embtune.compute import ComputeConfig
    from embtune.compute.search import dense_search
    from embtune.compute.shards import encode_corpus, start_local

    compute = ComputeConfig(engine="ray", workers=workers, threads_per_worker=1, shard_rows=shard_rows)
    began = time.perf_counter()
    start_local(num_cpus=workers, object_store_mb=300)
    started = time.perf_counter()
    shards = encode_corpus(MODEL, corpus, compute, backend=backend, max_seq_length=SEQ)
    seconds = time.perf_counter() - started
    result = {"passages": shards.num_rows, "workers": workers, "shards": len(shards.starts),
              "encoded_shards": len(shards.encoded), "cluster_start_s": round(started - began, 1),
              "seconds": round(seconds, 1), "docs_per_s": round(shards.num_rows / seconds, 1),
              "driver_peak_rss_mb": round(peak_rss_mb())}
    if queries_from and arrays is not None:
        query_emb = np.load(queries_from)
        _, top = dense_search(shards, query_emb, 10, compute, one_at_a_time=True)  # as the Retriever searches shards
        np.save(f"{arrays}.top10.npy", top)
    return result


# --- the pipeline on shards (--pipeline) ---------------------------------------------------------------------------

def build_static_encoder(folder: Path) -> Path:
    """A cheap encoder for the plumbing runs: sentence-transformers' ``StaticEmbedding`` over MiniLM's tokenizer and
    MiniLM's own input word-embedding table (mean of the token vectors, normalized), saved as a model folder that
    ``load_encoder`` (driver and Ray actors alike) loads like any other."""
    if (folder / "modules.json").is_file():
        return folder
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, StaticEmbedding

    from embtune.models import resolve_model

    base = SentenceTransformer(resolve_model(MODEL, must_exist=True), device="cpu")
    table = base[0].auto_model.embeddings.word_embeddings.weight.detach().cpu().numpy()  # (vocab, 384)
    SentenceTransformer(modules=[StaticEmbedding(base.tokenizer, embedding_weights=table), Normalize()],
                        device="cpu").save(str(folder))
    return folder


def write_beir_folder(folder: Path, passages: int, queries: int, seed: int = 0) -> Path:
    """The --pipeline dataset as a BEIR folder: ``write_mixed_corpus`` passages, and 2 x ``queries`` queries (five
    words of a seeded passage each, that passage their one relevant document), half in qrels/train.tsv (mined,
    a dev share carved from them) and half in qrels/test.tsv (eval's split). Queries are read by byte offset from
    a first pass over the file, so writing them never holds the corpus either."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    if not corpus.is_file():
        write_mixed_corpus(corpus, passages)
    rng = random.Random(seed)
    rows = set(rng.sample(range(passages), 2 * queries))
    picked: dict[int, dict] = {}
    with open(corpus) as handle:
        for row, line in enumerate(handle):
            if row in rows:
                picked[row] = json.loads(line)
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "queries.jsonl", "w") as q_out, open(folder / "qrels" / "train.tsv", "w") as train, \
            open(folder / "qrels" / "test.tsv", "w") as test:
        for out in (train, test):
            out.write("query-id\tcorpus-id\tscore\n")
        for i, row in enumerate(sorted(picked)):
            words = picked[row]["text"].split()
            q_out.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.sample(words, min(5, len(words))))}) + "\n")
            (train if i % 2 == 0 else test).write(f"q{i}\t{picked[row]['_id']}\t1\n")
    return folder


def child_pipeline(folder: Path, encoder: str, shard_rows: int, scratch: Path, nprobe: int) -> dict:
    """data_prep, eval and export through their entry points (``embtune.data_prep.run.run``, ``embtune.eval.run.run``,
    ``embtune.serve.export.run``) on the Ray engine, the corpus read by row from its file
    (``embtune.compute.corpus``), timed stage by stage. Train is not run (it reads the mined table, not the
    corpus): its manifest names the encoder, so eval measures it as ``finetuned`` and export ships it. Then,
    from what the stages left in the cache: BM25 ms per query and the mining IVF's recall@10 against exact search."""
    import math

    import numpy as np

    from embtune.compute import activate
    from embtune.compute.corpus import ShardedBM25Index, open_corpus
    from embtune.compute.search import ShardedIVF, dense_search
    from embtune.compute.shards import start_local
    from embtune.data_prep.run import run as run_data_prep
    from embtune.dataio import load_qrels, load_queries
    from embtune.eval.run import run as run_eval
    from embtune.manifest import Stage
    from embtune.retrieval.encoder import encode_batch, load_encoder
    from embtune.schema import load_config
    from embtune.serve.export import run as run_export

    seconds: dict[str, float] = {}
    first = time.perf_counter()

    def timed(name: str, began: float) -> None:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - began, 1)

    began = time.perf_counter()
    start_local(num_cpus=2, object_store_mb=300)
    timed("cluster_start", began)
    passages = sum(1 for line in open(folder / "corpus.jsonl", "rb") if line.strip())
    nlist = max(1, int(math.sqrt(passages)))
    cfg = load_config(None, [
        f"run_dir={scratch / 'run'}", "data.format=beir", f"data.path={folder}", "data.dev_fraction=0.2",
        f"train.base_model={encoder}", "mining.method=hybrid", "mining.faiss_index=ivf", f"mining.ivf_nlist={nlist}",
        f"mining.ivf_nprobe={nprobe}", "mining.rank_end=30", "mining.num_negatives=4", "mining.batch_size=512",
        "eval.compare_base=false", "eval.dims=[]", "eval.hybrid=[weighted]", "eval.batch_size=512",
        "export.targets=[faiss]", "export.index.kind=ivf_pq", "tracking.report_to=none", "compute.engine=ray",
        "compute.workers=2", "compute.threads_per_worker=1", f"compute.shard_rows={shard_rows}",
        "compute.batch_size=512"])
    activate(cfg.compute)
    peak_by_stage = {"cluster_start": round(peak_rss_mb())}  # the process's peak so far, after each stage
    began = time.perf_counter()
    prepared = run_data_prep(cfg)
    timed("data_prep", began)
    peak_by_stage["data_prep"] = round(peak_rss_mb())
    Stage("train", cfg.run_dir, config={}).finish({"model": encoder})
    began = time.perf_counter()
    evaluated = run_eval(cfg)
    timed("eval", began)
    peak_by_stage["eval"] = round(peak_rss_mb())
    began = time.perf_counter()
    exported = run_export(cfg)
    timed("export", began)
    peak_by_stage["export"] = round(peak_rss_mb())
    stages_seconds = round(time.perf_counter() - first, 1)
    peak_after_stages = round(peak_rss_mb())

    # What the stages built, read back from the cache: BM25 on shards and the mining IVF against exact search.
    corpus = open_corpus(folder / "corpus.jsonl")
    texts = corpus.texts(True)
    queries = load_queries(folder / "queries.jsonl")
    test = load_qrels(folder / "qrels" / "test.tsv", corpus, queries)
    query_texts = [queries[q] for q in sorted(test)]
    bm25 = ShardedBM25Index(texts, cfg.bm25, cfg.compute)  # built by data_prep: only the statistics are merged
    began = time.perf_counter()
    bm25.sharded.search(query_texts, 100)
    bm25_seconds = time.perf_counter() - began
    from embtune.compute.encoding import encode_corpus

    model, key = load_encoder(encoder)
    shards = encode_corpus(model, texts, 512, cache_key=key, role="document")  # the shards the stages wrote
    query_emb = encode_batch(model, query_texts, 64)
    exact_scores, exact_rows = dense_search(shards, query_emb, 10, cfg.compute)
    ivf = ShardedIVF(shards, cfg.compute, nlist)  # the one mining trained and filled
    by_nprobe = {}
    for probes in (8, 16, 32, 64, 128, 256, 512):
        _, rows = ivf.search(query_emb, 10, min(probes, nlist))
        by_nprobe[str(probes)] = round(float(np.mean([len(set(a) & set(b)) / 10
                                                     for a, b in zip(rows.tolist(), exact_rows.tolist())])), 4)
    results = json.loads(Path(evaluated["results"]).read_text())
    report = json.loads(Path(prepared["report"]).read_text())
    manifest = json.loads((Path(exported["bundle"]) / "manifest.json").read_text())
    return {"passages": passages, "shards": len(shards.starts), "shard_rows": shard_rows,
            "test_queries": len(query_texts), "train_queries": report["train_queries"],
            "dev_queries": report["dev_queries"], "driver_peak_rss_mb": round(peak_rss_mb()),
            "driver_peak_rss_mb_after_stages": peak_after_stages, "driver_peak_rss_mb_by_stage": peak_by_stage,
            "seconds": stages_seconds,
            "stage_seconds": seconds, "entry_points": ["embtune.data_prep.run.run", "embtune.eval.run.run",
                                                       "embtune.serve.export.run"],
            "mining_rows_read": report["corpus"]["rows_mining_read"], "training_rows": report["rows"],
            "bm25_ms_per_query": round(1000 * bm25_seconds / len(query_texts), 2),
            "bm25_vocab": len(bm25.sharded.stats.vocab), "ivf_nlist": nlist, "ivf_nprobe": nprobe,
            "ann_mining_recall@10": by_nprobe.get(str(nprobe)) if nprobe <= nlist else by_nprobe[str(512)],
            "ann_recall@10_by_nprobe": by_nprobe,
            "metrics": {row: {m: round(100 * v, 2) for m, v in values.items() if isinstance(v, float)}
                        for row, values in results["results"].items()},
            "deployed": results["recommended"]["row"], "bundle_retriever": manifest.get("retriever"),
            "bundle_index": manifest.get("index"), "exported_vectors": manifest.get("num_docs")}


def pipeline_runs(args, provenance) -> None:
    """``--pipeline``: the whole pipeline on the Ray engine at each size, into scale.json's ``pipeline_runs``."""
    from scripts.benchlib import write_result

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_scale_pipeline_"))
    scratch.mkdir(parents=True, exist_ok=True)
    encoder = build_static_encoder(scratch / "static_minilm")
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    headline = {key: value for key, value in previous.items() if key != "other_runs"}
    runs = []
    deadline = 0.0
    if args.deadline:
        import datetime as dt

        hour, minute = map(int, args.deadline.split(":"))
        deadline = dt.datetime.now(dt.timezone.utc).replace(hour=hour, minute=minute, second=0).timestamp()
    for passages in args.pipeline:
        folder = write_beir_folder(scratch / f"beir_{passages}", passages, args.queries)
        work = scratch / f"run_{passages}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        run = run_child(["pipeline", str(folder), "--encoder", str(encoder), "--shard-rows", str(args.shard_rows),
                         "--scratch", str(work), "--nprobe", str(args.nprobe)], scratch / f"cache_{passages}",
                        deadline)
        runs.append({"passages": passages, **run})
        print(json.dumps(runs[-1], indent=2), flush=True)
        if run.get("killed_at_deadline"):
            break
    done = [r for r in runs if not r.get("killed_at_deadline")]
    small = next((r for r in done if r["passages"] == min(args.pipeline)), None)
    largest = max(done, key=lambda r: r["passages"]) if done else None
    out = {**headline, "pipeline_runs": runs,
           "pipeline_provenance": provenance.record(),
           "pipeline_note": args.note + " The stages' entry points (data_prep, eval, export) on the Ray engine, the "
           "corpus read by row from its file (embtune.compute.corpus); train is not run (its manifest names the "
           "encoder). Synthetic passages (SciFact corpus sentences, words reshuffled past the "
           "first pass) and a StaticEmbedding encoder (MiniLM's tokenizer and word-embedding table, mean-pooled): "
           "what is measured is the plumbing (driver RSS, seconds per stage, BM25 and IVF on shards), not retrieval "
           "quality. Driver peak RSS is the sampled RSS of the driver process alone (Ray's workers are other "
           "processes).",
           "pipeline_encoder": "StaticEmbedding(minilm word embeddings)"}
    if small and largest:
        out["pipeline_driver_rss_ratio"] = round(largest["driver_sampled_peak_rss_mb"]
                                                 / small["driver_sampled_peak_rss_mb"], 2)
        out["pipeline_largest_passages"] = largest["passages"]
        out["bm25_ms_per_query_largest"] = largest["bm25_ms_per_query"]
        out["ann_mining_recall@10"] = min(r["ann_mining_recall@10"] for r in done)
        if largest["passages"] >= 3_000_000:
            out["bm25_ms_per_query_3m"] = largest["bm25_ms_per_query"]
    write_result(out_path, out)


def share_onnx_export(cache: Path) -> None:
    """Each measurement has its own embedding cache, but the int8 export is made once, in the usual place."""
    onnx = Path(os.environ.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / "onnx"
    cache.mkdir(parents=True, exist_ok=True)
    if onnx.is_dir() and not (cache / "onnx").exists():
        (cache / "onnx").symlink_to(onnx)


def run_child(args: list[str], cache: Path, deadline: float = 0.0) -> dict:
    """One measurement in its own process; past ``deadline`` (epoch seconds) it is killed, and what it had done
    (shard files written, the peak RSS sampled so far) is returned with ``"killed_at_deadline": true``."""
    import psutil

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = {**os.environ, "EMBTUNE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    share_onnx_export(cache)
    began = time.time()
    process = subprocess.Popen([sys.executable, __file__, "--child", *args, "--child-out", str(out)], env=env,
                               start_new_session=True)
    sampled = 0
    while process.poll() is None:
        try:
            sampled = max(sampled, psutil.Process(process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if deadline and time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            files = list((cache / "embeddings").glob("*.shards*/*.parquet"))
            return {"killed_at_deadline": True, "seconds": round(time.time() - began, 1), "shards_written": len(files),
                    "driver_sampled_peak_rss_mb": round(sampled / 2**20)}
        time.sleep(0.5)
    if process.returncode:
        raise RuntimeError(f"bench child {args} exited with {process.returncode}")
    return {**json.loads(out.read_text()), "driver_sampled_peak_rss_mb": round(sampled / 2**20)}


def resume_run(corpus: Path, cache: Path, shard_rows: int) -> dict:
    """Kill a Ray driver (and the cluster it started) at 40% of the shards; rerun; compare the shard files."""
    from embtune.compute.shards import plan_jsonl

    total = len(plan_jsonl(corpus, shard_rows)[0])
    env = {**os.environ, "EMBTUNE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    share_onnx_export(cache)
    process = subprocess.Popen([sys.executable, __file__, "--child", "ray", str(corpus), "--workers", "2",
                                "--shard-rows", str(shard_rows), "--child-out", str(out)], env=env,
                               start_new_session=True)
    deadline = time.time() + 3600
    while time.time() < deadline and process.poll() is None:
        files = list((cache / "embeddings").glob("*.shards*/*.parquet"))
        if len(files) >= 0.4 * total:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    process.wait()
    time.sleep(1.0)
    directory = next((cache / "embeddings").glob("*.shards*"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.parquet")}
    rerun = run_child(["ray", str(corpus), "--workers", "2", "--shard-rows", str(shard_rows)], cache)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.parquet")}
    return {"shards": total, "killed_at_shards": len(before), "resumed_shards": len(before),
            "reencoded_shards": sum(after[name] != stamp for name, stamp in before.items()),
            "encoded_on_rerun": rerun["encoded_shards"], "all_shards_present": len(after) == total,
            "rerun_seconds": rerun["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=30_000, help="passages for the engine comparison")
    parser.add_argument("--large", type=int, default=300_000, help="passages for the driver RSS at scale (0: skip)")
    parser.add_argument("--shard-rows", type=int, default=2_500)
    parser.add_argument("--queries", type=int, default=300, help="SciFact train queries for the top-10 comparison")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--scratch", default="", help="folder for the corpora and caches (default: a temp folder)")
    parser.add_argument("--deadline", default="", help="UTC HH:MM after which the large run is stopped")
    parser.add_argument("--note", default="", help="conditions of the run (load on the machine, nice level)")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--queries-from", default="", help=argparse.SUPPRESS)
    parser.add_argument("--arrays", default="", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=BACKEND, help=argparse.SUPPRESS)
    parser.add_argument("--fp32-control", type=int, default=5_000,
                        help="passages for the same top-10 comparison with fp32 ONNX (batch-independent vectors)")
    parser.add_argument("--pipeline", type=int, nargs="*", default=None,
                        help="instead: the pipeline on shards at these corpus sizes (e.g. 30000 300000 3000000) "
                             "into scale.json's pipeline_runs, the first size being the RSS ratio's base")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query in --pipeline mining")
    parser.add_argument("--encoder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, corpus = args.child[0], Path(args.child[1])
        arrays = Path(args.arrays) if args.arrays else None
        if kind == "pipeline":
            result = child_pipeline(corpus, args.encoder, args.shard_rows, Path(args.scratch), args.nprobe)
            Path(args.child_out).write_text(json.dumps(result))
            return
        result = (child_local(corpus, arrays, args.queries, args.backend) if kind == "local"
                  else child_ray(corpus, arrays, args.workers, args.shard_rows, args.queries_from, args.backend))
        Path(args.child_out).write_text(json.dumps(result))
        return

    import numpy as np

    from embtune.manifest import Provenance
    from scripts.benchlib import bench_command

    provenance = Provenance.start(bench_command(sys.argv))
    if args.pipeline:
        pipeline_runs(args, provenance)
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_scale_"))
    scratch.mkdir(parents=True, exist_ok=True)
    small = scratch / f"corpus_{args.small}.jsonl"
    write_corpus(small, args.small)
    out_path = Path(args.out)
    result = {"benchmark": "scale", **provenance.record(),
              "note": args.note, "model": MODEL, "backend": BACKEND, "max_seq_length": SEQ,
              "threads_per_worker": 1, "shard_rows": args.shard_rows, "num_passages_small": args.small}

    def save() -> None:
        result.update(provenance.record())  # the load average at the latest save
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    local_arrays, ray_arrays = scratch / "local", scratch / "ray2"
    result["local"] = run_child(["local", str(small), "--queries", str(args.queries), "--arrays", str(local_arrays)],
                                scratch / "cache_local")
    save()
    for workers in (1, 2):
        child = ["ray", str(small), "--workers", str(workers), "--shard-rows", str(args.shard_rows)]
        if workers == 2:
            child += ["--queries-from", f"{local_arrays}.queries.npy", "--arrays", str(ray_arrays)]
        result[f"ray_{workers}"] = run_child(child, scratch / f"cache_ray{workers}")
        save()
    result["ray_2v1_ratio"] = round(result["ray_2"]["docs_per_s"] / result["ray_1"]["docs_per_s"], 2)
    result["ray_vs_local_ratio"] = round(result["ray_1"]["docs_per_s"] / result["local"]["docs_per_s"], 2)
    local_top, ray_top = np.load(f"{local_arrays}.top10.npy"), np.load(f"{ray_arrays}.top10.npy")
    result["top10_queries"] = len(local_top)
    result["mismatched_queries"] = int((local_top != ray_top).any(axis=1).sum())
    save()

    # int8 dynamic quantization takes each batch's activation range, so a passage's vector depends on the passages
    # batched with it, and shards batch differently from one whole-corpus call. fp32 ONNX has no such dependence:
    # the same comparison there isolates what the engine itself changes.
    control = scratch / f"corpus_{args.fp32_control}.jsonl"
    write_corpus(control, args.fp32_control)
    prefix = scratch / "fp32"
    local = run_child(["local", str(control), "--queries", str(args.queries), "--arrays", f"{prefix}_local",
                       "--backend", "onnx"], scratch / "cache_fp32_local")
    ray2 = run_child(["ray", str(control), "--workers", "2", "--shard-rows", str(args.shard_rows), "--backend", "onnx",
                      "--queries-from", f"{prefix}_local.queries.npy", "--arrays", f"{prefix}_ray"],
                     scratch / "cache_fp32_ray")
    local_top, ray_top = np.load(f"{prefix}_local.top10.npy"), np.load(f"{prefix}_ray.top10.npy")
    result["fp32_control"] = {"backend": "onnx", "passages": args.fp32_control, "local": local, "ray_2": ray2,
                              "mismatched_queries": int((local_top != ray_top).any(axis=1).sum())}
    save()

    result["resume"] = resume_run(small, scratch / "cache_resume", args.shard_rows)
    result["resumed_shards"] = result["resume"]["resumed_shards"]
    result["reencoded_shards"] = result["resume"]["reencoded_shards"]
    save()

    if args.large:
        large = scratch / f"corpus_{args.large}.jsonl"
        write_corpus(large, args.large)
        deadline = 0.0
        if args.deadline:
            import datetime as dt

            hour, minute = map(int, args.deadline.split(":"))
            now = dt.datetime.now(dt.timezone.utc)
            deadline = now.replace(hour=hour, minute=minute, second=0).timestamp()
        result["ray_2_large"] = run_child(["ray", str(large), "--workers", "2", "--shard-rows",
                                           str(args.shard_rows)], scratch / "cache_large", deadline)
        result["num_passages"] = args.large
        result["driver_rss_ratio"] = round(result["ray_2_large"]["driver_sampled_peak_rss_mb"]
                                           / result["ray_2"]["driver_sampled_peak_rss_mb"], 2)
        save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
