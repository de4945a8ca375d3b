"""The one evaluation path: a retriever, judged queries -> typed rows of metrics. eval's rows, its deploy choice and
every benchmark script score through it, so a number in a result file is the number eval computes for the same run.

Like sentence-transformers' ``InformationRetrievalEvaluator`` and beir's ``EvaluateRetrieval``:

- queries are encoded as the server encodes a request (:func:`encode_queries`: one per batch, ``role="query"``);
- the search is the core :class:`~embtune.retrieval.spec.Retriever`'s, the one ``/search`` runs;
- the scores are the core metrics' (``embtune/retrieval/metrics.py``: pytrec_eval as BEIR and MTEB compute them).

Example::

    from embtune.eval import evaluate
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    retriever = Retriever(RetrieverSpec(dense=DenseSpec(model="minilm")), doc_ids, doc_texts, doc_emb)
    row = evaluate(retriever, {qid: text, ...}, qrels, model=model)  # an EvalRow
    row.metrics["ndcg@10"], row.percent()["ndcg@10"], row.per_query[qid], row.run[qid]

A run that did not come from a ``Retriever`` (a vector database's top ids, runs fused by hand) is scored with
:func:`score`, which returns the same row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embtune.retrieval.encoder import encode
from embtune.retrieval.metrics import METRICS, Qrels, Run, score_run
from embtune.retrieval.spec import Retriever, RetrieverSpec


def encode_queries(model, query_texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Query embeddings, (n_queries, dim), each query in a batch of its own, as the server encodes a request.

    A batch pads its texts to the longest one, and the padded forward pass rounds differently in the last bits,
    enough to swap two near-tied documents: encoded alone, the eval's query vector is the one ``/search``
    computes for that query at the same torch thread count, so the measured ranking is the served one
    (scripts/bench_serve_parity.py, which also measures what another thread count moves). A remote model
    (``embtune.eval.endpoint.EndpointEncoder``) batches as it likes (``batch_size``).
    """
    from embtune.eval.endpoint import EndpointEncoder

    if isinstance(model, EndpointEncoder):  # a remote model: its batches are its own business
        return encode(model, list(query_texts), batch_size, desc="query", role="query")
    return encode(model, list(query_texts), 1, desc="query (one per batch)", role="query")


@dataclass
class Queries:
    """Queries in evaluation order: ids, texts and, for a dense retriever, their embeddings (n_queries, dim)."""

    ids: list[str]
    texts: list[str]
    emb: np.ndarray | None = None

    @classmethod
    def of(cls, queries: "Mapping[str, str] | Queries", model=None, batch_size: int = 64) -> "Queries":
        """``{query id: text}`` (in its order) or a ``Queries``; encoded with ``model`` (:func:`encode_queries`)
        when given and the embeddings are missing."""
        if isinstance(queries, Queries):
            out = queries
        else:
            out = cls(ids=list(queries), texts=list(queries.values()))
        if out.emb is None and model is not None:
            out = cls(out.ids, out.texts, encode_queries(model, out.texts, batch_size))
        return out


@dataclass
class EvalRow:
    """One evaluated retrieval system: mean metrics (fractions), each query's metrics, the spec and the run."""

    name: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: Run
    spec: RetrieverSpec | None = None  # None for a run that did not come from a Retriever
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. eval's per-dim metrics

    def percent(self, digits: int = 2) -> dict[str, float]:
        """The mean metrics as percent, rounded (the result files' unit)."""
        return {name: round(100 * value, digits) for name, value in self.metrics.items()}


def score(qrels: Qrels, run: Run, name: str = "", spec: RetrieverSpec | None = None,
          metrics: Sequence[str] = METRICS, ignore_identical_ids: bool = True) -> EvalRow:
    """An :class:`EvalRow` of a run made elsewhere, scored by the core metrics."""
    mean, per_query = score_run(qrels, run, metrics, ignore_identical_ids)
    return EvalRow(name=name, metrics=mean, per_query=per_query, run=run, spec=spec)


def evaluate(retriever: Retriever, queries: "Mapping[str, str] | Queries", qrels: Qrels, *, model=None,
             spec: RetrieverSpec | None = None, name: str = "", k: int = 100, metrics: Sequence[str] = METRICS,
             ignore_identical_ids: bool = True, batch_size: int = 64) -> EvalRow:
    """Search ``queries`` with ``retriever`` (its own spec, or ``spec`` over the same corpus) and score the run.

    Args:
        retriever: the core ``Retriever`` over the corpus (what the server runs).
        queries: ``{query id: text}`` or :class:`Queries` (with embeddings already computed, to share them
            between rows); every query is searched, the judged ones are scored.
        qrels: ``{query id: {doc id: relevance}}``.
        model: the query encoder, needed when the spec has a dense member and ``queries`` carries no embeddings.
        spec: the system to run, default ``retriever.spec``.
        name: the row's name.
        k: documents retrieved per query (eval's ``eval.top_k``).
        metrics: metric names (``"ndcg@10"``, ``"mrr@10"``, ``"recall@100"``, ``"map@100"``).
        ignore_identical_ids: drop a retrieved document whose id is the query's (BEIR's default).
        batch_size: the encode batch of a remote endpoint model (local models encode one query per batch).
    """
    spec = spec or retriever.spec
    queries = Queries.of(queries, model if spec.dense is not None else None, batch_size)
    if spec.dense is not None and queries.emb is None:
        raise ValueError(f"evaluate {name or spec.describe()!r}: the spec has a dense member; pass model= (the "
                         "query encoder) or Queries with embeddings")
    run = retriever.search(queries.texts, queries.emb, k, queries.ids, spec=spec)
    return score(qrels, run, name=name, spec=spec, metrics=metrics, ignore_identical_ids=ignore_identical_ids)
