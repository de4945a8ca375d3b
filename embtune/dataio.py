"""Load and validate corpora, queries and qrels: BEIR folders, JSONL pairs, and ``datasets`` tables on disk.

Every problem is either an error that names ``file:line`` (``on_error="raise"``) or, with ``on_error="skip"``,
a counted entry in a :class:`LoadReport`. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message starts with ``file:line``."""


@dataclass
class LoadReport:
    """What the loader skipped, by reason, with the first few locations of each."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.total:
            return "nothing skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason][:2])})" for reason, n in self.skipped.items()]
        return "skipped " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "examples": self.examples}


@dataclass
class Dataset:
    """A retrieval dataset in BEIR's shape: documents, queries, and graded relevance judgements."""

    corpus: dict[str, dict[str, str]]  # doc id -> {"title": ..., "text": ...}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    report: LoadReport = field(default_factory=LoadReport)


def document_text(doc: dict[str, str], include_title: bool = True) -> str:
    """The text a model or BM25 sees for a document: ``title + " " + text``, as MTEB/BEIR build it."""
    text = doc.get("text") or ""
    if include_title and doc.get("title"):
        return f"{doc['title']} {text}".strip()
    return text.strip()


class _Problems:
    """Raise or count a problem, according to the on_error policy."""

    def __init__(self, on_error: str, report: LoadReport):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.report = report

    def __call__(self, reason: str, where: str, detail: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {detail} (set data.on_error=skip to skip and count such rows)")
        self.report.add(reason, where)


def _jsonl_rows(path: Path, problem: _Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problem("malformed JSON", f"{path}:{lineno}", f"malformed JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(row, dict):
                problem("malformed JSON", f"{path}:{lineno}", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


def _read_id(row: dict[str, Any], where: str, problem: _Problems) -> str | None:
    value = row.get("_id", row.get("id"))
    if value is None or str(value).strip() == "":
        problem("missing _id", where, "missing '_id'")
        return None
    return str(value)


def load_corpus(path: str | Path, on_error: str = "raise",
                report: LoadReport | None = None) -> dict[str, dict[str, str]]:
    """Read BEIR ``corpus.jsonl``: one ``{"_id", "title", "text"}`` object per line."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    problem = _Problems(on_error, report)
    corpus: dict[str, dict[str, str]] = {}
    first_seen: dict[str, int] = {}
    for lineno, row in _jsonl_rows(path, problem):
        where = f"{path}:{lineno}"
        doc_id = _read_id(row, where, problem)
        if doc_id is None:
            continue
        if doc_id in corpus:
            problem("duplicate document id", where,
                    f"duplicate document id '{doc_id}' (first at line {first_seen[doc_id]})")
            continue
        title = str(row.get("title") or "")
        text = str(row.get("text") or "")
        if not (title.strip() or text.strip()):
            problem("empty document", where, f"document '{doc_id}' has an empty title and text")
            continue
        corpus[doc_id] = {"title": title, "text": text}
        first_seen[doc_id] = lineno
    return corpus


def load_queries(path: str | Path, on_error: str = "raise", report: LoadReport | None = None) -> dict[str, str]:
    """Read BEIR ``queries.jsonl``: one ``{"_id", "text"}`` object per line."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    problem = _Problems(on_error, report)
    queries: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for lineno, row in _jsonl_rows(path, problem):
        where = f"{path}:{lineno}"
        query_id = _read_id(row, where, problem)
        if query_id is None:
            continue
        if query_id in queries:
            problem("duplicate query id", where,
                    f"duplicate query id '{query_id}' (first at line {first_seen[query_id]})")
            continue
        text = str(row.get("text") or "")
        if not text.strip():
            problem("empty query", where, f"query '{query_id}' has empty text")
            continue
        queries[query_id] = text
        first_seen[query_id] = lineno
    return queries


def load_qrels(
    path: str | Path,
    corpus: dict[str, Any],
    queries: dict[str, str],
    on_error: str = "raise",
    report: LoadReport | None = None,
) -> dict[str, dict[str, int]]:
    """Read BEIR ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header optional), checking every id."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    problem = _Problems(on_error, report)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if lineno == 1 and cols[0] in ("query-id", "query_id", "qid"):
                continue
            where = f"{path}:{lineno}"
            if len(cols) != 3:
                problem("malformed qrels row", where, f"expected 3 tab-separated columns, got {len(cols)}")
                continue
            query_id, doc_id, score = cols
            try:
                relevance = int(float(score))
            except ValueError:
                problem("malformed qrels row", where, f"score {score!r} is not a number")
                continue
            if query_id not in queries:
                problem("qrels names unknown query", where, f"qrels row names unknown query '{query_id}'")
                continue
            if doc_id not in corpus:
                problem("qrels names unknown document", where, f"qrels row names unknown document '{doc_id}'")
                continue
            qrels.setdefault(query_id, {})[doc_id] = relevance
    return qrels


def load_beir(folder: str | Path, split: str, on_error: str = "raise") -> Dataset:
    """Load a BEIR folder's corpus, queries and one qrels split; queries are limited to those judged in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found (expected corpus.jsonl, queries.jsonl, qrels/)")
    report = LoadReport()
    corpus = load_corpus(folder / "corpus.jsonl", on_error, report)
    queries = load_queries(folder / "queries.jsonl", on_error, report)
    qrels = load_qrels(folder / "qrels" / f"{split}.tsv", corpus, queries, on_error, report)
    queries = {qid: queries[qid] for qid in qrels}
    if report.total:
        logger.warning("%s: %s", folder, report.summary())
    return Dataset(corpus, queries, qrels, report)


def split_dev(qrels: dict[str, dict[str, int]], fraction: float, seed: int):
    """Seeded split of train queries into (train, dev) qrels; dev is for choosing settings, never test.

    data_prep carves ``data.dev_fraction`` with it and ``eval.choose`` carves the same queries when data_prep
    has not run, so both see one dev split.
    """
    import random

    query_ids = sorted(qrels)
    random.Random(seed).shuffle(query_ids)
    n_dev = int(round(len(query_ids) * fraction))
    dev = set(query_ids[:n_dev])
    return ({q: r for q, r in qrels.items() if q not in dev}, {q: r for q, r in qrels.items() if q in dev})


def dataset_from_pairs(rows: list[dict[str, Any]], source: str, on_error: str = "raise") -> Dataset:
    """Turn ``{"query", "positive"}`` rows (optional ``query_id``/``positive_id``) into a BEIR-shaped dataset.

    Identical texts share one id, so the same passage used by two queries is one document.
    """
    report = LoadReport()
    problem = _Problems(on_error, report)
    corpus: dict[str, dict[str, str]] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    for lineno, row in rows:
        where = f"{source}:{lineno}"
        query = str(row.get("query") or row.get("anchor") or "").strip()
        positive = str(row.get("positive") or "").strip()
        if not query or not positive:
            missing = "query" if not query else "positive"
            problem(f"empty {missing}", where, f"field '{missing}' is missing or empty")
            continue
        query_id = str(row.get("query_id") or query_ids.setdefault(query, f"q{len(query_ids)}"))
        doc_id = str(row.get("positive_id") or doc_ids.setdefault(positive, f"d{len(doc_ids)}"))
        if query_id in queries and queries[query_id] != query:
            problem("duplicate query id", where, f"query_id '{query_id}' is used for two different texts")
            continue
        queries[query_id] = query
        corpus.setdefault(doc_id, {"title": "", "text": positive})
        qrels.setdefault(query_id, {})[doc_id] = 1
    if not qrels:
        raise DataError(f"{source}: no usable query/positive pairs")
    return Dataset(corpus, queries, qrels, report)


def load_pairs_jsonl(path: str | Path, on_error: str = "raise") -> Dataset:
    """Read JSONL pairs: one ``{"query": ..., "positive": ...}`` object per line."""
    path = Path(path)
    report = LoadReport()
    problem = _Problems(on_error, report)
    rows = list(_jsonl_rows(path, problem))
    dataset = dataset_from_pairs(rows, str(path), on_error)
    dataset.report.skipped.update(report.skipped)
    dataset.report.examples.update(report.examples)
    return dataset


def load_pairs_hf(path: str | Path, on_error: str = "raise") -> Dataset:
    """Read a ``datasets`` table saved with ``save_to_disk`` that has ``query`` and ``positive`` columns."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: datasets folder not found")
    table = load_from_disk(str(path))
    if hasattr(table, "keys"):  # a DatasetDict: take its train split
        if "train" not in table:
            raise DataError(f"{path}: DatasetDict has no 'train' split (has {list(table.keys())})")
        table = table["train"]
    missing = {"query", "positive"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; has {table.column_names}")
    return dataset_from_pairs([(i + 1, row) for i, row in enumerate(table)], f"{path} row", on_error)
