"""Paired significance of a per-query metric between two systems evaluated on the same queries.

For systems A and B with per-query scores ``a_i`` and ``b_i`` (e.g. nDCG@10 from eval's ``results.json``
``per_query``), the paired differences ``d_i = b_i - a_i`` carry the evidence:

- **95% confidence interval** of the mean difference: percentile bootstrap over queries
  (``scipy.stats.bootstrap``; percentile rather than BCa because BCa is undefined when every ``d_i`` is equal,
  e.g. two identical systems);
- **p-value**: two-sided paired randomization (sign-flip) test of "mean difference = 0"
  (``scipy.stats.permutation_test`` with ``permutation_type="samples"``, exact when ``2**n <= resamples``);
- **wins / ties / losses**: queries where B scores higher / equal (within 1e-9) / lower than A.

Example::

    compare_systems(per_query["base"], per_query["finetuned"])
    # {"a_mean": 0.645, "b_mean": 0.712, "diff": 0.067, "ci95": [0.041, 0.094], "p_value": 0.0001,
    #  "wins": 121, "ties": 131, "losses": 48, "n": 300, ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

TIE_TOLERANCE = 1e-9


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0,
                confidence: float = 0.95) -> dict[str, Any]:
    """Bootstrap CI, randomization p-value and wins/ties/losses for ``b - a`` over paired samples ``a``, ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_test needs two 1-d arrays of the same length >= 2, got {a.shape} and {b.shape}")
    diff = b - a  # (n,)
    rng = np.random.default_rng(seed)
    ci = stats.bootstrap((diff,), _mean, n_resamples=resamples, vectorized=True, method="percentile",
                         confidence_level=confidence, rng=rng).confidence_interval
    test = stats.permutation_test((diff,), _mean, permutation_type="samples", n_resamples=resamples,
                                  vectorized=True, alternative="two-sided", rng=rng)
    return {
        "n": int(len(diff)),
        "a_mean": float(a.mean()),
        "b_mean": float(b.mean()),
        "diff": float(diff.mean()),
        f"ci{round(100 * confidence)}": [float(ci.low), float(ci.high)],
        "p_value": float(test.pvalue),
        "wins": int((diff > TIE_TOLERANCE).sum()),
        "ties": int((np.abs(diff) <= TIE_TOLERANCE).sum()),
        "losses": int((diff < -TIE_TOLERANCE).sum()),
        "resamples": resamples,
        "method": "percentile bootstrap CI; two-sided paired randomization (sign-flip) test",
    }


def compare_systems(per_query_a: dict[str, dict[str, float]], per_query_b: dict[str, dict[str, float]],
                    metric: str = "ndcg@10", resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """``paired_test`` on one metric of two systems' ``per_query`` tables (as in eval's results.json).

    A query that one system has no row for scores 0 for it (pytrec_eval omits queries with an empty run);
    how many such queries there were is reported as ``missing_a`` / ``missing_b``.
    """
    qids = sorted(set(per_query_a) | set(per_query_b))
    a = np.array([per_query_a.get(q, {}).get(metric, 0.0) for q in qids])
    b = np.array([per_query_b.get(q, {}).get(metric, 0.0) for q in qids])
    out = paired_test(a, b, resamples=resamples, seed=seed)
    out.update(metric=metric, missing_a=len(set(qids) - set(per_query_a)), missing_b=len(set(qids) - set(per_query_b)))
    return out


def default_pairs(systems: list[str]) -> list[tuple[str, str]]:
    """(baseline, system) pairs to test: every other row against ``finetuned`` (``base`` when nothing was trained)."""
    target = next((name for name in ("finetuned", "base") if name in systems), None)
    if target is None:
        return []
    return [(name, target) for name in systems if name != target]


def significance_table(per_query: dict[str, dict[str, dict[str, float]]], pairs: list[tuple[str, str]],
                       metric: str = "ndcg@10", resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """``{"<b> vs <a>": compare_systems(...)}`` for each (a, b) pair present in ``per_query``."""
    return {f"{b} vs {a}": compare_systems(per_query[a], per_query[b], metric, resamples, seed)
            for a, b in pairs if a in per_query and b in per_query}


def format_significance(table: dict[str, Any]) -> str:
    lines = []
    for name, r in table.items():
        lo, hi = r["ci95"]
        lines.append(f"{name}: {r['metric']} {100 * r['b_mean']:.2f} vs {100 * r['a_mean']:.2f}, "
                     f"diff {100 * r['diff']:+.2f} (95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]), p={r['p_value']:.4g}, "
                     f"wins/ties/losses {r['wins']}/{r['ties']}/{r['losses']} over {r['n']} queries")
    return "\n".join(lines)
