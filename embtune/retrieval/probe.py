"""The inverse-cloze probe (Lee et al., 2019): retrieval measured on a corpus alone, with no labelled query.

A seeded set of passages each lose one sentence (or, for half of the titled ones, their title), which becomes the
query; a retriever must find the passage *without* that text among the whole corpus. data_prep uses it to choose
the label-free teacher's dense weight and whether training can pay (``data_prep/labelfree.py``); eval uses the same
probe set, saved by data_prep, to choose what to ship when there are no labelled dev queries (``eval/deploy.py``).
The probe's passages are held out of pseudo-query cutting, so the student is judged on passages it never saw a
query of.

Saved as ``<data_prep>/labelfree/probe.json``::

    {"queries": [...], "targets": [doc id, ...], "kinds": ["sentence" | "title", ...],
     "cut_texts": {doc id: the passage's text without the query (title + rest, as indexed)}}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def mrr(self, run: dict[str, dict[str, float]], k: int = 10) -> float:
        """MRR@k (percent, 2 decimals) of each query's passage, by the core metrics (pytrec_eval's reciprocal rank
        over each query's top k); query ids ``"0".."n-1"``, a query the run does not answer counts 0."""
        qrels = {qid: {target: 1} for qid, target in zip(self.query_ids(), self.targets)}
        # A probe query id ("7") may equal a document id: never drop that document.
        _, per_query = score_run(qrels, run, [f"mrr@{k}"], ignore_identical_ids=False)
        total = 0.0
        for qid in qrels:
            total += per_query.get(qid, {}).get(f"mrr@{k}", 0.0)
        return round(100 * total / max(len(self.targets), 1), 2)

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
