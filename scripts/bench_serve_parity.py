"""Serve/eval parity on SciFact test: does ``/search`` return, for every query, the top 10 eval measured?

    python scripts/bench_serve_parity.py --out benchmarks/results/serve_parity.json

1. eval (``eval.run``) on SciFact test (300 queries, 5,183 documents) with the base model ``minilm``: the dense row
   and the hybrid row ``base+bm25_weighted`` (stemmed BM25, per-query min-max, dense weight 0.7 = BM25 weight 0.3,
   depth 100). The 0.3 is the BM25 weight the label-free dev phase chose for its hybrid teacher (cosine +
   0.3 * BM25 / the query's top BM25 score, on dev queries), carried over to min-max fusion as issue 11 asks; nothing
   here is tuned on test. eval writes each row's top 10 per query (``eval.save_runs``) and its spec.
2. A bundle of the same model and corpus; for each spec (dense, hybrid), the spec is the bundle's
   ``retriever.json`` and every test query goes through ``POST /search {"query", "k": 10}`` (FastAPI TestClient,
   one request at a time, ``serve.threads=1``). ``mismatched_queries``: queries whose served top 10 (ids, in order)
   differ from eval's. The served nDCG@10 is computed from the served top 10 with eval's own metric code.
3. Hybrid ``/search`` latency: the 300 requests of step 2 at 5,183 documents, and the same 300 queries against a
   synthetic 100,000-document bundle (see ``synthetic_bundle``) after 20 warm-up requests.
4. Diagnostics: the served query vectors against eval's at two server thread counts; and how many top-10 rankings
   would differ had eval encoded its queries in batches of 64 instead of one at a time as the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import bench_command  # noqa: E402

from embtune.dataio import document_text, load_corpus, load_queries  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.retrieval.encoder import encode, load_encoder, normalize  # noqa: E402
from embtune.retrieval.fusion import ranked  # noqa: E402
from embtune.retrieval.spec import SPEC_FILE, Retriever, RetrieverSpec  # noqa: E402
from embtune.schema import load_config  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
ROWS = {"dense": "base", "hybrid": "base+bm25_weighted"}


def run_eval(run_dir: Path) -> tuple[dict, dict[str, dict[str, list[str]]], list[str]]:
    from embtune.eval.run import read_run, run_file_name
    from embtune.eval.run import run as eval_run

    overrides = [f"run_dir={run_dir}", "data.format=beir", f"data.path={SCIFACT}", "train.base_model=minilm",
                 "eval.split=test", "eval.dims=[]", "eval.hybrid=[weighted]", "eval.hybrid_weight=0.7",
                 "eval.hybrid_depth=100", "eval.significance_resamples=0", "eval.save_runs=10"]
    eval_run(load_config(None, overrides))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    rankings = {row: read_run(run_dir / "eval" / "runs" / run_file_name(row)) for row in ROWS.values()}
    return results, rankings, overrides


def serve_queries(bundle: Path, spec: RetrieverSpec, queries: dict[str, str], qids: list[str],
                  warmup: int = 0, scores: dict | None = None) -> tuple[dict[str, list[str]], list[float], float]:
    """Serve ``spec`` from ``bundle``; (top-10 ids per query, seconds per request, app start seconds).
    ``scores``, when given, receives each query's ``{doc id: served score}``."""
    from fastapi.testclient import TestClient

    from embtune.sections.serve import ServeConfig
    from embtune.serve.app import create_app

    spec.save(bundle / SPEC_FILE)
    start = time.perf_counter()
    app = create_app(bundle, ServeConfig(threads=1, cache_size=0))  # no cache: every request encodes its query
    startup = time.perf_counter() - start
    top10, latency = {}, []
    with TestClient(app) as client:
        for qid in qids[:warmup]:
            client.post("/search", json={"query": queries[qid] + " warm", "k": 10})
        for qid in qids:
            start = time.perf_counter()
            response = client.post("/search", json={"query": queries[qid], "k": 10})
            latency.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"/search {qid}: {response.status_code} {response.text}")
            top10[qid] = [hit["id"] for hit in response.json()["hits"]]
            if scores is not None:
                scores[qid] = {hit["id"]: hit["score"] for hit in response.json()["hits"]}
    return top10, latency, startup


