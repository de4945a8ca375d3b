"""Export parity on SciFact: does each export target return FAISS's exact top-10?

    python scripts/bench_export_parity.py                       # minilm, full dimension, float32
    python scripts/bench_export_parity.py --dim 256 --precision float16 --out benchmarks/results/x.json
    python scripts/bench_export_parity.py --max-docs 300 --max-queries 20 --chroma-builds 0 --out /tmp/ep.json  # smoke

Builds a bundle of the SciFact corpus (5,183 documents) the way the export stage does (``serve.bundle`` for the
model, ``serve.vectordb.export_vectordb`` for Chroma and LanceDB; the corpus embeddings come from the shared cache),
embeds the 300 test queries with the bundle's query encoder, and compares each target's top-10 with the exact top-10
over the same stored vectors (the core ``Retriever``, as eval's entry ``embtune.eval.evaluate`` and ``/search`` run
it). A query is mismatched when its ten ids or their order differ. nDCG@10 scores
the order each target returned (rank-based scores, so pytrec_eval cannot reorder ties). Chroma is then rebuilt
``--chroma-builds`` times with the export's HNSW settings, with ef_search 200 and with Chroma's own defaults
(ef_construction 100, ef_search 100, max_neighbors 16), counting the mismatched queries of each build.
Writes benchmarks/results/export_parity.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
from benchlib import ROOT, bench_command  # also puts the repo root on sys.path

from embtune.dataio import document_text, load_beir  # noqa: E402
from embtune.eval import Queries, evaluate, score  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from embtune.retrieval.encoder import encode, load_encoder, normalize, uses_cosine  # noqa: E402
from embtune.retrieval.fusion import ranked  # noqa: E402
from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec  # noqa: E402
from embtune.sections.export import VectorDBConfig  # noqa: E402
from embtune.serve.bundle import DOCS_FILE, INDEX_FILE, build_bundle  # noqa: E402
from embtune.serve.vectordb import (  # noqa: E402
    QueryEncoder,
    chroma_top_ids,
    dir_bytes,
    export_vectordb,
    export_vectors,
    lancedb_top_ids,
    open_chroma,
    open_lancedb,
)

K = 10
CHROMA_DEFAULTS = {"chroma_ef_construction": 100, "chroma_ef_search": 100, "chroma_max_neighbors": 16}


def compare(name: str, top_ids: list[list[str]], expected: list[list[str]], query_ids: list[str], qrels,
            seconds: float, write: dict) -> dict:
    mismatched = [qid for qid, got, want in zip(query_ids, top_ids, expected) if got != want]
    other_set = [qid for qid, got, want in zip(query_ids, top_ids, expected) if set(got) != set(want)]
    run = {qid: {doc: float(K - rank) for rank, doc in enumerate(ids)} for qid, ids in zip(query_ids, top_ids)}
    metrics = score(qrels, run, metrics=(f"ndcg@{K}", f"mrr@{K}", f"recall@{K}", f"map@{K}")).metrics
    row = {"queries": len(query_ids), "mismatched_queries": len(mismatched),
           "mismatched_sets": len(other_set), "mismatched_query_ids": mismatched[:20],
           "ndcg@10": round(100 * metrics["ndcg@10"], 2), "recall@10": round(100 * metrics["recall@10"], 2),
           "query_seconds": round(seconds, 3), **write}
    print(f"{name:>22}: {row['mismatched_queries']}/{row['queries']} mismatched ({row['mismatched_sets']} sets), "
          f"nDCG@10 {row['ndcg@10']}, write {row['write_seconds']}s, {row['bytes_on_disk']} bytes", flush=True)
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="minilm", help="a model folder or embtune alias (default: minilm)")
    parser.add_argument("--dim", type=int, default=0, help="export.vectordb.dim (0 = the model's full dimension)")
    parser.add_argument("--precision", default="float32", choices=["float32", "float16"])
    parser.add_argument("--chroma-builds", type=int, default=5, help="Chroma rebuilds per HNSW setting")
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--max-queries", type=int, default=0, help="first N queries only (smoke runs; 0 = all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_parity.json"))
    args = parser.parse_args(argv[1:])
    provenance = Provenance.start(bench_command(argv))

    data = load_beir(args.data, args.split)
    docs = [{"_id": doc_id, **doc} for doc_id, doc in data.corpus.items()][: args.max_docs or None]
    query_ids = list(data.queries)[: args.max_queries or None]
    model_dir = resolve_model(args.model)
    cfg = VectorDBConfig(dim=args.dim, precision=args.precision)

    work = Path(tempfile.mkdtemp(prefix="export_parity_"))
    try:
        bundle = build_bundle(model_dir, None, work / "bundle")  # the model only; each target is timed below
        # The faiss target as build_bundle writes it (IndexFlatIP over the stored vectors, docs.jsonl beside it).
        model, key = load_encoder(model_dir)
        if not uses_cosine(model):  # its reference below is a cosine ranking
            raise SystemExit(f"{args.model} scores by {model.similarity_fn_name}: this script compares cosine "
                             "rankings; use scripts/bench_vectordb_dot.py for a dot-product model")
        stored = export_vectors(encode(model, [document_text(d) for d in docs], 64, cache_key=key),
                                args.dim, args.precision)  # (n_docs, dim)
        start = time.perf_counter()
        (bundle / INDEX_FILE).parent.mkdir(parents=True, exist_ok=True)
        with open(bundle / DOCS_FILE, "w") as handle:
            handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        index = faiss.IndexFlatIP(stored.shape[1])
        index.add(normalize(stored))
        faiss.write_index(index, str(bundle / INDEX_FILE))
        faiss_write = {"write_seconds": round(time.perf_counter() - start, 3),
                       "bytes_on_disk": dir_bytes(bundle / INDEX_FILE.split("/")[0])}

        settings = export_vectordb(bundle, model_dir, docs, ["chroma", "lancedb"], cfg, name="scifact")
        query_vectors = QueryEncoder(bundle)([data.queries[q] for q in query_ids])  # (n_queries, dim)
        # Exact top-10 over the stored vectors, through the core Retriever that eval and /search run.
        doc_ids, doc_texts = [doc["_id"] for doc in docs], [document_text(doc) for doc in docs]
        queries = Queries(query_ids, [data.queries[q] for q in query_ids], normalize(query_vectors))
        spec = RetrieverSpec(dense=DenseSpec())
        exact = evaluate(Retriever(spec, doc_ids, doc_texts, normalize(stored)), queries, data.qrels, k=K)
        expected = [ranked(exact.run[qid], K) for qid in query_ids]

        targets = {}
        start = time.perf_counter()
        # The faiss target as the server reads it: the bundle's index file searched by the same Retriever.
        served = Retriever(spec, doc_ids, doc_texts, faiss.read_index(str(bundle / INDEX_FILE))).search(
            queries.texts, queries.emb, K, query_ids)
        targets["faiss"] = compare("faiss", [ranked(served[qid], K) for qid in query_ids], expected, query_ids,
                                   data.qrels, time.perf_counter() - start,
                                   {**faiss_write, "index": "IndexFlatIP (exact)"})
        for target, top_ids in (("chroma", chroma_top_ids), ("lancedb", lancedb_top_ids)):
            store = open_chroma(bundle) if target == "chroma" else open_lancedb(bundle)
            start = time.perf_counter()
            found_ids = top_ids(store, query_vectors, K)
            write = {"write_seconds": settings[target]["write_seconds"], "bytes_on_disk": settings[target]["bytes"]}
            extra = {"hnsw": settings["chroma"]["hnsw"]} if target == "chroma" else {"index": "none (flat scan)"}
            targets[target] = compare(target, found_ids, expected, query_ids, data.qrels,
                                      time.perf_counter() - start, {**write, **extra})

        # HNSW builds differ run to run (threads insert in parallel): rebuild Chroma and count misses per build, with
        # the export's settings, a lower ef_search and Chroma's own defaults.
        chroma_builds = []
        for hnsw in [{}, {"chroma_ef_search": 200}, CHROMA_DEFAULTS]:
            hnsw_cfg = replace(cfg, **hnsw)
            row = {"hnsw": {"ef_construction": hnsw_cfg.chroma_ef_construction,
                            "ef_search": hnsw_cfg.chroma_ef_search, "max_neighbors": hnsw_cfg.chroma_max_neighbors},
                   "mismatched_queries_per_build": [], "write_seconds_per_build": []}
            for _ in range(args.chroma_builds):
                rebuilt = export_vectordb(bundle, model_dir, docs, ["chroma"], hnsw_cfg, name="scifact")
                found_ids = chroma_top_ids(open_chroma(bundle), query_vectors, K)
                row["mismatched_queries_per_build"].append(sum(got != want for got, want in zip(found_ids, expected)))
                row["write_seconds_per_build"].append(rebuilt["chroma"]["write_seconds"])
            print(f"chroma HNSW {row['hnsw']}: mismatched per build {row['mismatched_queries_per_build']}", flush=True)
            chroma_builds.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "export_parity",
        "description": "Top-10 of each export target vs FAISS exact top-10 over the same stored vectors; "
                       "mismatched_queries = ids or order differ, mismatched_sets = the ten ids differ. nDCG@10 "
                       "scores each target's returned order. chroma_rebuilds: the same collection built again "
                       "(HNSW builds are not deterministic), mismatched queries per build, per HNSW setting. "
                       "bytes_on_disk: faiss = index/ (corpus.faiss + "
                       "docs.jsonl), chroma and lancedb = their folder (documents and metadata included).",
        "dataset": "BEIR SciFact (../shared/data/beir/scifact)",
        "split": args.split,
        "num_documents": len(docs),
        "num_queries": len(query_ids),
        "model": args.model,
        "dim": int(stored.shape[1]),
        "precision": args.precision,
        "k": K,
        "targets": targets,
        "chroma_rebuilds": chroma_builds,
        **provenance.record(packages=("chromadb", "lancedb", "pyarrow")),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv)
