"""Hard-negative mining: rank the corpus for each training query, then pick negatives inside a rank window.

Guards that always apply: a positive is never a negative, nor is any document whose normalized text equals a
positive's (a duplicate passage under another id is a false negative). What was excluded is counted.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+", re.UNICODE)


def simple_tokenize(text: str) -> list[str]:
    """Lowercased word tokens: the tokenization rank-bm25 is run with here."""
    return _TOKEN.findall(text.lower())


def normalized_hash(text: str) -> str:
    """Hash of text with case, punctuation and whitespace removed: equal hashes mean the same passage."""
    return hashlib.sha1(" ".join(simple_tokenize(text)).encode()).hexdigest()


def bm25_rankings(doc_texts: list[str], query_texts: list[str], depth: int) -> np.ndarray:
    """Top-``depth`` document indices per query under rank-bm25's BM25Okapi (the reference implementation).

    Ties are broken by document index so the ranking is deterministic.
    """
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([simple_tokenize(t) for t in doc_texts])
    depth = min(depth, len(doc_texts))
    order = np.arange(len(doc_texts))
    out = np.empty((len(query_texts), depth), dtype=np.int64)
    for i, query in enumerate(tqdm(query_texts, desc="BM25 (rank-bm25)", unit="q", mininterval=2)):
        scores = bm25.get_scores(simple_tokenize(query))
        out[i] = np.lexsort((order, -scores))[:depth]  # score desc, then index asc
    return out


@dataclass
class MiningReport:
    queries: int = 0
    pairs: int = 0
    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    filled_random: int = 0
    short_queries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "pairs": self.pairs,
            "candidates": self.candidates,
            "dropped": dict(self.dropped),
            "pairs_filled_with_random": self.filled_random,
            "queries_short_of_negatives": self.short_queries,
        }


def select_negatives(
    ranking: np.ndarray,
    doc_ids: list[str],
    positive_ids: set[str],
    positive_hashes: set[str],
    doc_hashes: list[str],
    num_negatives: int,
    rank_start: int,
    rank_end: int,
    sampling: str,
    rng: random.Random,
    report: MiningReport,
) -> list[int]:
    """Pick ``num_negatives`` document indices from ``ranking[rank_start:rank_end]`` that pass the guards."""
    candidates = []
    for index in ranking[rank_start:rank_end]:
        report.candidates += 1
        if doc_ids[index] in positive_ids:
            report.dropped["positive"] += 1
        elif doc_hashes[index] in positive_hashes:
            report.dropped["duplicate_of_positive"] += 1
        else:
            candidates.append(int(index))
    if sampling == "random":
        return rng.sample(candidates, min(num_negatives, len(candidates)))
    return candidates[:num_negatives]


def _random_negatives(
    count: int, doc_ids: list[str], doc_hashes: list[str], positive_ids: set[str], positive_hashes: set[str],
    taken: set[int], rng: random.Random,
) -> list[int]:
    """Up to ``count`` random document indices that pass the same guards (rejection sampling, bounded tries)."""
    out: list[int] = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        index = rng.randrange(len(doc_ids))
        if (index in taken or doc_ids[index] in positive_ids or doc_hashes[index] in positive_hashes):
            continue
        taken.add(index)
        out.append(index)
    return out


def mine_negatives(
    corpus: dict[str, dict[str, str]],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    doc_texts: dict[str, str],
    method: str = "bm25",
    num_negatives: int = 1,
    rank_start: int = 0,
    rank_end: int = 100,
    sampling: str = "top",
    seed: int = 42,
    exclude: dict[str, set[str]] | None = None,
) -> tuple[list[dict[str, Any]], MiningReport]:
    """One row per (query, positive) with ``num_negatives`` mined negatives.

    Returns rows with keys ``query_id, query, positive_id, positive, negative_i, negative_i_id`` and a report.
    Queries whose window runs short are filled with random non-positive documents (counted). ``exclude`` names
    further documents per query that must never be negatives (e.g. the sibling chunks of a positive).
    """
    rng = random.Random(seed)
    doc_ids = list(corpus)
    texts = [doc_texts[d] for d in doc_ids]
    doc_hashes = [normalized_hash(t) for t in texts]
    query_ids = [q for q in qrels if any(r > 0 for r in qrels[q].values())]
    report = MiningReport(queries=len(query_ids))

    rankings = None
    if method == "bm25" and num_negatives > 0:
        rankings = bm25_rankings(texts, [queries[q] for q in query_ids], depth=rank_end)

    rows = []
    for qi, query_id in enumerate(query_ids):
        positives = [d for d, r in qrels[query_id].items() if r > 0]
        positive_ids = set(positives) | (exclude or {}).get(query_id, set())
        positive_hashes = {normalized_hash(doc_texts[d]) for d in positives}
        if rankings is not None:
            chosen = select_negatives(
                rankings[qi], doc_ids, positive_ids, positive_hashes, doc_hashes,
                num_negatives, rank_start, rank_end, sampling, rng, report,
            )
        else:
            chosen = []
        if len(chosen) < num_negatives:
            if method == "bm25":
                report.short_queries += 1
            extra = _random_negatives(num_negatives - len(chosen), doc_ids, doc_hashes, positive_ids,
                                      positive_hashes, set(chosen), rng)
            if extra and method == "bm25":
                report.filled_random += len(extra)
            chosen += extra
        if len(chosen) < num_negatives:
            report.dropped["query_without_enough_negatives"] += 1
            continue
        for positive_id in positives:
            row = {"query_id": query_id, "query": queries[query_id],
                   "positive_id": positive_id, "positive": doc_texts[positive_id]}
            for n, index in enumerate(chosen, start=1):
                row[f"negative_{n}"] = texts[index]
                row[f"negative_{n}_id"] = doc_ids[index]
            rows.append(row)
    report.pairs = len(rows)
    return rows, report
