"""The demo recipe trains on labelled pairs and synthetic questions, and a pipeline run ends with what to open next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtune.pipeline import STAGE_ORDER, next_steps
from embtune.schema import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_evaluates_on_queries_and_documents_it_never_trains_on(tmp_path):
    """The demo's +nDCG claim rests on this: its test queries, and the documents they point at, are not in train."""
    from embtune.data_prep.pydoc_corpus import build_pydoc_beir

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.data.format == "pydoc" and cfg.eval.split == "test" and cfg.data.train_split == "train"
    folder = build_pydoc_beir(tmp_path / "pydoc", max_documents=cfg.data.max_documents or 3000, seed=cfg.seed)
    queries = {row["_id"]: row["text"] for row in map(json.loads, (folder / "queries.jsonl").open())}
    corpus = {row["_id"]: row for row in map(json.loads, (folder / "corpus.jsonl").open())}
    split = {}
    for name in ("train", "test"):
        pairs = [line.split("\t")[:2] for line in (folder / "qrels" / f"{name}.tsv").read_text().splitlines()[1:]]
        split[name] = ({q for q, _ in pairs}, {d for _, d in pairs})
    assert len(split["test"][0]) == 300 and len(split["train"][0]) > 1000
    assert not split["test"][0] & split["train"][0]  # no query in both
    assert not split["test"][1] & split["train"][1]  # no positive document in both
    test_texts = {queries[q].lower() for q in split["test"][0]}
    assert not test_texts & {queries[q].lower() for q in split["train"][0]}  # nor the same summary under another id
    # a summary is never written inside its own document (the pair would be a string match, not retrieval)
    for name in ("train", "test"):
        for line in (folder / "qrels" / f"{name}.tsv").read_text().splitlines()[1:]:
            q, d = line.split("\t")[:2]
            assert queries[q].lower() not in corpus[d]["text"].lower()


def test_a_run_ends_with_the_report_path_and_the_serve_command(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path}"])
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "manifest.json").write_text(
        json.dumps({"outputs": {"bundle": str(tmp_path / "run" / "bundle")}}))
    text = next_steps(cfg, STAGE_ORDER)
    assert f"report: {tmp_path / 'run' / 'report' / 'index.html'}" in text
    assert f"python -m embtune.serve up --bundle {tmp_path / 'run' / 'bundle'}" in text
    # Without the export stage there is nothing to serve yet.
    assert "serve" not in next_steps(cfg, ("data_prep", "train", "eval"))
