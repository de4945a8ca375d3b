"""Paired significance on hand-checkable cases."""

import numpy as np
import pytest

from embtune.eval.significance import compare_systems, default_pairs, paired_test, significance_table


def test_identical_systems_have_p_one_and_a_zero_interval():
    a = np.random.default_rng(0).uniform(0, 1, 300)
    r = paired_test(a, a.copy(), resamples=2000)
    assert r["p_value"] == pytest.approx(1.0)
    assert r["ci95"][0] <= 0.0 <= r["ci95"][1]
    assert (r["wins"], r["ties"], r["losses"]) == (0, 300, 0)


def test_constant_shift_gives_that_shift_and_a_small_p():
    a = np.random.default_rng(1).uniform(0, 0.9, 300)
    r = paired_test(a, a + 0.1, resamples=2000)
    assert r["diff"] == pytest.approx(0.1)
    assert r["ci95"] == pytest.approx([0.1, 0.1], abs=1e-9)
    assert r["p_value"] < 0.001  # only the all-plus sign assignment reaches the observed mean
    assert (r["wins"], r["ties"], r["losses"]) == (300, 0, 0)


def test_exact_randomization_p_value_for_four_queries():
    # 2**4 = 16 sign flips; |mean| = 0.1 is reached only by all-plus and all-minus: p = 2/16.
    r = paired_test(np.zeros(4), np.full(4, 0.1), resamples=10000)
    assert r["p_value"] == pytest.approx(2 / 16)


def test_wins_ties_losses_and_interval_on_a_mixed_case():
    a = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    b = np.array([0.7, 0.4, 0.5, 0.8, 0.6])  # diffs +0.2 -0.1 0 +0.3 +0.1
    r = paired_test(a, b, resamples=5000)
    assert (r["wins"], r["ties"], r["losses"]) == (3, 1, 1)
    assert r["diff"] == pytest.approx(0.1)
    assert -0.1 <= r["ci95"][0] <= 0.1 <= r["ci95"][1] <= 0.3
    # Sign flips of |d| = (0.2, 0.1, 0, 0.3, 0.1), total 0.7: |sum| >= 0.5 needs the flipped part <= 0.1, i.e. flip
    # nothing or one of the two 0.1s (3 ways), or the mirror image (3 more); the zero doubles it: 12 of 32.
    assert r["p_value"] == pytest.approx(12 / 32)


def test_compare_systems_scores_a_missing_query_zero():
    a = {"q1": {"ndcg@10": 0.5}, "q2": {"ndcg@10": 0.5}, "q3": {"ndcg@10": 0.5}}
    b = {"q1": {"ndcg@10": 1.0}, "q2": {"ndcg@10": 1.0}}
    r = compare_systems(a, b, resamples=1000)
    assert r["n"] == 3 and r["missing_b"] == 1 and r["missing_a"] == 0
    assert r["diff"] == pytest.approx((0.5 + 0.5 - 0.5) / 3)
    assert (r["wins"], r["losses"]) == (2, 1)


def test_default_pairs_compare_every_row_with_finetuned():
    assert default_pairs(["base", "finetuned", "bm25"]) == [("base", "finetuned"), ("bm25", "finetuned")]
    assert default_pairs(["base", "bm25"]) == [("bm25", "base")]
    table = significance_table({"base": {"q": {"ndcg@10": 0.1}, "r": {"ndcg@10": 0.2}},
                                "finetuned": {"q": {"ndcg@10": 0.3}, "r": {"ndcg@10": 0.2}}},
                               [("base", "finetuned")], resamples=100)
    assert list(table) == ["finetuned vs base"] and table["finetuned vs base"]["wins"] == 1
