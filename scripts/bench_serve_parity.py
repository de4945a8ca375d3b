"""Serve/eval parity matrix: for each configuration, does ``/search`` of the exported bundle return, for every test
query, the top 10 that eval measured for the same retriever?

    python scripts/bench_serve_parity.py --out benchmarks/results/serve_parity.json [--only dot-product,...]

Each run goes through the pipeline's stages as a user runs them (``python -m embtune.pipeline --stages ...``):
data_prep, then eval (``eval.save_runs=10``: each row's top 10 per query) and export (the bundle). No model is
trained: in place of the train stage the run gets the manifest the train stage writes when it trains nothing (as
label-free does when its evidence says so), naming the base model, so eval measures and export ships that model.
The bundle is then served by ``python -m embtune.serve up`` in a subprocess on a free port, and every test query is
sent over HTTP ``POST /search {"query", "k": 10}``, one at a time. A spec serves eval's spec for its row (the
bundle's ``retriever.json`` is replaced by eval's ``specs[row]`` when the bundle shipped another row).

Per spec: ``mismatched_queries`` (served top 10, ids in order, differs from eval's), eval's nDCG@10 for the row
(``results.json``) and the served top 10s' nDCG@10, scored by the library's evaluation path
(``embtune.eval.score``, the qrels read by ``embtune.dataio.load_qrels``).

Corpora (each spec names its own): SciFact test (../shared/data/beir/scifact); the pydoc demo corpus
(``data.format: pydoc``: Python standard-library docstrings, summary line -> docstring, built offline); German
manual pages (``scripts/manpages_corpus.py --language de``, from the installed manpages-de package).
The rerank spec's cross-encoder is built offline from MiniLM's weights with a fresh one-logit head (no trained
cross-encoder is available offline): its ranking is meaningless, only served = measured is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import bench_command  # noqa: E402

from embtune.dataio import load_corpus, load_qrels, load_queries  # noqa: E402
from embtune.eval import score  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
CORPORA = {
    "scifact": "BEIR SciFact test (300 queries, 5,183 documents; ../shared/data/beir/scifact)",
    "pydoc": "pydoc demo corpus (data.format=pydoc, data.max_documents=500: Python standard-library docstrings, "
             "summary line -> docstring; its test split)",
    "manpages-de": "German manual pages (scripts/manpages_corpus.py --language de --max-pages 400, from the "
                   "installed manpages-de package; NAME description -> rest of the page); its queries split in "
                   "two by position (odd: qrels/train.tsv, which data_prep requires and nothing trains on; even: "
                   "qrels/test.tsv, the ones measured and served)",
}
COMMON = ["eval.dims=[]", "eval.significance_resamples=0", "eval.save_runs=10", "eval.hybrid=[weighted]",
          "eval.hybrid_weight=0.7", "eval.hybrid_depth=100", "mining.method=none", "mining.num_negatives=0",
          "export.targets=[faiss]", "tracking.report_to=none"]


@dataclass
class Run:
    """One pipeline run (one bundle) and the specs served from it, ``{spec name: eval row}``."""

    name: str
    corpus: str
    model: str  # "minilm" or "dot" (MiniLM without Normalize, similarity_fn_name: dot)
    overrides: list[str]
    specs: dict[str, str]
    serve: list[str] = field(default_factory=list)  # serve.key=value for `serve up`
    note: str = ""


RUNS = [
    Run("dot", "pydoc", "dot", [], {"dot-product": "base", "dot-product-hybrid": "base+bm25_weighted"},
        note="MiniLM with its Normalize module removed and similarity_fn_name 'dot' (raw inner product)"),
    Run("int8", "pydoc", "minilm", ["eval.backend=onnx-int8"],
        {"onnx-int8": "base"},
        note="eval, the bundle's index and the server all on the int8 ONNX encoder"),
    Run("untitled", "pydoc", "minilm", ["mining.include_title=false"],
        {"include-title-false": "base+bm25_weighted"}, note="documents without their titles, dense and BM25"),
    Run("rerank", "pydoc", "minilm", ["eval.max_seq_length=128", "eval.rerank_on=[base+bm25_weighted]",
                                      "eval.rerank_top_k=20"],
        {"hybrid-rerank": "base+bm25_weighted>rerank"},
        note="weighted hybrid, its top 20 reranked by a cross-encoder built offline from MiniLM's weights (untrained "
             "head), 128 tokens for encoder and cross-encoder"),
    Run("german-ray", "manpages-de", "minilm", ["compute.engine=ray", "compute.workers=1", "compute.shard_rows=200"],
        {"german-ray-hybrid": "base+bm25_weighted"},
        note="compute.engine=ray (corpus encoded and searched in shards), bm25.language auto (German detected)"),
    # last: the largest corpus (5,183 documents to encode when the embedding cache does not hold them)
    Run("scifact", "scifact", "minilm", [], {"cosine-torch": "base", "cosine-torch-hybrid": "base+bm25_weighted"},
        note="the base model alone and fused with stemmed BM25 (dense weight 0.7, depth 100)"),
]


def sh(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its output in ``log``; raise with the log's tail when it fails."""
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n" + log.read_text()[-3000:])


