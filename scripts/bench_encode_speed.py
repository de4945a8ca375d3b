"""Corpus encoding speed: plain ``SentenceTransformer.encode`` vs embtune's encoder backends, with the nDCG@10 change.

Full run (the one in benchmarks/results/encode_speed.json):

    python scripts/bench_encode_speed.py

Smoke run (a minute): ``python scripts/bench_encode_speed.py --max-docs 300 --rounds 1 --out /tmp/encode_smoke.json``

What is timed, each run from scratch (no embedding cache, the whole corpus):

- ``torch``: ``SentenceTransformer(minilm, device="cpu").encode(texts, batch_size=64, normalize_embeddings=True)``,
  the library's own path (it sorts texts by character length), ``torch.set_num_threads(--threads)``.
- each of ``--backends`` (default ``onnx-int8 openvino openvino-int8``): ``embtune.retrieval.encoder.encode(model,
  texts, 64)`` with ``model, _ = load_encoder("minilm", backend=..., threads=--threads)`` (onnxruntime intra-op /
  OpenVINO inference threads = the same count; ``openvino-int8`` calibrates on the corpus's passages, recipe in
  ``openvino_int8_calibration``). Export, conversion and quantization happen before any timing and are reported
  apart (``export_seconds``).

The machine is shared, so the runs alternate (torch, backend, torch, backend, ...; ``--rounds`` rounds) and every run
is recorded with the load average when it started; ``ratio`` is the median over rounds of that round's backend
docs/s over its torch docs/s. nDCG@10 on SciFact test (300 queries) is scored by eval's own entry
(``embtune.eval.evaluate``: queries one per batch by role, exact search through the core ``Retriever``) from each
backend's first-round corpus embeddings and its own query encoder; ``ndcg_delta`` = backend - torch, points.

``--time-docs N`` times the rounds on the corpus's first N documents (a loaded machine); nDCG@10 then comes from a
full-corpus encode of each backend, untimed, through ``embtune.retrieval.encoder.encode`` with the embedding cache.

``openvino_ray_mismatched_queries``: the corpus encoded with ``openvino-int8`` on a local Ray cluster (``--ray-workers``
actors, one thread each, shards of ``--ray-shard-rows``), searched by ``Retriever`` against the local engine's
embeddings of the same encoder: the test queries whose top-10 differ (ids or order).

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
from embtune.retrieval.encoder import (  # noqa: E402
    BACKENDS,
    CALIBRATED_BACKENDS,
    ONNX_RECIPE,
    OPENVINO_RECIPE,
    cache_key,
    cache_stem,
    encode,
    load_encoder,
)
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


def ray_mismatches(model, local_emb, doc_ids, doc_texts, query_ids, query_texts, model_path, args) -> int:
    """Test queries whose top-10 from the Ray engine's shards (``model`` loaded by each actor from the driver's
    ``LOADED_AS``) differ from the local engine's ``local_emb``, both searched by ``Retriever``; the shards go to a
    fresh cache folder, so they are encoded here, not read back."""
    import tempfile

    import ray

    from embtune.compute import ComputeConfig, activate
    from embtune.compute.shards import encode_texts, start_local
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    query_emb = encode(model, query_texts, args.batch_size)  # (n_queries, dim)
    spec = RetrieverSpec(dense=DenseSpec(model=model_path))
    local = Retriever(spec, doc_ids, doc_texts, local_emb).search(query_texts, query_emb, 10, query_ids)
    old_cache = os.environ.get("EMBTUNE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EMBTUNE_CACHE"] = cache
        compute = ComputeConfig(engine="ray", workers=args.ray_workers, threads_per_worker=1,
                                shard_rows=args.ray_shard_rows, batch_size=args.batch_size)
        start_local(num_cpus=args.ray_workers, object_store_mb=300)
        try:
            activate(compute)
            key = cache_key(model_path, model.max_seq_length)
            shards = encode_texts(model, doc_texts, cache_stem(model, key, doc_texts), compute, role="document")
            on_ray = Retriever(spec, doc_ids, doc_texts, shards).search(query_texts, query_emb, 10, query_ids)
        finally:
            activate(ComputeConfig())
            ray.shutdown()
            if old_cache is None:
                os.environ.pop("EMBTUNE_CACHE")
            else:
                os.environ["EMBTUNE_CACHE"] = old_cache

    def ranked(run, qid):
        return sorted(run.get(qid, {}).items(), key=lambda item: (-item[1], item[0]))

    return sum([d for d, _ in ranked(local, q)] != [d for d, _ in ranked(on_ray, q)] for q in query_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", nargs="+", default=["onnx-int8", "openvino", "openvino-int8"],
                        choices=[b for b in BACKENDS if b != "torch"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    parser.add_argument("--time-docs", type=int, default=0,
                        help="time the rounds on the first N documents (0 = all); nDCG still on the whole corpus")
    parser.add_argument("--ray-workers", type=int, default=2, help="0 = skip the Ray check")
    parser.add_argument("--ray-shard-rows", type=int, default=500)
    parser.add_argument("--ray-check-only", action="store_true",
                        help="only openvino_ray_mismatched_queries (no timing), written to --out with its command")
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
        encoders[backend], _ = load_encoder(args.model, backend=backend, threads=args.threads,
                                            calibration_texts=doc_texts if backend in CALIBRATED_BACKENDS else None)
        export_seconds[backend] = round(time.perf_counter() - start, 1)  # export (first time only) + session load

    if args.ray_check_only:  # a loaded machine: the Ray check beside a timing run, in its own file
        model = encoders["openvino-int8"]
        local = encode(model, doc_texts, args.batch_size, cache_key=cache_key(path, model.max_seq_length))
        ndcg = {"openvino-int8": ndcg10(local, model, doc_ids, doc_texts, dict(zip(query_ids, query_texts)),
                                        data.qrels)}
        print("ndcg@10", ndcg, flush=True)
        mismatched = ray_mismatches(model, local, doc_ids, doc_texts, query_ids, query_texts, path, args)
        Path(args.out).write_text(json.dumps({
            "openvino_ray_mismatched_queries": mismatched, "ndcg@10": ndcg, "num_queries": len(query_ids),
            "num_documents": len(doc_texts), "ray_workers": args.ray_workers, "ray_shard_rows": args.ray_shard_rows,
            "openvino_int8_ir": str(model.model_file), **provenance.record()}, indent=2) + "\n")
        print("openvino_ray_mismatched_queries", mismatched, "->", args.out)
        return

    lengths = encoders[args.backends[0]].token_lengths(doc_texts)
    char_order = np.argsort([-len(t) for t in doc_texts], kind="stable")  # sentence-transformers' order
    token_order = np.argsort(-lengths, kind="stable")
    padding = {"real_tokens": int(lengths.sum()),
               "char_length_order": padded_tokens(lengths, char_order, args.batch_size),
               "token_length_order": padded_tokens(lengths, token_order, args.batch_size),
               "truncated_docs": int((lengths >= plain.max_seq_length).sum())}

    def run_torch():
        return plain.encode(timed_texts, batch_size=args.batch_size, convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False)

    timed_texts = doc_texts[: args.time_docs or None]
    # Every earlier run stays in the file (other_runs), newest last: a ratio is quoted with the runs behind it.
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    other_runs = previous.get("other_runs", [])
    if previous.get("runs"):
        other_runs = [*other_runs, {k: v for k, v in previous.items() if k != "other_runs"}]  # kept whole
    runs, first_emb, full_emb = [], {}, {}
    record = {
        "benchmark": "encode_speed",
        "description": "corpus encoding docs/s, plain SentenceTransformer.encode vs embtune's encoder backends, equal "
                       "threads, alternating runs; nDCG@10 on SciFact test for each (see the script's docstring)",
        "dataset": "BEIR SciFact corpus (../shared/data/beir/scifact)",
        "num_documents": len(doc_texts), "timed_documents": len(timed_texts), "num_queries": len(query_ids),
        "model": args.model,
        "max_seq_length": plain.max_seq_length, "threads": args.threads, "batch_size": args.batch_size,
        "padding": padding, "export_seconds": export_seconds, "onnx_recipe": ONNX_RECIPE,
        "openvino_recipe": OPENVINO_RECIPE,
    }
    if "openvino-int8" in encoders:  # the recipe quantize_openvino wrote beside the IR
        from embtune.retrieval.openvino import CALIBRATION_FILE

        ir = encoders["openvino-int8"].model_file
        record["openvino_int8_calibration"] = json.loads((ir.parent / CALIBRATION_FILE).read_text())

    def write(final: bool) -> None:
        per_backend = {}
        for name in ["torch", *args.backends]:
            rates = [r["docs_per_s"] for r in runs if r["backend"] == name]
            cpu = [round(len(timed_texts) / r["cpu_seconds"], 2) for r in runs if r["backend"] == name]
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
               "ratio": per_backend[best].get("ratio"),
               "ratios": {b: per_backend[b].get("ratio") for b in args.backends},
               "ndcg@10": record.get("ndcg@10", {}),
               "ndcg_delta": record.get("ndcg_delta", {}).get(best),
               **provenance.record(),
               "other_runs": other_runs}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    def full_corpus(backend: str) -> np.ndarray:
        """The whole corpus's embeddings: the first timed round's when it timed the whole corpus, else an untimed
        encode through the library (its embedding cache, keyed by model, backend file and texts)."""
        if len(timed_texts) == len(doc_texts):
            return first_emb[backend]
        model = plain if backend == "torch" else encoders[backend]
        return encode(model, doc_texts, args.batch_size, cache_key=cache_key(path, model.max_seq_length))

    def score_quality(first_emb: dict[str, np.ndarray]) -> None:
        ndcg = {}
        # openvino-int8 and torch first: on a loaded machine a cut-short run still has the numbers the issue asks for.
        order = sorted(["torch", *args.backends], key=lambda b: (b != "torch", b != "openvino-int8"))
        for backend in order:
            doc_emb = full_emb[backend] = full_corpus(backend)
            ndcg[backend] = ndcg10(doc_emb, plain if backend == "torch" else encoders[backend], doc_ids, doc_texts,
                                    dict(zip(query_ids, query_texts)), data.qrels)
            if backend != "torch":
                cos = (full_emb["torch"] * doc_emb).sum(1)  # both L2-normalized: cosine per document
                record.setdefault("doc_cosine_to_torch", {})[backend] = {"min": round(float(cos.min()), 4),
                                                                        "mean": round(float(cos.mean()), 5)}
            record["ndcg@10"] = dict(ndcg)
            record["ndcg_delta"] = {b: round(ndcg[b] - ndcg["torch"], 2) for b in args.backends
                                    if b in ndcg and "torch" in ndcg}
            write(final=False)

    for round_ in range(args.rounds):
        for backend in ["torch", *args.backends]:
            load = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            emb = run_torch() if backend == "torch" else encode(encoders[backend], timed_texts, args.batch_size)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            runs.append({"round": round_ + 1, "backend": backend, "seconds": round(seconds, 2),
                         "docs_per_s": round(len(timed_texts) / seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                         "load_avg_1m_at_start": round(load, 2)})
            print(json.dumps(runs[-1]), flush=True)
            first_emb.setdefault(backend, emb)
            write(final=False)
        if round_ == 0 and len(timed_texts) == len(doc_texts):  # quality written before the next rounds start
            score_quality(first_emb)
            write(final=False)
    if "ndcg@10" not in record:
        score_quality(first_emb)
        write(final=False)
    if args.ray_workers and "openvino-int8" in encoders:
        record["openvino_ray_mismatched_queries"] = ray_mismatches(
            encoders["openvino-int8"], full_emb["openvino-int8"], doc_ids, doc_texts, query_ids, query_texts, path,
            args)
    write(final=True)
    print(json.dumps({k: record[k] for k in ("ndcg@10", "ndcg_delta")}), "->", args.out)


if __name__ == "__main__":
    main()
