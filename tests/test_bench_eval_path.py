"""Benchmark scripts score through the library's one evaluation path (``embtune.eval``), never by hand."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Scoring, searching or encoding retrieval by hand: what issue 28 found behind the published numbers' drift.
BY_HAND = re.compile(r"exact_search\(|pytrec_eval\.|def evaluate\b")


def test_no_script_searches_or_scores_by_hand():
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sorted((ROOT / "scripts").glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if BY_HAND.search(line)]
    assert not offenders, "score through embtune.eval.evaluate / score instead:\n" + "\n".join(offenders)


@pytest.fixture
def benchlib(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import benchlib

    yield benchlib
    sys.modules.pop("benchlib", None)


def test_benchlib_plain_bm25_is_evals_bm25_row(benchlib, tiny_beir, tmp_path, monkeypatch):
    """With the plain tokenizer configured, benchlib's ``bm25_plain`` row is the eval stage's ``bm25`` row."""
    from embtune.eval.run import run as run_eval
    from embtune.schema import load_config

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=beir", f"data.path={tiny_beir}",
                             "eval.compare_base=false", "bm25.stopwords=''", "bm25.stemmer=''",
                             "tracking.report_to=none"])
    results = json.loads(Path(run_eval(cfg)["results"]).read_text())
    row = benchlib.plain_bm25(cfg)
    assert row.metrics == results["results"]["bm25"]
    assert row.per_query == results["per_query"]["bm25"]
    assert benchlib.percent(row.metrics) == {m: round(100 * results["results"]["bm25"][m], 2) for m in
                                             benchlib.REPORTED}


def test_benchlib_base_row_is_a_scored_dense_run_to_depth(benchlib, tiny_beir, tiny_model_dir, tmp_path, monkeypatch):
    from embtune.dataio import document_text, load_beir

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    data = load_beir(tiny_beir, "test")
    doc_ids = list(data.corpus)
    queries = {q: data.queries[q] for q in sorted(data.qrels)}
    row = benchlib.base_row(str(tiny_model_dir), doc_ids, [document_text(data.corpus[d]) for d in doc_ids], queries,
                            data.qrels, depth=7)
    assert set(row.run) == set(queries) and all(len(docs) == 7 for docs in row.run.values())
    assert set(row.metrics) == set(benchlib.REPORTED) and row.spec.dense is not None


def test_labelfree_benchmarks_query_side_rows_score_through_the_entry(tmp_path, tiny_model_dir, monkeypatch):
    """bench_scifact_labelfree's dev measurement on a tiny label-free run: each model's queries against data_prep's
    index, the fused teacher and BM25, scored by ``embtune.eval``; the base row is ``evaluate`` on that index."""
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval import evaluate
    from tests.test_labelfree import recipe, sentence_corpus

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_scifact_labelfree as bench

    corpus_dir = sentence_corpus(tmp_path / "beir", qrels=True)
    (corpus_dir / "qrels" / "test.tsv").rename(corpus_dir / "qrels" / "train.tsv")
    cfg = recipe(tmp_path, corpus_dir, tiny_model_dir, "data.dev_fraction=0.5")
    run_data_prep(cfg)
    out = bench.query_side_scores(cfg, "dev", {"base": str(tiny_model_dir)})
    assert set(out["results"]) == {"base", "teacher", "bm25_top100"} and out["num_queries"] == 6
    query_ids, query_texts, qrels = bench.labelled_queries(cfg, "dev")
    setup = bench.base_index_and_teacher(cfg, query_texts)
    from embtune.retrieval.encoder import load_encoder

    model, _ = load_encoder(str(tiny_model_dir), cfg.eval.max_seq_length)
    row = evaluate(setup["index"], dict(zip(query_ids, query_texts)), qrels, model=model, k=1000)
    assert out["results"]["base"] == bench.percent(row.metrics)
    assert out["per_query"]["base"] == row.per_query
    sys.modules.pop("bench_scifact_labelfree", None)
