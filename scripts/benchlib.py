"""What the SciFact benchmark scripts share: run a recipe through the pipeline, read back what it wrote."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.config import to_dict  # noqa: E402
from embtune.eval import METRICS  # noqa: E402
from embtune.manifest import Provenance, command_line  # noqa: E402
from embtune.pipeline import run as run_pipeline  # noqa: E402
from embtune.schema import load_config  # noqa: E402

REPORTED = METRICS  # what eval reports, the one tuple (embtune/retrieval/metrics.py)


def bench_command(argv: list[str]) -> str:
    """The command line that ran this benchmark, script path relative to the repo root."""
    return command_line(argv, ROOT)


def percent(metrics: dict) -> dict:
    """An eval results row (fractions) as percent, rounded, with its per-dim figures."""
    out = {k: round(100 * metrics[k], 2) for k in REPORTED if k in metrics}
    if "dims" in metrics:
        out["dims"] = {d: {k: round(100 * v[k], 2) for k in REPORTED} for d, v in metrics["dims"].items()}
    return out


def run_recipe(config: str, overrides: list[str], stages=("data_prep", "train", "eval"), read_results: bool = True):
    """Run ``stages`` of a recipe; return (cfg, eval results, data_prep report, wall seconds per stage).

    Wall seconds come from each stage's manifest: the time its work took, also when a rerun skipped it.
    """
    cfg = load_config(config, overrides)
    run_pipeline(cfg, config, overrides, stages=stages)
    run_dir = Path(cfg.run_dir)
    wall = {s: json.loads((run_dir / s / "manifest.json").read_text())["wall_seconds"] for s in stages}
    results = json.loads((run_dir / "eval" / "results.json").read_text()) if read_results else None
    report = json.loads((run_dir / "data_prep" / "report.json").read_text())
    return cfg, results, report, wall


def base_row(model_name: str, doc_ids: list[str], doc_texts: list[str], queries: dict[str, str], qrels: dict,
             depth: int, max_seq_length: int = 0, batch_size: int = 64):
    """The base model's dense row, top ``depth`` per query (``row.run``: the candidates a teacher reranks), scored
    through eval's entry (``embtune.eval.evaluate``: queries one per batch by role, the core ``Retriever``). The corpus
    embeddings come from the shared cache (``embtune.retrieval.encoder.load_encoder``'s key)."""
    from embtune.compute.encoding import encode_corpus
    from embtune.eval import evaluate
    from embtune.retrieval.encoder import load_encoder
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    model, key = load_encoder(model_name, max_seq_length)
    doc_emb = encode_corpus(model, doc_texts, batch_size, cache_key=key, role="document")  # (n_docs, dim)
    retriever = Retriever(RetrieverSpec(dense=DenseSpec(model=model_name)), doc_ids, doc_texts, doc_emb)
    return evaluate(retriever, queries, qrels, model=model, name="base", k=depth, batch_size=batch_size)


def plain_bm25(cfg, split: str = "test"):
    """BM25 with plain ``\\w+`` tokens (no stemming, no stopwords) on a SciFact split, as eval's row (an ``EvalRow``).

    The recipe's own BM25 row is the stronger stemmed + stopword configuration (the ``bm25`` section's default);
    this one is the weaker baseline that earlier result files reported, kept beside it as ``bm25_plain``.
    """
    from dataclasses import replace

    from embtune.dataio import document_text, load_beir
    from embtune.eval import evaluate
    from embtune.retrieval.spec import Retriever, RetrieverSpec

    data = load_beir(cfg.data.path, split)
    doc_ids = list(data.corpus)
    spec = RetrieverSpec(dense=None, bm25=replace(cfg.bm25, stopwords="", stemmer=""))
    retriever = Retriever(spec, doc_ids, [document_text(data.corpus[d]) for d in doc_ids])
    return evaluate(retriever, {q: data.queries[q] for q in sorted(data.qrels)}, data.qrels, name="bm25_plain",
                    k=cfg.eval.top_k, ignore_identical_ids=cfg.eval.ignore_identical_ids)


def test_result(benchmark: str, description: str, choice: str, cfg, overrides: list[str], results: dict,
                report: dict, wall: dict, start: float, provenance: Provenance, published: dict, **extra) -> dict:
    """The record a SciFact benchmark writes for its test run: what ran (choice, overrides, resolved config), the
    base / BM25 / fine-tuned rows in percent, ``extra`` (e.g. synthesis, ablations), the mining report, the time per
    stage and in total, and the provenance (commit, clean tree, command, machine, load, versions)."""
    res = results["results"]
    return {
        "benchmark": benchmark,
        "description": description,
        "dataset": "BEIR SciFact (../shared/data/beir/scifact)",
        "split": "test",
        "num_queries": results["num_queries"],
        "num_documents": results["num_documents"],
        "choice": choice,
        "overrides": overrides,
        "config": to_dict(cfg),
        # Every row eval computed (bm25 is the recipe's stemmed + stopword BM25), plus the plain-token BM25.
        "results": {**{row: percent(metrics) for row, metrics in res.items()},
                    "bm25_plain": percent(plain_bm25(cfg).metrics)},
        "bm25": {"results.bm25": to_dict(cfg.bm25), "results.bm25_plain": "the same with stopwords '' and stemmer ''"},
        # Paired tests of per-query nDCG@10 as eval wrote them (differences as fractions); "vs bm25" is the stemmed one.
        "significance": results.get("significance", {}),
        **extra,
        "published": published,
        "training_rows": report["rows"],
        "mining_report": report["mining"],
        "wall_seconds": {**wall, "total": round(time.time() - start, 1)},
        **provenance.record(),
    }


def dot_minilm(folder: Path) -> Path:
    """MiniLM with its Normalize module removed, scoring by dot product (its vectors' norms differ), saved to
    ``folder``: the dot-product model of the vector-database parity benchmarks."""
    from sentence_transformers import SentenceTransformer

    from embtune.models import resolve_model

    minilm = SentenceTransformer(resolve_model("minilm"), device="cpu")
    modules = [module for module in minilm if type(module).__name__ != "Normalize"]
    SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="dot").save(str(folder))
    return folder


