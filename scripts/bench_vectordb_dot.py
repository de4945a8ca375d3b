"""Chroma and LanceDB parity on SciFact for a dot-product model: do they return the served bundle's /search top-10?

    python scripts/bench_vectordb_dot.py                       # MiniLM without Normalize, full dim and 256 dims
    python scripts/bench_vectordb_dot.py --max-docs 300 --max-queries 20 --dims 0 --out /tmp/vd.json  # smoke

Builds MiniLM with its Normalize module removed and ``similarity_fn_name: dot`` (as scripts/bench_milvus_parity.py
does), then for each ``--dims`` value a bundle as the export stage writes it (``serve.bundle.build_bundle`` with
``retriever.json`` serving ``dense.dim`` = that dim; ``serve.vectordb.export_vectordb`` with ``targets [chroma,
lancedb]`` and ``export.vectordb.dim`` = that dim), and sends every test query through three routes from its text:
the bundle's app (``/search``, via FastAPI's TestClient), Chroma's ``query(query_texts=...)`` (the embedding function
the collection carries) and LanceDB's ``search(text)`` (the table's embedding function) in the distance type the
manifest records. A query is mismatched when its ten ids or their order differ; ``ties_only`` counts the mismatched
ones whose scores at every differing rank agree to 1e-5. ``cosine_space`` is what both stores searched before a
dot-product model kept its norms: LanceDB's same table searched by cosine with renormalized query vectors (rescored
by the dot product to tell ties apart). nDCG@10 scores the order each route returned (rank-based, through
``embtune.eval.score``). Writes benchmarks/results/vectordb_dot_parity.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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

from embtune.dataio import load_beir  # noqa: E402
from embtune.eval import score  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.retrieval.encoder import normalize  # noqa: E402
from embtune.retrieval.spec import DenseSpec, RetrieverSpec  # noqa: E402
from embtune.sections.export import VectorDBConfig  # noqa: E402
from embtune.serve.bundle import build_bundle  # noqa: E402
from embtune.serve.vectordb import QueryEncoder, export_vectordb, open_chroma, open_lancedb  # noqa: E402

K = 10
METRICS = (f"ndcg@{K}", f"recall@{K}")


def compare(found: list[list[dict]], served: list[list[dict]], query_ids: list[str], qrels, seconds: float) -> dict:
    differ = differing(found, served)
    metrics = score(qrels, rank_run(query_ids, found, K), metrics=METRICS).metrics
    return {"same_top10": len(query_ids) - len(differ), "mismatched_queries": len(differ),
            "mismatched_ties_only": sum(only_ties(found[i], served[i]) for i in differ),
            "mismatched_query_ids": [query_ids[i] for i in differ][:20],
            "ndcg@10": round(100 * metrics["ndcg@10"], 2), "recall@10": round(100 * metrics["recall@10"], 2),
            "seconds_per_query": round(seconds / len(query_ids), 4)}


def measure(model_dir: str, dim: int, docs: list[dict], query_ids: list[str], query_texts: list[str], qrels,
            work: Path) -> dict:
    start = time.perf_counter()
    bundle = build_bundle(model_dir, docs, work / f"bundle-{dim}", device="cpu",
                          spec=RetrieverSpec(dense=DenseSpec(dim=dim)))
    bundle_seconds = time.perf_counter() - start
    settings = export_vectordb(bundle, model_dir, docs, ["chroma", "lancedb"], VectorDBConfig(dim=dim),
                               name="scifact")

    start = time.perf_counter()
    served = served_hits(bundle, query_texts, K)
    routes = {"served": compare(served, served, query_ids, qrels, time.perf_counter() - start)}

    # Chroma's ip distance is 1 - dot, LanceDB's dot distance likewise, and both cosine distances 1 - cosine.
    start = time.perf_counter()
    result = open_chroma(bundle).query(query_texts=query_texts, n_results=K, include=["distances"])
    chroma = [[{"id": i, "score": 1 - d} for i, d in zip(ids, dists)]
              for ids, dists in zip(result["ids"], result["distances"])]
    routes["chroma"] = compare(chroma, served, query_ids, qrels, time.perf_counter() - start)

    table = open_lancedb(bundle)
    metric = settings["lancedb"]["metric"]
    start = time.perf_counter()
    lance = [[{"id": row["id"], "score": 1 - row["_distance"]}
              for row in table.search(text).distance_type(metric).limit(K).to_list()] for text in query_texts]
    routes["lancedb"] = compare(lance, served, query_ids, qrels, time.perf_counter() - start)

    if not settings["renormalized"]:  # the cosine space both stores searched before; scores rescored by dot product
        query_vectors = QueryEncoder(bundle)(query_texts)  # (n_queries, dim) with their norms
        vectors = {row["id"]: np.asarray(row["vector"], np.float32) for row in table.to_arrow().to_pylist()}
        start = time.perf_counter()
        cosine = []
        for vector, unit in zip(query_vectors, normalize(query_vectors)):
            ids = table.search(unit, vector_column_name="vector").distance_type("cosine").limit(K).to_arrow()["id"]
            cosine.append([{"id": i, "score": float(vector @ vectors[i])} for i in ids.to_pylist()])
        routes["cosine_space"] = compare(cosine, served, query_ids, qrels, time.perf_counter() - start)

    row = {"dim": settings["dim"], "manifest": {k: settings[k] for k in ("metric", "renormalized",
                                                                         "similarity_fn_name")}
           | {"chroma_metric": settings["chroma"]["metric"], "lancedb_metric": metric,
              "chroma_hnsw": settings["chroma"]["hnsw"]},
           "bundle_seconds": round(bundle_seconds, 2),
           "write_seconds": {t: settings[t]["write_seconds"] for t in ("chroma", "lancedb")},
           "routes": routes}
    print(f"dim {row['dim']}: " + ", ".join(f"{name} {r['same_top10']}/{len(query_ids)} same "
                                             f"({r['mismatched_ties_only']} ties) nDCG@10 {r['ndcg@10']}"
                                             for name, r in routes.items()), flush=True)
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--dims", type=int, nargs="+", default=[0, 256], help="export.vectordb.dim values (0 = full)")
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--max-queries", type=int, default=0, help="first N queries only (smoke runs; 0 = all)")
    parser.add_argument("--note", default="", help="what the result file should say about the machine")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vectordb_dot_parity.json"))
    args = parser.parse_args(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    provenance = Provenance.start(bench_command(argv))

    data = load_beir(args.data, args.split)
    docs = [{"_id": doc_id, **doc} for doc_id, doc in data.corpus.items()][: args.max_docs or None]
    query_ids = list(data.queries)[: args.max_queries or None]
    query_texts = [data.queries[q] for q in query_ids]
    work = Path(tempfile.mkdtemp(prefix="vectordb_dot_"))
    try:
        model_dir = str(dot_minilm(work / "dot-minilm"))
        rows = {}
        for dim in args.dims:
            row = measure(model_dir, dim, docs, query_ids, query_texts, data.qrels, work)
            rows[str(row["dim"])] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "vectordb_dot_parity",
        "description": __doc__.split("\n\n")[2].replace("\n", " "),
        "dataset": "BEIR SciFact (../shared/data/beir/scifact)",
        "split": args.split,
        "num_documents": len(docs),
        "num_queries": len(query_ids),
        "model": "minilm-dot (all-MiniLM-L6-v2 without Normalize, similarity_fn_name dot)",
        "k": K,
        "target": "every query: Chroma's and LanceDB's top-10 equal /search's, differing only by 1e-5 ties",
        "met": all(r["routes"][t]["mismatched_queries"] == r["routes"][t]["mismatched_ties_only"]
                   for r in rows.values() for t in ("chroma", "lancedb")),
        "dims": rows,
        "note": args.note,
        **provenance.record(packages=("chromadb", "lancedb", "faiss-cpu")),
    }
    write_result(args.out, result)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
