import math

import pytest

from embtune.retrieval.metrics import METRICS, score_run


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"z": 1}}
    run = {"q1": {"x": 0.9, "a": 0.8, "y": 0.7, "b": 0.6}, "q2": {"x": 0.9, "y": 0.8}}
    mean, per_query = score_run(qrels, run, ["ndcg@10", "mrr@10", "mrr@1", "recall@2", "recall@100", "map@100"])
    # q1: gains (2^rel - 1 is trec_eval's default? no: trec_eval ndcg uses rel as gain) at ranks 2 and 4
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert per_query["q1"]["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-6)
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q1"]["mrr@1"] == 0.0
    assert per_query["q1"]["recall@2"] == pytest.approx(0.5)
    assert per_query["q1"]["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert per_query["q2"]["ndcg@10"] == 0.0 and per_query["q2"]["recall@100"] == 0.0
    assert mean["ndcg@10"] == pytest.approx(dcg / idcg / 2, abs=1e-6)


def test_identical_ids_are_ignored_like_beir():
    qrels = {"q1": {"a": 1}}
    run = {"q1": {"q1": 0.99, "a": 0.5}}
    with_drop, _ = score_run(qrels, run)
    without, _ = score_run(qrels, run, ignore_identical_ids=False)
    assert with_drop["mrr@10"] == 1.0 and without["mrr@10"] == 0.5


def test_unjudged_queries_are_not_averaged_in():
    mean, per_query = score_run({"q1": {"a": 1}}, {"q1": {"a": 1.0}, "q9": {"a": 1.0}})
    assert set(per_query) == {"q1"} and mean["ndcg@10"] == 1.0


def test_default_metrics_are_what_eval_reports_in_its_order():
    qrels = {"q1": {"a": 1}}
    mean, per_query = score_run(qrels, {"q1": {"a": 1.0, "b": 0.5}})
    assert set(mean) == set(METRICS)
    # results.json has always listed them ndcg, recall, map, mrr: kept, so files diff cleanly across versions
    assert list(mean) == ["ndcg@10", "recall@10", "recall@100", "map@100", "mrr@10"]


def test_mrr_alone_scores_the_judged_queries_the_run_answers():
    mean, per_query = score_run({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": {"x": 2.0, "a": 1.0}}, ["mrr@10"])
    assert per_query == {"q1": {"mrr@10": 0.5}} and mean == {"mrr@10": 0.5}


@pytest.mark.parametrize("name", ["ndcg", "ndcg@0", "ndcg@x", "p@10", "NDCG@10"])
def test_an_unknown_metric_name_is_an_error_naming_it(name):
    with pytest.raises(ValueError, match="unknown metric"):
        score_run({"q1": {"a": 1}}, {"q1": {"a": 1.0}}, [name])