def dot_model(folder: Path) -> Path:
    """MiniLM with its Normalize module removed, scoring by dot product."""
    from sentence_transformers import SentenceTransformer

    from embtune.models import resolve_model

    if not (folder / "modules.json").is_file():
        minilm = SentenceTransformer(resolve_model("minilm"), device="cpu")
        modules = [module for module in minilm if type(module).__name__ != "Normalize"]
        SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="dot").save(str(folder))
    return folder


def cross_encoder(folder: Path) -> Path:
    """A CrossEncoder over MiniLM's transformer with a fresh one-logit head (seeded)."""
    import torch
    from sentence_transformers import CrossEncoder

    from embtune.models import resolve_model

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        CrossEncoder(resolve_model("minilm"), num_labels=1, device="cpu").save(str(folder))
    return folder


def german_corpus(folder: Path, log: Path) -> Path:
    """The German man-page BEIR folder, its judged queries split into train (odd positions) and test (even):
    data_prep reads a train split, and the test queries are the ones measured."""
    source = folder.with_name(folder.name + "-all")
    if not (source / "corpus.jsonl").is_file():
        sh([sys.executable, "scripts/manpages_corpus.py", "--language", "de", "--out", str(source),
            "--max-pages", "400"], log)
    if not (folder / "qrels" / "train.tsv").is_file():
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        for name in ("corpus.jsonl", "queries.jsonl"):
            shutil.copy(source / name, folder / name)
        header, *rows = (source / "qrels" / "test.tsv").read_text().splitlines()
        for split, part in (("train", rows[1::2]), ("test", rows[0::2])):
            (folder / "qrels" / f"{split}.tsv").write_text("\n".join([header, *part]) + "\n")
    return folder


def data_overrides(corpus: str, work: Path, log: Path) -> list[str]:
    if corpus == "scifact":
        return ["data.format=beir", f"data.path={SCIFACT}"]
    if corpus == "pydoc":
        return ["data.format=pydoc", "data.max_documents=500", "data.queries=labelled"]
    return ["data.format=beir", f"data.path={german_corpus(work / 'manpages-de', log)}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_queries(bundle: Path, serve: list[str], queries: dict[str, str], qids: list[str], log: Path
                  ) -> tuple[dict[str, list[str]], list[float], float]:
    """``serve up`` in a subprocess; (top-10 ids per query over HTTP, seconds per request, seconds to /health)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "embtune.serve", "up", "--bundle", str(bundle), f"serve.port={port}",
           "serve.cache_size=0", "serve.microbatch=false", "serve.log_level=warning", *serve]
    handle = open(log, "a")
    handle.write(f"\n$ {' '.join(cmd)}\n")
    handle.flush()
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=120) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"serve up exited {server.returncode}:\n" + log.read_text()[-3000:])
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > 600:
                    raise RuntimeError("serve up: no /health after 600 s")
                time.sleep(0.5)
            startup = time.perf_counter() - started
            top10, latency = {}, []
            for qid in qids:
                start = time.perf_counter()
                response = client.post(f"{url}/search", json={"query": queries[qid], "k": 10})
                latency.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"/search {qid}: {response.status_code} {response.text}")
                top10[qid] = [hit["id"] for hit in response.json()["hits"]]
    finally:
        server.terminate()
        server.wait(timeout=60)
        handle.close()
    return top10, latency, startup


def served_ndcg(top10: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
    """nDCG@10 of the served top 10s through the library's evaluation path."""
    run = {q: {d: float(10 - rank) for rank, d in enumerate(ids)} for q, ids in top10.items()}
    return score({q: qrels[q] for q in top10}, run, metrics=("ndcg@10",)).metrics["ndcg@10"]


def no_training_manifest(run_dir: Path, model: str) -> None:
    """The train stage's manifest when it trains nothing: its output is the base model (eval measures it alone)."""
    from embtune.models import resolve_model

    (run_dir / "train").mkdir(parents=True, exist_ok=True)
    (run_dir / "train" / "manifest.json").write_text(json.dumps(
        {"stage": "train", "outputs": {"model": resolve_model(model)}, "trained": False,
         "reason": "bench_serve_parity: the base model is measured and served, nothing is trained"}, indent=1))


