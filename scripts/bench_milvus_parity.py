"""Milvus export parity on SciFact: does Milvus's top-10 equal the served bundle's /search top-10?

    python scripts/bench_milvus_parity.py                  # minilm (cosine), all 5,183 documents, 300 test queries
    python scripts/bench_milvus_parity.py --dot            # and MiniLM without Normalize, scoring by dot product
    python scripts/bench_milvus_parity.py --max-docs 300 --max-queries 20 --out /tmp/mp.json  # smoke

Builds a bundle of the SciFact corpus as the export stage does (``serve.bundle.build_bundle``: the FAISS index
``/search`` serves; ``serve.vectordb.export_vectordb`` with ``targets [milvus]``: milvus-lite in
``<bundle>/vectordb/milvus.db``, FLAT inner product, Milvus's BM25 function over the text), then sends every test
query through both routes from its text: the bundle's app (``/search``, via FastAPI's TestClient) and
``open_milvus(bundle).search`` (the bundle's query encoder, then Milvus's search). A query is mismatched when its ten
ids or their order differ; ``ties_only`` counts the mismatched ones whose scores at every differing rank agree to
1e-5 (float32 ties: the engines sum the inner product in different orders). nDCG@10 scores the order each route
returned (rank-based, through ``embtune.eval.score``). Milvus's BM25 (its analyzer and its BM25) is scored beside
embtune's BM25 row (the ``bm25`` section's default, through ``embtune.eval.evaluate``) for information: they are
different rankers and no parity is expected. Writes benchmarks/results/milvus_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (  # also puts the repo root on sys.path
    ROOT,
    bench_command,
    differing,
    dot_minilm,
    only_ties,
    rank_run,
    served_hits,
    write_result,
)

from embtune.dataio import document_text, load_beir  # noqa: E402
from embtune.eval import evaluate, score  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from embtune.retrieval.bm25 import BM25Config  # noqa: E402
from embtune.retrieval.spec import Retriever, RetrieverSpec  # noqa: E402
from embtune.sections.export import MilvusConfig, VectorDBConfig  # noqa: E402
from embtune.serve.bundle import build_bundle  # noqa: E402
from embtune.serve.vectordb import export_vectordb, open_milvus  # noqa: E402

K = 10
METRICS = (f"ndcg@{K}", f"recall@{K}")


def measure(name: str, model_dir: str, docs: list[dict], query_ids: list[str], query_texts: list[str], qrels,
            work: Path) -> dict:
    start = time.perf_counter()
    bundle = build_bundle(model_dir, docs, work / name / "bundle", device="cpu")
    bundle_seconds = time.perf_counter() - start
    settings = export_vectordb(bundle, model_dir, docs, ["milvus"], VectorDBConfig(), name="scifact",
                               milvus=MilvusConfig())
    entry = settings["milvus"]

    start = time.perf_counter()
    served = served_hits(bundle, query_texts, K)
    served_seconds = time.perf_counter() - start

    with open_milvus(bundle) as milvus:
        start = time.perf_counter()
        found = milvus.search(query_texts, K)
        milvus_seconds = time.perf_counter() - start
        bm25_hits = milvus.client.search(milvus.collection, data=query_texts, anns_field="sparse", limit=K,
                                         search_params={"metric_type": "BM25"}, output_fields=["id"])
        bm25 = [[{"id": h["id"], "score": h["distance"]} for h in row] for row in bm25_hits]

    differ = differing(found, served)
    other_sets = [i for i in differ if {h["id"] for h in found[i]} != {h["id"] for h in served[i]}]
    ties = [i for i in differ if only_ties(found[i], served[i])]
    scored = {route: score(qrels, rank_run(query_ids, hits, K), metrics=METRICS).metrics
              for route, hits in (("served", served), ("milvus", found), ("milvus_bm25", bm25))}
    doc_ids = [d["_id"] for d in docs]
    embtune_bm25 = evaluate(Retriever(RetrieverSpec(dense=None, bm25=BM25Config()), doc_ids,
                                      [document_text(d) for d in docs]),
                            dict(zip(query_ids, query_texts)), qrels, k=K, metrics=METRICS).metrics
    row = {
        "model": name, "similarity_fn_name": entry["similarity_fn_name"], "renormalized": entry["renormalized"],
        "queries": len(query_ids), "same_top10": len(query_ids) - len(differ),
        "same_top10_fraction": round(1 - len(differ) / len(query_ids), 4),
        "mismatched_queries": len(differ), "mismatched_ties_only": len(ties), "mismatched_sets": len(other_sets),
        "mismatched_query_ids": [query_ids[i] for i in differ][:20],
        "ndcg@10": {route: round(100 * m["ndcg@10"], 2) for route, m in scored.items()}
        | {"embtune_bm25": round(100 * embtune_bm25["ndcg@10"], 2)},
        "recall@10": {route: round(100 * m["recall@10"], 2) for route, m in scored.items()}
        | {"embtune_bm25": round(100 * embtune_bm25["recall@10"], 2)},
        "bundle_seconds": round(bundle_seconds, 2), "milvus_write_seconds": entry["write_seconds"],
        "milvus_bytes": entry["bytes"], "milvus_rows": entry["num_rows"], "milvus_batch_size": entry["batch_size"],
        "served_seconds_per_query": round(served_seconds / len(query_ids), 4),
        "milvus_seconds_per_query": round(milvus_seconds / len(query_ids), 4),
        "milvus_manifest_entry": entry,
    }
    print(f"{name}: {row['same_top10']}/{row['queries']} same top-10 ({len(ties)} of the {len(differ)} others "
          f"ties only), nDCG@10 {row['ndcg@10']}, write {entry['write_seconds']}s", flush=True)
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--dot", action="store_true", help="also a dot-product MiniLM (its corpus is encoded anew)")
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--max-queries", type=int, default=0, help="first N queries only (smoke runs; 0 = all)")
    parser.add_argument("--note", default="", help="what the result file should say about the machine")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "milvus_parity.json"))
    args = parser.parse_args(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    provenance = Provenance.start(bench_command(argv))

    data = load_beir(args.data, args.split)
    docs = [{"_id": doc_id, **doc} for doc_id, doc in data.corpus.items()][: args.max_docs or None]
    query_ids = list(data.queries)[: args.max_queries or None]
    query_texts = [data.queries[q] for q in query_ids]
    work = Path(tempfile.mkdtemp(prefix="milvus_parity_"))
    models = [("minilm", lambda: resolve_model("minilm"))]
    if args.dot:
        models.append(("minilm-dot", lambda: str(dot_minilm(work / "dot-minilm"))))
    rows: list[dict] = []
    try:
        for done, (name, model) in enumerate(models, 1):
            rows.append(measure(name, model(), docs, query_ids, query_texts, data.qrels, work))
            # after each model, so that a run stopped during the next one keeps what it measured
            result = {
                "benchmark": "milvus_parity",
                "description": __doc__.split("\n\n")[2].replace("\n", " "),
                "dataset": "BEIR SciFact (../shared/data/beir/scifact)",
                "split": args.split,
                "num_documents": len(docs),
                "num_queries": len(query_ids),
                "k": K,
                "target": ">= 99% of queries with the same top-10 (ids and order) as /search",
                "met": all(row["same_top10_fraction"] >= 0.99 for row in rows),
                "models": {row["model"]: row for row in rows},
                "models_not_yet_done": [n for n, _ in models[done:]],
                "note": args.note,
                **provenance.record(packages=("pymilvus", "milvus-lite", "faiss-cpu")),
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            if done == 1:
                write_result(args.out, result)  # keeps the file's previous run under other_runs
            else:  # the same run, one more model: replace this run's own record, keep the earlier runs
                previous = json.loads(Path(args.out).read_text()).get("other_runs")
                Path(args.out).write_text(json.dumps({**result, **({"other_runs": previous} if previous else {})},
                                                     indent=2) + "\n")
            print(f"wrote {args.out}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
