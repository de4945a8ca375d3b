"""The run report: built from a run directory's files, every image and link resolves, and the checker catches breaks."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from embtune.pipeline.report import build_report, check_report, data_counts, main, pareto_rows, per_query_differences

QUERIES = [f"q{i}" for i in range(12)]
# Fine-tuned beats base on q0-q5, loses on q6-q7, ties on q8-q11: 6 wins, 2 losses, 4 ties.
BASE = {q: 0.5 for q in QUERIES}
FINETUNED = {**BASE, **{q: 0.8 for q in QUERIES[:6]}, "q6": 0.3, "q7": 0.2}


def _metrics(ndcg: float) -> dict[str, float]:
    return {"ndcg@10": ndcg, "mrr@10": ndcg, "recall@10": 0.9, "recall@100": 1.0, "map@100": ndcg}


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)


def _manifest(run: Path, stage: str, outputs: dict[str, Path], **extra) -> None:
    _write(run / stage / "manifest.json", {"stage": stage, "fingerprint": f"{stage}-fp", "wall_seconds": 1.5,
                                           "finished_at": "2026-11-30T20:00:00+0000",
                                           "outputs": {k: str(v.resolve()) for k, v in outputs.items()}, **extra})


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """The files a data_prep -> train -> eval (with sweep) -> export run writes, with known numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tmp_path / "run"
    _write(run / "config.yaml", "run_dir: run\nseed: 42\n")
    _write(run / "data_prep" / "report.json", {
        "load": {"skipped": {"empty_query": 2}, "examples": {}}, "train_queries": 40, "dev_queries": 10, "rows": 38,
        "mining": {"queries": 40, "pairs": 38, "candidates": 800, "dropped": {"positive": 40, "margin": 7},
                   "pairs_filled_with_random": 1, "queries_dropped": 2},
        "synthesis": {"passages": 20, "queries": 40, "cleaning": {"kept": 45, "duplicate": 3, "too_long": 1},
                      "round_trip": {"mode": "either", "k": 10, "checked": 45, "kept": 40, "dropped": 5}}})
    _write(run / "data_prep" / "mining_report.json", {"per_query": []})
    _manifest(run, "data_prep", {"report": run / "data_prep" / "report.json",
                                 "mining_report": run / "data_prep" / "mining_report.json"},
              config={"mining": {"method": "bm25", "num_negatives": 3}})
    (run / "train" / "model").mkdir(parents=True)
    log_history = [{"loss": 2.0 - 0.1 * step, "learning_rate": 1e-5, "epoch": step / 10, "step": step}
                   for step in range(1, 11)]
    log_history.append({"eval_dev_cosine_ndcg@10": 0.61, "step": 10})
    log_history.append({"train_loss": 1.55, "train_runtime": 12.0, "epoch": 1.0, "step": 10})
    _manifest(run, "train", {"model": run / "train" / "model"}, log_history=log_history, world_size=1,
              global_batch_size=8, config={"train": {"base_model": "minilm", "loss": "mnrl",
                                                     "matryoshka_dims": [32, 16],
                                                     "epochs": 1, "learning_rate": 2e-5}})
    dims = {"32": _metrics(0.55), "16": _metrics(0.45)}
    results = {"split": "test", "num_queries": len(QUERIES), "num_documents": 50,
               "results": {"base": {**_metrics(0.5), "dims": dims, "dim": 32},
                           "finetuned": {**_metrics(0.6), "dims": {"32": _metrics(0.6), "16": _metrics(0.52)},
                                         "dim": 32},
                           "bm25": _metrics(0.4), "finetuned+bm25_rrf": _metrics(0.62)},
               "per_query": {"base": {q: {"ndcg@10": v} for q, v in BASE.items()},
                             "finetuned": {q: {"ndcg@10": v} for q, v in FINETUNED.items()},
                             "bm25": {q: {"ndcg@10": 0.4} for q in QUERIES}},
               "significance": {"finetuned vs base": {"n": 12, "diff": 0.1, "ci95": [0.02, 0.18], "p_value": 0.01,
                                                      "wins": 6, "ties": 4, "losses": 2}}}
    _write(run / "eval" / "results.json", results)
    _write(run / "eval" / "table.txt", "table\n")
    rows = [{"model": m, "dim": d, "index": i, "precision": p, "ndcg@10": n, "recall@10_vs_exact": r,
             "bytes_per_vector": b, "qps": 1000.0}
            for m in ("base", "finetuned")
            for d, i, p, n, r, b in [(32, "flat", "fp32", 0.6, 1.0, 128), (32, "flat", "int8", 0.59, 0.97, 32),
                                     (16, "flat", "fp32", 0.5, 1.0, 64), (32, "binary", "bits", 0.4, 0.6, 4)]]
    _write(run / "eval" / "sweep.json", {"rows": rows})
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(run / "eval" / "sweep.png")
    plt.close(fig)
    _manifest(run, "eval", {"results": run / "eval" / "results.json", "table": run / "eval" / "table.txt",
                            "sweep": run / "eval" / "sweep.json", "sweep_plot": run / "eval" / "sweep.png"})
    _write(run / "bundle" / "manifest.json", {"dims": [32, 16]})
    _manifest(run, "export", {"bundle": run / "bundle"})
    return run


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