def served_hits(bundle: Path, texts: list[str], k: int) -> list[list[dict]]:
    """The served route: the bundle's ``/search`` for each text, as a client calls it; each query's hits."""
    from fastapi.testclient import TestClient

    from embtune.sections.serve import ServeConfig
    from embtune.serve.app import create_app

    with TestClient(create_app(bundle, ServeConfig(threads=1, cache_size=0))) as client:
        served = []
        for text in texts:
            response = client.post("/search", json={"query": text, "k": k})
            response.raise_for_status()
            served.append(response.json()["hits"])
    return served


def differing(found: list[list[dict]], served: list[list[dict]]) -> list[int]:
    """The queries whose top-k ids (in order) differ between two routes' hits."""
    return [i for i, (got, want) in enumerate(zip(found, served))
            if [h["id"] for h in got] != [h["id"] for h in want]]


def only_ties(got: list[dict], want: list[dict], tolerance: float = 1e-5) -> bool:
    """Two rankings differ only where their scores at the same rank agree to ``tolerance`` (relative)."""
    return all(a["id"] == b["id"] or abs(a["score"] - b["score"]) <= tolerance * max(1.0, abs(b["score"]))
               for a, b in zip(got, want))


def rank_run(query_ids: list[str], hits: list[list[dict]], k: int) -> dict[str, dict[str, float]]:
    """A run whose scores are the ranks (k, k-1, ...): pytrec_eval scores the returned order, ties cannot move."""
    return {qid: {hit["id"]: float(k - rank) for rank, hit in enumerate(row)} for qid, row in zip(query_ids, hits)}


def write_result(path: str | Path, out: dict) -> Path:
    """Write a result file, keeping what it held before: the previous run is appended to ``other_runs`` (appended,
    never reordered, so a claim tagged ``other_runs[i]`` keeps pointing at the same run)."""
    path = Path(path)
    if path.is_file():
        previous = json.loads(path.read_text())
        earlier = previous.pop("other_runs", [])
        out = {**out, "other_runs": [*earlier, previous]}
    path.write_text(json.dumps(out, indent=2) + "\n")
    return path
