"""The synthesis step of data_prep (``data.queries: synthetic``): queries for an unlabelled corpus, as files.

    corpus -> (chunk, when chunking.max_tokens is set) -> seeded sample of llm.documents passages
    -> synthesize (LLM, cleaning) -> round-trip filter with the core's Retriever (the ``bm25`` section's BM25, the
       base dense model)
    -> <stage>/synthetic/{queries.jsonl, qrels/train.tsv, report.json}

The queries and qrels are a BEIR-style pair of files, so mining and training read them exactly as they read
labelled data. Every query is judged relevant (1) to the passage it was written from, and to nothing else.

The round-trip retrievers search the whole (chunked) corpus, not only the sampled passages: a query is kept only
if its passage beats every other passage of the corpus into the top ``llm.round_trip_k``, which is the test that
matters for retrieval. The LLM answer cache is ``<stage>/llm_cache.jsonl`` (or ``llm.cache_file``), so a rerun
after a crash or ``kill -9`` asks the LLM only for the passages it has no answer for.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embtune.data_prep.synthesize import Retriever, synthesize
from embtune.dataio import document_text

logger = logging.getLogger(__name__)

@dataclass
class SyntheticQueries:
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {passage id: 1}
    report: dict[str, Any]
    files: dict[str, Path]  # queries, qrels, report


def select_passages(passage_ids: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` passage ids (all of them when ``n`` is 0 or at least their number), in corpus order.

    The sample depends only on the ids, ``n`` and ``seed``, so the same recipe always asks about the same passages
    (and finds their answers in the cache).
    """
    if not n or n >= len(passage_ids):
        return list(passage_ids)
    chosen = set(random.Random(seed).sample(sorted(passage_ids), n))
    return [pid for pid in passage_ids if pid in chosen]


def _core_search(spec, passage_texts: list[str], k: int, doc_emb: np.ndarray | None = None,
                 encode_queries=None) -> Retriever:
    """(queries) -> top-k passage indices per query, from the core's ``Retriever`` running ``spec``."""
    from embtune.retrieval.fusion import ranked
    from embtune.retrieval.spec import Retriever as CoreRetriever

    passage_ids = [str(i) for i in range(len(passage_texts))]  # texts may repeat; rows may not
    core = CoreRetriever(spec, passage_ids, passage_texts, doc_emb)

    def search(queries: list[str]) -> list[list[int]]:
        run = core.search(queries, encode_queries(queries) if encode_queries else None, k)
        return [[int(d) for d in ranked(run[str(i)], k)] for i in range(len(queries))]

    return search


def bm25_retriever(passage_texts: list[str], k: int, settings=None) -> Retriever:
    """The core's BM25 over every passage (the ``bm25`` section ``settings``; default ``BM25Config()``):
    (queries) -> top-k passage indices per query, the ranking eval's BM25 row gives."""
    from embtune.retrieval.bm25 import BM25Config
    from embtune.retrieval.spec import RetrieverSpec

    return _core_search(RetrieverSpec(dense=None, bm25=settings or BM25Config()), passage_texts, k)


def dense_retriever(model_path: str, passage_texts: list[str], k: int, max_seq_length: int = 0,
                    batch_size: int = 64) -> Retriever:
    """The base model through the core (embeddings cached on disk, exact search, queries and passages encoded by
    their roles): (queries) -> top-k passage indices per query."""
    from embtune.compute.encoding import encode_corpus
    from embtune.retrieval.encoder import cache_key, encode, load_encoder
    from embtune.retrieval.spec import DenseSpec, RetrieverSpec

    model, _ = load_encoder(model_path, max_seq_length)
    key = cache_key(model_path, model.max_seq_length, role="document")
    doc_emb = encode_corpus(model, passage_texts, batch_size, cache_key=key, desc="round-trip passages",
                            role="document")  # (n_passages, dim), or the Ray engine's shards

    def encode_queries(queries: list[str]) -> np.ndarray:
        return encode(model, queries, batch_size, desc="round-trip queries", role="query")  # (n_queries, dim)

    spec = RetrieverSpec(dense=DenseSpec(model=model_path, dim=int(doc_emb.shape[1])))
    return _core_search(spec, passage_texts, k, doc_emb, encode_queries)


def _restrict(retriever: Retriever, corpus_to_sample: np.ndarray) -> Retriever:
    """Map a retriever over the whole corpus to indices into the sampled passages (-1: a passage not asked about)."""

    def search(queries: list[str]) -> list[list[int]]:
        return [[int(corpus_to_sample[i]) for i in ranking] for ranking in retriever(queries)]

    return search


def synthesize_corpus(cfg, corpus: dict[str, dict[str, str]], stage_dir: Path) -> SyntheticQueries:
    """Run the synthesis step over ``corpus`` (already chunked when chunking is on) and write its files."""
    from embtune.models import resolve_model

    llm = cfg.llm
    include_title = cfg.mining.include_title
    passage_ids = list(corpus)
    passage_texts = [document_text(corpus[pid], include_title) for pid in passage_ids]
    chosen = select_passages(passage_ids, llm.documents, cfg.seed)
    position = {pid: i for i, pid in enumerate(passage_ids)}
    chosen_texts = [passage_texts[position[pid]] for pid in chosen]
    logger.info("synthesis: %d of %d passages (llm.documents=%d, seed %d), style %s, %d queries each",
                len(chosen), len(passage_ids), llm.documents, cfg.seed, llm.style, llm.n_queries)

    bm25 = dense = None
    if llm.round_trip != "none":
        corpus_to_sample = np.full(len(passage_ids), -1, dtype=np.int64)
        for i, pid in enumerate(chosen):
            corpus_to_sample[position[pid]] = i
        if llm.round_trip in ("bm25", "either", "both"):
            bm25 = _restrict(bm25_retriever(passage_texts, llm.round_trip_k, cfg.bm25), corpus_to_sample)
        if llm.round_trip in ("dense", "either", "both"):
            dense = _restrict(dense_retriever(resolve_model(cfg.train.base_model), passage_texts, llm.round_trip_k,
                                              cfg.eval.max_seq_length), corpus_to_sample)

    cache_path = Path(llm.cache_file) if llm.cache_file else stage_dir / "llm_cache.jsonl"
    result = synthesize(chosen, chosen_texts, llm, cache_path, bm25=bm25, dense=dense)

    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for n, row in enumerate(result.rows):
        query_id = f"syn{n}"
        queries[query_id] = row["query"]
        qrels[query_id] = {row["doc_id"]: 1}
    if not queries:
        raise RuntimeError(f"synthesis kept no queries; see the counts: {json.dumps(result.report)}")

    out = stage_dir / "synthetic"
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "queries.jsonl", "w") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / "train.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, judged in qrels.items():
            for passage_id, score in judged.items():
                handle.write(f"{query_id}\t{passage_id}\t{score}\n")
    report = {"passages": len(passage_ids), "documents": len(chosen), "queries": len(queries),
              "cache": str(cache_path), **result.report, "failures": result.failures}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    logger.info("synthesis: %d queries for %d passages -> %s", len(queries), len(chosen), out)
    return SyntheticQueries(queries, qrels, report, {"synthetic_queries": out / "queries.jsonl",
                                                     "synthetic_qrels": out / "qrels" / "train.tsv",
                                                     "synthesis_report": out / "report.json"})
