"""The eval stage's name for the core's retrieval metrics (``embtune/retrieval/metrics.py``, the one copy)."""

from __future__ import annotations

from embtune.retrieval.metrics import METRICS, Qrels, Run, drop_identical_ids, parse_metric, score_run, top_k

__all__ = ["METRICS", "Qrels", "Run", "drop_identical_ids", "parse_metric", "score_run", "top_k"]

