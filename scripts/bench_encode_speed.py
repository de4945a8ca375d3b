"""Corpus encoding speed: plain ``SentenceTransformer.encode`` vs embtune's encoder backends, with the nDCG@10 change.

Full run (the one in benchmarks/results/encode_speed.json):

    python scripts/bench_encode_speed.py

Smoke run (a minute): ``python scripts/bench_encode_speed.py --max-docs 300 --rounds 1 --out /tmp/encode_smoke.json``

What is timed, each run from scratch (no embedding cache, the whole corpus):

- ``torch``: ``SentenceTransformer(minilm, device="cpu").encode(texts, batch_size=64, normalize_embeddings=True)``,
  the library's own path (it sorts texts by character length), ``torch.set_num_threads(--threads)``.
- each of ``--backends`` (default ``onnx-int8``): ``embtune.retrieval.encoder.encode(model, texts, 64)`` with
  ``model, _ = load_encoder("minilm", backend=..., threads=--threads)`` (onnxruntime intra-op threads = the same
  count). The ONNX export happens before any timing and is reported apart (``export_seconds``).

The machine is shared, so the runs alternate (torch, backend, torch, backend, ...; ``--rounds`` rounds) and every run
is recorded with the load average when it started; ``ratio`` is the median over rounds of that round's backend
docs/s over its torch docs/s. nDCG@10 on SciFact test (300 queries) is scored by eval's own entry
(``embtune.eval.evaluate``: queries one per batch by role, exact search through the core ``Retriever``) from each
backend's first-round corpus embeddings and its own query encoder; ``ndcg_delta`` = backend - torch, points.

``padding`` counts the padded tokens a batch of ``--batch-size`` would carry in sentence-transformers' order
(character length) and in the ONNX encoder's (token length): how much the token-length buckets can save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import bench_command  # noqa: E402  (scripts/benchlib.py)

from embtune.dataio import document_text, load_beir  # noqa: E402
from embtune.eval import evaluate  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from embtune.retrieval.encoder import BACKENDS, ONNX_RECIPE, encode, load_encoder  # noqa: E402
from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec  # noqa: E402


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Tokens the batches hold, padding included, when texts go in ``order`` and each batch pads to its longest."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start:start + batch_size]]
        total += int(batch.max()) * len(batch)
    return total


def ndcg10(doc_emb, model, doc_ids, doc_texts, queries, qrels) -> float:
    """nDCG@10 (percent) of ``doc_emb`` searched with ``model``'s queries, through eval's entry (queries one per
    batch by role, the core Retriever, the core metrics)."""
    retriever = Retriever(RetrieverSpec(dense=DenseSpec()), doc_ids, doc_texts, doc_emb)
    return evaluate(retriever, queries, qrels, model=model, k=100).percent()["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", nargs="+", default=["onnx-int8"], choices=[b for b in BACKENDS if b != "torch"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encode_speed.json"))
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))

    torch.set_num_threads(args.threads)
    data = load_beir(args.data, "test")
    doc_ids = list(data.corpus)[: args.max_docs or None]
    doc_texts = [document_text(data.corpus[d]) for d in doc_ids]
    query_ids = list(data.queries)
    query_texts = [data.queries[q] for q in query_ids]

    from sentence_transformers import SentenceTransformer

    path = resolve_model(args.model)
    plain = SentenceTransformer(path, device="cpu")
    encoders, export_seconds = {}, {}
    for backend in args.backends:
        start = time.perf_counter()
        encoders[backend], _ = load_encoder(args.model, backend=backend, threads=args.threads)
        export_seconds[backend] = round(time.perf_counter() - start, 1)  # export (first time only) + session load

    lengths = encoders[args.backends[0]].token_lengths(doc_texts)
    char_order = np.argsort([-len(t) for t in doc_texts], kind="stable")  # sentence-transformers' order
    token_order = np.argsort(-lengths, kind="stable")
    padding = {"real_tokens": int(lengths.sum()),
               "char_length_order": padded_tokens(lengths, char_order, args.batch_size),
               "token_length_order": padded_tokens(lengths, token_order, args.batch_size),
               "truncated_docs": int((lengths >= plain.max_seq_length).sum())}

    def run_torch():
        return plain.encode(doc_texts, batch_size=args.batch_size, convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False)

    # Every earlier run stays in the file (other_runs), newest last: a ratio is quoted with the runs behind it.
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    other_runs = previous.get("other_runs", [])
    if previous.get("runs"):
        other_runs = [*other_runs, {k: previous.get(k) for k in ("ratio", "ndcg_delta", "onnx_recipe", "runs",
                                                                 "complete", "command", "versions")}]
    runs, first_emb = [], {}
    record = {
        "benchmark": "encode_speed",
        "description": "corpus encoding docs/s, plain SentenceTransformer.encode vs embtune's encoder backends, equal "
                       "threads, alternating runs; nDCG@10 on SciFact test for each (see the script's docstring)",
        "dataset": "BEIR SciFact corpus (../shared/data/beir/scifact)",
        "num_documents": len(doc_texts), "num_queries": len(query_ids), "model": args.model,
        "max_seq_length": plain.max_seq_length, "threads": args.threads, "batch_size": args.batch_size,
        "padding": padding, "export_seconds": export_seconds, "onnx_recipe": ONNX_RECIPE,
    }

    def write(final: bool) -> None:
        per_backend = {}
        for name in ["torch", *args.backends]:
            rates = [r["docs_per_s"] for r in runs if r["backend"] == name]
            cpu = [round(len(doc_texts) / r["cpu_seconds"], 2) for r in runs if r["backend"] == name]
            per_backend[name] = {"docs_per_s": rates, "median_docs_per_s": round(statistics.median(rates), 2)
                                 if rates else None, "docs_per_cpu_s": cpu}
        for backend in args.backends:
            ratios = [round(b["docs_per_s"] / a["docs_per_s"], 3) for a, b in zip(
                [r for r in runs if r["backend"] == "torch"], [r for r in runs if r["backend"] == backend])]
            per_backend[backend]["round_ratios"] = ratios
            per_backend[backend]["ratio"] = round(statistics.median(ratios), 3) if ratios else None
            # CPU seconds (all threads of this process): less sensitive to other processes than wall time.
            cpu_ratios = [round(a["cpu_seconds"] / b["cpu_seconds"], 3) for a, b in zip(
                [r for r in runs if r["backend"] == "torch"], [r for r in runs if r["backend"] == backend])]
            per_backend[backend]["cpu_time_ratio"] = round(statistics.median(cpu_ratios), 3) if cpu_ratios else None
        best = max(args.backends, key=lambda b: per_backend[b].get("ratio") or 0)
        out = {**record, "complete": final, "runs": runs, "backends": per_backend, "best_backend": best,
               "ratio": per_backend[best].get("ratio"), "ndcg@10": record.get("ndcg@10", {}),
               "ndcg_delta": record.get("ndcg_delta", {}).get(best),
               **provenance.record(),
               "other_runs": other_runs}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    def score_quality(first_emb: dict[str, np.ndarray]) -> None:
        ndcg = {}
        for backend, doc_emb in first_emb.items():
            model = plain if backend == "torch" else encoders[backend]
            ndcg[backend] = ndcg10(doc_emb, model, doc_ids, doc_texts, dict(zip(query_ids, query_texts)), data.qrels)
            if backend != "torch":
                cos = (first_emb["torch"] * doc_emb).sum(1)  # both L2-normalized: cosine per document
                record.setdefault("doc_cosine_to_torch", {})[backend] = {"min": round(float(cos.min()), 4),
                                                                        "mean": round(float(cos.mean()), 5)}
        record["ndcg@10"] = ndcg
        record["ndcg_delta"] = {b: round(ndcg[b] - ndcg["torch"], 2) for b in args.backends}

    for round_ in range(args.rounds):
        for backend in ["torch", *args.backends]:
            load = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            emb = run_torch() if backend == "torch" else encode(encoders[backend], doc_texts, args.batch_size)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            runs.append({"round": round_ + 1, "backend": backend, "seconds": round(seconds, 2),
                         "docs_per_s": round(len(doc_texts) / seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                         "load_avg_1m_at_start": round(load, 2)})
            print(json.dumps(runs[-1]), flush=True)
            first_emb.setdefault(backend, emb)
            write(final=False)
        if round_ == 0:  # quality from the first round, written before the next rounds start
            score_quality(first_emb)
            write(final=False)
    write(final=True)
    print(json.dumps({k: record[k] for k in ("ndcg@10", "ndcg_delta")}), "->", args.out)


if __name__ == "__main__":
    main()
