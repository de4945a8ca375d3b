"""The eval stage's name for the core's retrieval metrics (``embtune/retrieval/metrics.py``, the one copy)."""

from __future__ import annotations

from embtune.retrieval.metrics import METRICS, Qrels, Run, drop_identical_ids, parse_metric, score_run, top_k

__all__ = ["METRICS", "Qrels", "Run", "drop_identical_ids", "parse_metric", "score_run", "top_k", "evaluate"]


def evaluate(qrels: Qrels, run: Run, ndcg_k: tuple[int, ...] = (10,), mrr_k: tuple[int, ...] = (10,),
             recall_k: tuple[int, ...] = (10, 100), map_k: tuple[int, ...] = (100,),
             ignore_identical_ids: bool = True) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Deprecated: :func:`score_run` with metric names. Kept only until scripts/bench_serve_parity.py (rewritten on
    another branch) scores through ``embtune.eval.evaluate``; then delete it."""
    names = [*(f"ndcg@{k}" for k in ndcg_k), *(f"recall@{k}" for k in recall_k), *(f"map@{k}" for k in map_k),
             *(f"mrr@{k}" for k in mrr_k)]
    return score_run(qrels, run, names, ignore_identical_ids)