def run_one(run: Run, work: Path, commit: str) -> list[dict]:
    from embtune.eval.run import read_run, run_file_name
    from embtune.retrieval.spec import SPEC_FILE, RetrieverSpec

    started = time.time()
    run_dir = work / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    model = str(dot_model(work / "dot-minilm")) if run.model == "dot" else "minilm"
    overrides = [f"run_dir={run_dir}", f"train.base_model={model}", *COMMON,
                 *data_overrides(run.corpus, work, log), *run.overrides]
    if run.name == "rerank":
        overrides.append(f"eval.reranker={cross_encoder(work / 'minilm-cross-encoder')}")
    pipeline = [sys.executable, "-m", "embtune.pipeline"]
    sh([*pipeline, "--stages", "data_prep", *overrides], log)
    no_training_manifest(run_dir, model)
    sh([*pipeline, "--stages", "eval,export", *overrides], log)

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    eval_data = json.loads((run_dir / "data_prep" / "manifest.json").read_text())["outputs"].get("eval_dataset")
    folder = Path(eval_data) if eval_data else SCIFACT
    corpus = load_corpus(folder / "corpus.jsonl")
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(folder / "qrels" / "test.tsv", corpus, queries)
    bundle = Path(json.loads((run_dir / "export" / "manifest.json").read_text())["outputs"]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    shipped = RetrieverSpec.load(bundle / SPEC_FILE)
    out = []
    for name, row in run.specs.items():
        spec_start = time.time()
        rankings = read_run(run_dir / "eval" / "runs" / run_file_name(row))
        qids = sorted(rankings)
        spec = RetrieverSpec.from_dict(results["specs"][row])
        if spec.dense is not None:  # inside a bundle the dense member searches the bundle's model
            spec = spec.replace(dense=type(spec.dense)(model="model", dim=spec.dense.dim,
                                                       precision=spec.dense.precision))
        source = "the bundle's own retriever.json" if spec == shipped else "eval's specs[row] written to retriever.json"
        spec.save(bundle / SPEC_FILE)
        top10, latency, startup = serve_queries(bundle, run.serve, queries, qids, log)
        mismatched = [q for q in qids if top10[q] != rankings[q]]
        latency_ms = sorted(1000 * s for s in latency)
        record = {
            "name": name, "corpus": run.corpus, "corpus_description": CORPORA[run.corpus], "row": row,
            "spec": spec.describe(), "spec_source": source, "queries": len(qids),
            "num_documents": len(corpus), "mismatched_queries": len(mismatched),
            "mismatched_examples": [{"query": q, "served": top10[q], "eval": rankings[q]} for q in mismatched[:3]],
            "commit": commit,
            "eval_ndcg@10": round(100 * results["results"][row]["ndcg@10"], 2),
            "served_ndcg@10": round(100 * served_ndcg(top10, qrels), 2),
            "bundle": {k: manifest.get(k) for k in ("similarity_fn_name", "encoder_backend", "max_seq_length",
                                                      "include_title", "bm25_language")},
            "serve_overrides": run.serve, "pipeline_overrides": [o for o in overrides if not o.startswith("run_dir")],
            "note": run.note,
            "latency_ms": {"p50": round(latency_ms[len(latency_ms) // 2], 1),
                           "p99": round(latency_ms[min(len(latency_ms) - 1, int(0.99 * len(latency_ms)))], 1)},
            "server_start_seconds": round(startup, 1),
            "wall_seconds": {"pipeline": round(spec_start - started, 1) if not out else 0.0,
                             "serve": round(time.time() - spec_start, 1)},
        }
        print(json.dumps({k: record[k] for k in ("name", "queries", "mismatched_queries", "eval_ndcg@10",
                                                 "served_ndcg@10")}), flush=True)
        out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_parity.json"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "serve_parity"), help="run folders and the cache")
    parser.add_argument("--only", default="", help="comma-separated run names (" + ", ".join(r.name for r in RUNS)
                        + "); default all")
    parser.add_argument("--update", action="store_true", help="keep the specs of --out's runs not rerun here (each "
                        "spec records its own commit)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    provenance = Provenance.start(bench_command(sys.argv))
    commit = provenance.git.get("commit")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    chosen = [r for r in RUNS if not args.only or r.name in args.only.split(",")]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else None
    specs, failed = [], []
    if args.update and previous is not None:
        rerun = {name for r in chosen for name in r.specs}
        specs = [s for s in previous["specs"] if s["name"] not in rerun]
    for done, run in enumerate(chosen, 1):
        try:
            specs += run_one(run, work, commit)
        except Exception as err:  # one failed configuration is reported, the others still run
            failed.append({"run": run.name, "error": str(err)[-2000:]})
            print(f"run {run.name} failed: {str(err)[-500:]}", flush=True)
        # written after every run, so an interrupted matrix keeps what it measured
        write(out, previous, specs, failed, [r.name for r in chosen[done:]], provenance, started)


def write(out: Path, previous: dict | None, specs: list[dict], failed: list[dict], pending: list[str],
          provenance: Provenance, started: float) -> None:
    record = {
        "benchmark": "serve_parity", "description": __doc__.split("\n\n")[0].strip(),
        "specs": specs, "failed_runs": failed, "runs_not_yet_done": pending,
        "mismatched_queries": sum(s["mismatched_queries"] for s in specs),
        "met": bool(specs) and not failed and not pending and all(s["mismatched_queries"] == 0 for s in specs),
        "wall_seconds": round(time.time() - started, 1),
        **provenance.record(),  # commit, clean tree, command, machine, load average, versions
    }
    if previous is not None:  # earlier runs are kept, appended (a claim tagged other_runs[i] keeps its run)
        record["other_runs"] = [*previous.get("other_runs", []),
                                {k: v for k, v in previous.items() if k != "other_runs"}]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("mismatched_queries", "met", "wall_seconds", "failed_runs")}, indent=1))


if __name__ == "__main__":
    main()