def test_report_has_every_section_and_every_reference_resolves(run_dir):
    page = build_report(run_dir)
    assert page == run_dir / "report" / "index.html"
    assert check_report(page) == []
    refs = _refs(page)
    assert sorted(refs.images) == ["dims.png", "drops.png", "loss.png", "per_query_diff.png", "sweep.png"]
    # Self-contained: every image lies beside the page and every link stays inside the run directory.
    assert all("/" not in src for src in refs.images)
    for href in refs.links:
        assert not href.startswith(("/", "file:", "http")), href
        assert (page.parent / href).resolve().is_relative_to(run_dir.resolve()), href
    assert "../config.yaml" in refs.links
    for stage in ("data_prep", "train", "eval", "export"):
        assert f"../{stage}/manifest.json" in refs.links
    assert "../bundle/manifest.json" in refs.links and "../eval/sweep.json" in refs.links
    text = page.read_text()
    assert "finetuned+bm25_rrf" in text and "6 / 4 / 2" in text  # hybrid row and wins/ties/losses
    assert "<td>minilm</td><td>mnrl</td><td>[32, 16]</td>" in text  # the train section of its manifest
    assert "did not run" not in text and "class=\"missing\"" not in text


def test_differences_and_counts_come_from_the_run_files(run_dir):
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    diffs = per_query_differences(results["per_query"], "finetuned", "base")
    assert sum(d > 0 for d in diffs) == 6 and sum(d < 0 for d in diffs) == 2 and diffs.count(0.0) == 4
    counts, drops = data_counts(json.loads((run_dir / "data_prep" / "report.json").read_text()),
                                json.loads((run_dir / "data_prep" / "manifest.json").read_text()))
    counts = dict(counts)
    assert counts["hard negatives per row"] == 3 and counts["hard negatives in total"] == 38 * 3
    assert ("mining", "margin", 7) in drops and ("load", "empty_query", 2) in drops
    assert ("synthesis", "duplicate", 3) in drops and ("round trip", "not in either top 10", 5) in drops
    assert ("synthesis", "kept", 45) not in drops
    front = pareto_rows(json.loads((run_dir / "eval" / "sweep.json").read_text())["rows"])
    # Per model: binary (4 B), int8 (32 B), fp32 (128 B); the 16-dim fp32 row (64 B, 0.5) is beaten by int8 (32 B).
    assert [(r["index"], r["precision"], r["dim"]) for r in front if r["model"] == "base"] == [
        ("binary", "bits", 32), ("flat", "int8", 32), ("flat", "fp32", 32)]


def test_check_report_catches_missing_and_broken_files(run_dir):
    page = build_report(run_dir)
    (page.parent / "loss.png").unlink()
    (page.parent / "dims.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (run_dir / "eval" / "table.txt").unlink()
    problems = check_report(page)
    assert len(problems) == 3, problems
    assert any("loss.png" in p and "does not exist" in p for p in problems)
    assert any("dims.png" in p and "does not decode" in p for p in problems)
    assert any("table.txt" in p and "does not exist" in p for p in problems)
    assert main([str(run_dir), "--check"]) == 0  # a rebuild redraws the PNGs; the table is no longer linked
    assert check_report(tmp := run_dir / "nothing.html") == [f"{tmp} does not exist"]


def test_partial_run_says_what_is_missing(run_dir):
    for stage in ("train", "eval", "export"):
        for path in sorted((run_dir / stage).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (run_dir / stage).rmdir()
    (run_dir / "config.yaml").unlink()
    page = build_report(run_dir)
    assert check_report(page) == []
    text = page.read_text()
    assert "No training stage" in text and "No evaluation" in text and "sweep did not run" in text
    assert "No <code>config.yaml</code>" in text
    assert text.count("did not run</td>") == 3
    assert _refs(page).images == ["drops.png"]


def test_unreadable_json_is_shown_not_raised(run_dir):
    (run_dir / "eval" / "results.json").write_text("{not json")
    page = build_report(run_dir)
    assert "eval/results.json is not valid JSON" in page.read_text()
    assert check_report(page) == []
