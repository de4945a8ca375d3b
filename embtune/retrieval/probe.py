"""The inverse-cloze probe (Lee et al., 2019): retrieval measured on a corpus alone, with no labelled query.

A seeded set of passages each lose one sentence (or, for half of the titled ones, their title), which becomes the
query; a retriever must find the passage *without* that text among the whole corpus. data_prep uses it to choose
the label-free teacher's dense weight and whether training can pay (``data_prep/labelfree.py``); eval uses the same
probe set, saved by data_prep, to choose what to ship when there are no labelled dev queries (``eval/deploy.py``).
The probe's passages are held out of pseudo-query cutting, so the student is judged on passages it never saw a
query of.

**Its lexical bias.** A probe query is the passage's own words, so BM25 finds it by word-for-word overlap that a
user's query need not have: on entity search (short records named by their entity, searched by keywords that
describe it) a cut title is the entity's name, which its passage repeats. :meth:`ClozeProbe.least_lexical` splits
off the probe queries that share the fewest of their (BM25) terms with their passage, and
:func:`lexical_check` asks whether a row that adds BM25 to the dense model still beats the dense model there: a
gain the probe shows only on the queries BM25 matches verbatim is lexical evidence alone, and does not move the
choice away from the dense model (labelfree's teacher weight in data_prep, the deploy choice in eval).

Saved as ``<data_prep>/labelfree/probe.json``::

    {"queries": [...], "targets": [doc id, ...], "kinds": ["sentence" | "title", ...],
     "cut_texts": {doc id: the passage's text without the query (title + rest, as indexed)}}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embtune.dataio import document_text
from embtune.retrieval.language import count_words, split_sentences
from embtune.retrieval.metrics import score_run


@dataclass
class ClozeProbe:
    """Probe queries, the passage each was cut from, and those passages' texts with the query removed."""

    queries: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    cut_texts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, corpus: dict[str, dict[str, str]], n_queries: int, min_words: int, max_words: int, seed: int,
              include_title: bool) -> "ClozeProbe":
        """Up to ``n_queries`` probe queries from a seeded order of the corpus (passages of 3+ sentences lose
        one of ``min_words``..``max_words`` words; every other titled passage loses its title instead)."""
        rng = random.Random(seed + 1)
        order = sorted(corpus)
        rng.shuffle(order)
        probe = cls()
        for doc_id in order:
            if len(probe.queries) >= n_queries:
                break
            doc = corpus[doc_id]
            title = (doc.get("title") or "").strip()
            sentences = split_sentences(doc.get("text") or "")
            usable = [i for i, s in enumerate(sentences) if min_words <= count_words(s) <= max_words]
            if len(probe.queries) % 2 and title and count_words(title) >= 2 and sentences:
                probe.queries.append(title)
                probe.kinds.append("title")
                probe.cut_texts[doc_id] = " ".join(sentences)
            elif len(sentences) >= 3 and usable:
                i = rng.choice(usable)
                probe.queries.append(sentences[i])
                probe.kinds.append("sentence")
                rest = " ".join(s for j, s in enumerate(sentences) if j != i)
                probe.cut_texts[doc_id] = document_text({"title": title, "text": rest}, include_title)
            else:
                continue
            probe.targets.append(doc_id)
        return probe

    def __len__(self) -> int:
        return len(self.queries)

    def corpus_texts(self, doc_ids: list[str], doc_texts: list[str]) -> list[str]:
        """The corpus as the probe searches it: each probe passage without its query."""
        return [self.cut_texts.get(doc_id, text) for doc_id, text in zip(doc_ids, doc_texts)]

    def mrr(self, run: dict[str, dict[str, float]], k: int = 10, only: list[int] | None = None) -> float:
        """MRR@k (percent, 2 decimals) of each query's passage, by the core metrics (pytrec_eval's reciprocal rank
        over each query's top k); query ids ``"0".."n-1"``, a query the run does not answer counts 0; ``only``:
        these queries' positions alone (:meth:`least_lexical`)."""
        positions = range(len(self.targets)) if only is None else only
        qrels = {str(i): {self.targets[i]: 1} for i in positions}
        if not qrels:
            return 0.0
        # A probe query id ("7") may equal a document id: never drop that document.
        _, per_query = score_run(qrels, run, [f"mrr@{k}"], ignore_identical_ids=False)
        total = sum(per_query.get(qid, {}).get(f"mrr@{k}", 0.0) for qid in qrels)
        return round(100 * total / len(qrels), 2)
    def lexical_overlap(self, tokenize: Callable[[str], list[str]]) -> list[float]:
        """Per query, the share of its distinct terms (``tokenize``: BM25's tokenizer, stemmed, stop words out)
        found in the passage it was cut from, without it; 0 for a query with no term."""
        out = []
        for query, target in zip(self.queries, self.targets):
            terms = set(tokenize(query))
            out.append(len(terms & set(tokenize(self.cut_texts[target]))) / len(terms) if terms else 0.0)
        return out

    def least_lexical(self, tokenize: Callable[[str], list[str]]) -> list[int]:
        """Positions of the queries whose :meth:`lexical_overlap` is at most the median (half of them or more): the
        probe with the verbatim-overlap queries BM25 finds by their words set aside."""
        overlap = self.lexical_overlap(tokenize)
        if not overlap:
            return []
        median = float(np.median(overlap))
        return [i for i, o in enumerate(overlap) if o <= median]

    def query_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.queries))]

    def counts(self) -> dict[str, int]:
        return {k: self.kinds.count(k) for k in sorted(set(self.kinds))}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"queries": self.queries, "targets": self.targets, "kinds": self.kinds,
                                    "cut_texts": self.cut_texts}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ClozeProbe":
        data: dict[str, Any] = json.loads(Path(path).read_text())
        missing = {"queries", "targets", "kinds", "cut_texts"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a probe file (missing keys {sorted(missing)})")
        return cls(**data)


def lexical_check(row_mrr_low: float, dense_mrr_low: float, queries_low: int) -> dict[str, Any]:
    """Whether a row that adds BM25 to the dense model passes the lexical check: its MRR@10 on the probe's
    :meth:`ClozeProbe.least_lexical` queries above the dense model's on the same queries. Returns ``{"passes",
    "least_lexical_queries", "row", "dense", "why"}``."""
    passes = row_mrr_low > dense_mrr_low
    verdict = "beats" if passes else "does not beat"
    return {"passes": passes, "least_lexical_queries": queries_low, "row": row_mrr_low, "dense": dense_mrr_low,
            "why": f"on the {queries_low} probe queries sharing the fewest terms with their passage it {verdict} the "
                   f"dense model alone (MRR@10 {row_mrr_low} vs {dense_mrr_low})"
                   + ("" if passes else ": its gain is lexical overlap alone")}
