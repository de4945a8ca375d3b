"""eval's deploy choice (eval/deploy.py): one weight loop for the dev and the probe evidence, and the probe's MRR
scored by the core metrics."""

from __future__ import annotations

import numpy as np
import pytest

from embtune.retrieval.probe import ClozeProbe


def test_probe_mrr_keeps_a_document_whose_id_is_a_query_id():
    # Probe query ids are "0".."n-1"; a corpus may have a document "1". BEIR's identical-id rule must not drop it.
    probe = ClozeProbe(queries=["first", "second"], targets=["1", "d"], kinds=["sentence", "sentence"])
    run = {"0": {"1": 0.9, "x": 0.5}, "1": {"1": 0.8, "d": 0.7}}
    assert probe.mrr(run) == round(100 * (1.0 + 0.5) / 2, 2)


def test_probe_mrr_breaks_ties_as_pytrec_eval_and_counts_unanswered_queries_as_zero():
    probe = ClozeProbe(queries=["a", "b", "c"], targets=["t", "t", "t"], kinds=["sentence"] * 3)
    # tie at 0.5: "u" ranks before "t" (id desc), so t is 2nd; query "2" is not answered at all
    run = {"0": {"t": 0.5, "u": 0.5}, "1": {f"x{i}": 1.0 for i in range(10)} | {"t": 0.1}}
    assert probe.mrr(run) == round(100 * 0.5 / 3, 2)
    assert probe.mrr(run, k=1) == 0.0


def test_compare_rows_scores_every_row_and_picks_each_models_best_weight(monkeypatch):
    from embtune.eval import Queries, deploy
    from embtune.schema import load_config

    cfg = load_config(None, ["data.path=/x"])
    monkeypatch.setattr(deploy, "load_encoder", lambda path, cfg, **_: path)  # the "encoder" is the model's name
    doc_ids, doc_texts = ["a", "b", "c"], ["alpha", "beta", "gamma"]
    rng = np.random.default_rng(0)

    def embed(name, encoder):
        assert encoder == f"/models/{name}"
        return rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)

    seen = []

    def measure(retriever, queries, spec):
        seen.append(spec)
        assert queries.ids == ["q1", "q2"] and (spec.dense is None) == (queries.emb is None)
        if not spec.hybrid:
            return 10.0 if spec.dense is None else 20.0
        # base peaks at 0.3 and 0.6 (a tie: the denser wins); finetuned at 0.9
        best = {"/models/base": (0.3, 0.6), "/models/finetuned": (0.9,)}[spec.dense.model]
        return 50.0 if spec.fusion.dense_weight in best else 30.0

    from embtune.retrieval.spec import BM25Index

    scores, specs, weights, checked = deploy.compare_rows(
        cfg, {"base": "/models/base", "finetuned": "/models/finetuned"}, doc_ids, doc_texts,
        BM25Index(doc_texts, cfg.bm25), Queries(["q1", "q2"], ["alpha?", "gamma?"]), (0.0, 0.3, 0.6, 0.9), embed,
        measure)
    assert weights == {"base": 0.6, "finetuned": 0.9} and checked == {}
    assert scores == {"bm25": 10.0, "base": 20.0, "base+bm25_weighted": 50.0, "finetuned": 20.0,
                      "finetuned+bm25_weighted": 50.0}
    assert specs["base+bm25_weighted"].fusion.dense_weight == 0.6
    assert specs["finetuned+bm25_weighted"].fusion.method == "weighted"
    assert specs["finetuned+bm25_weighted"].fusion.depth == cfg.eval.hybrid_depth
    assert len(seen) == 1 + 2 * (1 + 4)  # bm25, then each model alone and at each weight


def test_compare_rows_takes_only_weights_that_pass_the_check(monkeypatch):
    """With a check (the probe's least lexical queries), a weight that wins on the whole probe but does not beat the
    model alone on the check's queries is never chosen; when none passes, the model alone (weight 1) is."""
    from embtune.eval import Queries, deploy
    from embtune.retrieval.spec import BM25Index
    from embtune.schema import load_config

    cfg = load_config(None, ["data.path=/x"])
    monkeypatch.setattr(deploy, "load_encoder", lambda path, cfg, **_: path)
    doc_ids, doc_texts = ["a", "b", "c"], ["alpha", "beta", "gamma"]
    rng = np.random.default_rng(0)

    def embed(name, encoder):
        return rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)

    def measure(retriever, queries, spec):  # the whole probe: more BM25 always looks better
        return 10.0 if spec.dense is None else 20.0 if not spec.hybrid else 50.0 - 10 * spec.fusion.dense_weight

    def check(retriever, queries, spec):  # the least lexical queries: base gains only at 0.6; finetuned never
        if spec.dense is None or not spec.hybrid:
            return 15.0
        return 16.0 if spec.dense.model == "/models/base" and spec.fusion.dense_weight == 0.6 else 14.0

    scores, specs, weights, checked = deploy.compare_rows(
        cfg, {"base": "/models/base", "finetuned": "/models/finetuned"}, doc_ids, doc_texts,
        BM25Index(doc_texts, cfg.bm25), Queries(["q1", "q2"], ["alpha?", "gamma?"]), (0.0, 0.3, 0.6, 0.9), embed,
        measure, check)
    assert weights == {"base": 0.6, "finetuned": 1.0}
    assert scores["base+bm25_weighted"] == 44.0 and checked["base+bm25_weighted"] == 16.0
    assert scores["finetuned+bm25_weighted"] == scores["finetuned"] == 20.0


@pytest.mark.parametrize("scores, expected", [
    ({"base": 50.0, "bm25": 50.0, "finetuned": 50.4}, "base"),  # a tie ships the simpler; the student gains < 0.5
    ({"base": 50.0, "bm25": 40.0, "finetuned": 51.0}, "finetuned"),
])
def test_choose_on_evidence(scores, expected):
    from embtune.eval.deploy import choose_on_evidence

    assert choose_on_evidence(scores, 0.5)[0] == expected
