"""The eval stage. Its library entry, one evaluation path for the stage and every benchmark script::

    from embtune.eval import evaluate, score, Queries, EvalRow, METRICS

``evaluate(retriever, queries, qrels, model=...)`` encodes the queries as the server does, searches through the
core ``Retriever`` and scores with the core metrics (``eval/evaluator.py``); ``score(qrels, run)`` scores a run
made elsewhere the same way.
"""

from embtune.eval.evaluator import EvalRow, Queries, encode_queries, evaluate, score
from embtune.retrieval.metrics import METRICS, score_run

__all__ = ["METRICS", "EvalRow", "Queries", "encode_queries", "evaluate", "score", "score_run"]