def run_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{qid: {doc id: score}}`` of an eval TREC run file (scores written with repr: exact)."""
    out: dict[str, dict[str, float]] = {}
    for line in open(path):
        qid, _, doc_id, _, score, _ = line.split()
        out.setdefault(qid, {})[doc_id] = float(score)
    return out


def served_ndcg(top10: dict[str, list[str]], qrels_file: Path, corpus: dict, queries: dict[str, str]) -> float:
    """nDCG@10 of the served top 10s, with eval's metric code (pytrec_eval) and the same qrels reader."""
    from embtune.dataio import load_qrels
    from embtune.eval.metrics import evaluate

    qrels = {q: docs for q, docs in load_qrels(qrels_file, corpus, queries).items() if q in top10}
    run = {q: {d: float(10 - rank) for rank, d in enumerate(ids)} for q, ids in top10.items()}
    mean, _ = evaluate(qrels, run, ndcg_k=(10,), mrr_k=(10,), recall_k=(10,), map_k=(10,))
    return mean["ndcg@10"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_ms": round(float(ms.mean()), 1), "requests": len(ms)}


def synthetic_bundle(bundle: Path, out: Path, n_docs: int, seed: int = 0) -> Path:
    """A ``n_docs`` bundle for latency only: the model of ``bundle``; documents made from SciFact's by shuffling the
    words of a random SciFact document (so BM25 sees SciFact's vocabulary and lengths); embeddings random unit
    vectors (a flat index costs the same whatever the vectors; encoding 100k documents on 2 CPU cores would take
    hours). Rankings on it mean nothing."""
    import faiss

    rng = np.random.default_rng(seed)
    source = [json.loads(line) for line in open(bundle / "index" / "docs.jsonl")]
    if out.exists():
        shutil.rmtree(out)
    (out / "index").mkdir(parents=True)
    shutil.copytree(bundle / "model", out / "model")
    with open(out / "index" / "docs.jsonl", "w") as handle:
        for i in range(n_docs):
            doc = source[int(rng.integers(len(source)))]
            words = doc["text"].split()
            rng.shuffle(words)
            handle.write(json.dumps({"_id": f"syn{i}", "title": doc.get("title", ""), "text": " ".join(words)}) + "\n")
    dim = faiss.read_index(str(bundle / "index" / "corpus.faiss")).d
    index = faiss.IndexFlatIP(dim)
    for start in range(0, n_docs, 20000):
        index.add(normalize(rng.standard_normal((min(20000, n_docs - start), dim)).astype(np.float32)))
    faiss.write_index(index, str(out / "index" / "corpus.faiss"))
    return out


def batched_encoding_diagnostic(results: dict, rankings: dict, corpus: dict, queries: dict[str, str],
                                qids: list[str]) -> dict:
    """Top-10 rankings that change when the queries are encoded in batches of 64 instead of one at a time."""
    model, key = load_encoder("minilm")
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    doc_emb = encode(model, doc_texts, 64, cache_key=key)
    batched = encode(model, [queries[q] for q in qids], 64)  # (n_queries, dim)
    single = encode(model, [queries[q] for q in qids], 1)
    out = {"max_abs_diff": float(np.abs(batched - single).max())}
    for name, row in ROWS.items():
        spec = RetrieverSpec.from_dict(results["specs"][row])
        run = Retriever(spec, doc_ids, doc_texts, doc_emb).search([queries[q] for q in qids], batched, 10, qids)
        out[f"{name}_mismatched_queries"] = sum(ranked(run[q]) != rankings[row][q] for q in qids)
    return out


def thread_diagnostic(bundle: Path, queries: dict[str, str], qids: list[str]) -> dict:
    """Served query vectors (``Bundle.encode``, one query per call) vs eval's (``encode(model, texts, 1)`` at torch's
    default thread count), with the server at 1 thread (as in this benchmark) and at the default."""
    import threading

    import torch

    from embtune.serve.bundle import load_bundle

    texts = [queries[q] for q in qids]
    model, _ = load_encoder("minilm")
    reference = encode(model, texts, 1)  # (n_queries, dim), what eval computed
    out = {"eval_torch_threads": torch.get_num_threads()}
    for threads in (0, 1):  # 0 first: torch.set_num_threads(1) in a worker leaves state behind for later threads
        bundle_ = load_bundle(bundle, threads=threads)
        rows: list = []
        # A thread of its own, as the server's encoder thread: torch's thread count is per calling thread.
        worker = threading.Thread(target=lambda: rows.append(np.concatenate([bundle_.encode([t]) for t in texts])))
        worker.start()
        worker.join()
        diff = np.abs(rows[0] - reference).max(axis=1)  # (n_queries,)
        out[f"serve_threads_{threads}"] = {"vectors_not_bitwise_equal": int((diff > 0).sum()),
                                           "max_abs_diff": float(diff.max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_parity.json"))
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_serve_parity"))
    parser.add_argument("--synthetic-docs", type=int, default=100_000)
    parser.add_argument("--skip-diagnostic", action="store_true")
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(args.run_dir)
    started = time.time()

    results, rankings, overrides = run_eval(run_dir)
    qids = sorted(rankings["base"])
    corpus = load_corpus(SCIFACT / "corpus.jsonl")
    queries = load_queries(SCIFACT / "queries.jsonl")

    from embtune.models import resolve_model
    from embtune.serve.bundle import build_bundle

    bundle = build_bundle(resolve_model("minilm"), [{"_id": d, **doc} for d, doc in corpus.items()],
                          run_dir / "bundle")
    record: dict = {"benchmark": "serve_parity", "dataset": "BEIR SciFact test (../shared/data/beir/scifact)",
                    "model": "minilm (all-MiniLM-L6-v2, base, no training)", "queries": len(qids),
                    "num_documents": len(corpus), "eval_overrides": overrides}
    mismatched_total = 0
    for name, row in ROWS.items():
        spec = RetrieverSpec.from_dict(results["specs"][row])
        served_scores: dict = {}
        top10, latency, startup = serve_queries(bundle, spec, queries, qids, scores=served_scores)
        mismatched = [q for q in qids if top10[q] != rankings[row][q]]
        from embtune.eval.run import run_file_name

        eval_scores = run_scores(run_dir / "eval" / "runs" / run_file_name(row))
        score_diff = max(abs(served_scores[q][d] - eval_scores[q][d]) for q in qids for d in served_scores[q]
                         if d in eval_scores[q])
        mismatched_total += len(mismatched)
        record[name] = {"eval_row": row, "spec": spec.to_dict(), "describe": spec.describe(),
                        "mismatched_queries": len(mismatched), "mismatched_examples": mismatched[:5],
                        "max_abs_score_diff_top10": score_diff,
                        "eval_ndcg@10": round(100 * results["results"][row]["ndcg@10"], 2),
                        "served_ndcg@10": round(100 * served_ndcg(top10, SCIFACT / "qrels" / "test.tsv",
                                                                  corpus, queries), 2),
                        "latency_5k": {**percentiles(latency), "app_start_seconds": round(startup, 1)}}
        print(name, {k: v for k, v in record[name].items() if k not in ("spec",)}, flush=True)
    record["mismatched_queries"] = mismatched_total
    record["recommended_by_eval"] = {k: results["recommended"][k] for k in ("row", "ndcg@10", "best_single", "why")}

    big = synthetic_bundle(bundle, run_dir / "bundle_100k", args.synthetic_docs)
    spec = RetrieverSpec.from_dict(results["specs"][ROWS["hybrid"]])
    _, latency, startup = serve_queries(big, spec, queries, qids, warmup=20)
    record["latency_hybrid"] = {
        "5k": record["hybrid"]["latency_5k"],
        "100k": {**percentiles(latency), "num_documents": args.synthetic_docs, "app_start_seconds": round(startup, 1),
                 "corpus": "synthetic: SciFact documents with their words shuffled (BM25 sees SciFact's vocabulary "
                           "and lengths); embeddings random unit vectors (a flat index costs the same whatever "
                           "the vectors); rankings on it are meaningless, only the time counts"},
        "how": "FastAPI TestClient in-process, one request at a time, cache off (every request encodes its query "
               "on the CPU, 1 torch thread), k=10; app_start_seconds includes loading the model and building "
               "FastBM25 once",
    }
    shutil.rmtree(big)
    record["query_vectors"] = {
        **thread_diagnostic(bundle, queries, qids),
        "note": "the served query vector (encoded alone in a worker thread, as the server's encoder thread does) "
                "against eval's (encoded alone in the main thread at torch's default thread count): torch's CPU "
                "kernels can reduce in another order in another thread configuration, which moves a few vectors' "
                "last bits; serve_threads_0 = the server's default (torch's own thread count)"}
    if not args.skip_diagnostic:
        record["batched_query_encoding"] = {
            **batched_encoding_diagnostic(results, rankings, corpus, queries, qids),
            "note": "eval encodes each query alone, as /search does; this counts the top-10 rankings that would "
                    "differ from the served ones had eval encoded them in batches of 64 (padding changes the "
                    "last bits)"}
    record.update({"targets": {"mismatched_queries": 0, "hybrid_ndcg_abs_diff_max": 0.01},
                   "met": mismatched_total == 0 and abs(record["hybrid"]["eval_ndcg@10"]
                                                        - record["hybrid"]["served_ndcg@10"]) <= 1.0,
                   "wall_seconds": round(time.time() - started, 1), **provenance.record()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("queries", "mismatched_queries", "met", "latency_hybrid")}, indent=1))


if __name__ == "__main__":
    main()
