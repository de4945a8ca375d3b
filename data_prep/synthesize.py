"""Synthetic queries for an unlabelled corpus: prompt an LLM per passage, clean its lines, filter by round trip.

Three steps, each counted so that nothing is dropped silently:

1. :func:`build_requests` renders one chat per passage: a system message, few-shot turns (a passage as the user,
   its queries as the assistant), then the passage. Styles ``question``, ``keyword`` and ``claim`` (SciFact's
   queries are claims) each have default prompts and examples; ``llm.system_prompt`` / ``user_template`` /
   ``few_shot`` replace them.
2. :func:`clean_queries` splits each answer into lines and strips numbering, bullets, quotes and preambles
   ("Here are 3 claims:"), then drops empty, too short, too long, copied-from-the-passage and duplicate queries.
3. :func:`round_trip_filter` keeps a query only if its own passage comes back in the top ``k`` of BM25, a dense
   retriever, either or both. Retrievers are plain callables ``(queries) -> ranked passage indices per query``,
   so embtune's BM25 and dense search plug in without this module knowing them.

:func:`synthesize` runs the three and returns rows ``{"query", "positive", "doc_id"}`` plus a report.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from embtune.llm.client import ChatRequest, generate_all
from embtune.llm.config import FewShotExample, LLMConfig

logger = logging.getLogger(__name__)

# (queries) -> for each query, passage indices ranked best first (at least the top k are needed).
Retriever = Callable[[list[str]], list[list[int]]]


@dataclass
class StylePrompt:
    system: str
    user_template: str
    few_shot: list[FewShotExample]


_EXERCISE = (
    "In a year-long trial, 120 adults aged 55 to 80 were assigned either to walk briskly for 40 minutes three "
    "times a week or to a stretching programme. MRI scans showed that the walking group's hippocampus grew by "
    "about 2%, while the stretching group lost roughly 1.4%, the decline usually seen with age. Larger gains "
    "went with higher blood levels of BDNF and better scores on a spatial memory task."
)
_WAL = (
    "Write-ahead logging gives a database durability without writing every modified page to disk at commit. "
    "Each change is first appended to a sequential log, and the log is forced to stable storage before the "
    "transaction is reported as committed. After a crash, recovery replays the log from the last checkpoint to "
    "redo committed changes and undo those of transactions that never finished."
)

STYLES: dict[str, StylePrompt] = {
    "question": StylePrompt(
        system=(
            "You write search queries for a document collection. Given a passage, write natural questions that "
            "a person would type into a search engine and that the passage answers. Use your own words instead "
            "of copying sentences. Write one question per line, with no numbering and no other text."
        ),
        user_template="Passage:\n{document}\n\nWrite {n} questions that this passage answers, one per line.",
        few_shot=[
            FewShotExample(_EXERCISE, [
                "Does regular walking slow brain shrinkage in older people?",
                "How does aerobic exercise change the size of the hippocampus?",
                "Is BDNF linked to memory improvements from exercise?",
            ]),
            FewShotExample(_WAL, [
                "How do databases make committed transactions survive a crash?",
                "What is a write-ahead log used for?",
                "How does crash recovery decide which changes to redo or undo?",
            ]),
        ],
    ),
    "keyword": StylePrompt(
        system=(
            "You write keyword searches for a document collection. Given a passage, write short keyword queries "
            "(2 to 6 words, no full sentences) that someone looking for this passage would type. Write one query "
            "per line, with no numbering and no other text."
        ),
        user_template="Passage:\n{document}\n\nWrite {n} keyword queries for this passage, one per line.",
        few_shot=[
            FewShotExample(_EXERCISE, [
                "walking hippocampus volume older adults",
                "aerobic exercise brain atrophy trial",
                "BDNF exercise spatial memory",
            ]),
            FewShotExample(_WAL, [
                "write-ahead log durability",
                "database crash recovery redo undo",
                "commit log flush stable storage",
            ]),
        ],
    ),
    "claim": StylePrompt(
        system=(
            "You write scientific claims for fact-checking. Given a passage, write short declarative claims, "
            "each one sentence, that the passage supports or contradicts. State findings in your own words; do "
            "not copy sentences. Write one claim per line, with no numbering and no other text."
        ),
        user_template="Passage:\n{document}\n\nWrite {n} claims that this passage supports or refutes, one per line.",
        few_shot=[
            FewShotExample(_EXERCISE, [
                "A year of brisk walking enlarges the hippocampus in older adults.",
                "Stretching exercises prevent age-related loss of hippocampal volume.",
                "Exercise-induced brain growth is associated with higher BDNF levels.",
            ]),
            FewShotExample(_WAL, [
                "Write-ahead logging requires flushing every modified page at commit time.",
                "Databases recover from crashes by replaying a log from the last checkpoint.",
                "A transaction is acknowledged only after its log records reach stable storage.",
            ]),
        ],
    ),
}


def _prompt_parts(cfg: LLMConfig) -> StylePrompt:
    default = STYLES[cfg.style]
    return StylePrompt(
        system=cfg.system_prompt or default.system,
        user_template=cfg.user_template or default.user_template,
        few_shot=cfg.few_shot or default.few_shot,
    )


def build_messages(document: str, cfg: LLMConfig) -> list[dict[str, str]]:
    """The chat for one passage: system, few-shot (user passage, assistant queries) pairs, then the passage."""
    parts = _prompt_parts(cfg)

    def user(text: str) -> dict[str, str]:
        # str.replace, not str.format: passages are full of braces (code, LaTeX, JSON).
        # {n} first, so that a passage containing "{n}" is left alone.
        template = parts.user_template.replace("{n}", str(cfg.n_queries))
        return {"role": "user", "content": template.replace("{document}", text[: cfg.max_document_chars].strip())}

    messages = [{"role": "system", "content": parts.system}]
    for example in parts.few_shot:
        messages.append(user(example.document))
        messages.append({"role": "assistant", "content": "\n".join(example.queries[: cfg.n_queries])})
    messages.append(user(document))
    return messages


def document_hash(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


def build_requests(doc_ids: list[str], documents: list[str], cfg: LLMConfig) -> list[ChatRequest]:
    """One chat request per passage, keyed for the cache by the passage's hash as well as the prompt."""
    if len(doc_ids) != len(documents):
        raise ValueError(f"{len(doc_ids)} document ids for {len(documents)} documents")
    return [ChatRequest(id=doc_id, messages=build_messages(text, cfg), document_hash=document_hash(text))
            for doc_id, text in zip(doc_ids, documents)]


# --- cleaning

_LIST_MARKER = re.compile(r"^\s*(?:[-*•·–—>]+|\(?\d{1,2}[.):\]]|\(?[a-hA-H][.)](?=\s)|#+)\s*")
_LABEL = re.compile(r"^(?:query|question|claim|keywords?|search(?: query)?|q)\s*\d{0,2}\s*[:.)-]\s+", re.IGNORECASE)
_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course|absolutely)\b[,.!]?\s*)?"
    r"(?:here(?:'s| is| are)\b[^:]*:|(?:the |some )?(?:following|possible)\b[^:]*:)\s*",
    re.IGNORECASE,
)
_ONLY_CHATTER = re.compile(r"^(?:sure|okay|ok|certainly|of course|absolutely|great)\b[^:]*[.!]?$", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"
_WORD = re.compile(r"\w+")


def clean_line(line: str) -> tuple[str, bool]:
    """Strip list markers, labels, preambles and quotes from one output line.

    Returns (query, was_preamble): a line that is only a preamble ("Here are three questions:") or chatter
    ("Sure!") comes back empty with was_preamble True.
    """
    text = line.strip().replace("**", "")
    text = _LIST_MARKER.sub("", text, count=1)
    stripped = _PREAMBLE.sub("", text, count=1)
    if stripped != text and not stripped.strip():
        return "", True
    text = stripped
    if _ONLY_CHATTER.match(text) and len(text.split()) <= 6:
        return "", True
    if text.endswith(":") and text.lower().startswith(("here", "sure", "below", "these", "the following")):
        return "", True
    text = _LIST_MARKER.sub("", text, count=1)
    text = _LABEL.sub("", text, count=1)
    text = text.strip().strip(_QUOTES).strip()
    return re.sub(r"\s+", " ", text), False


def copy_overlap(query: str, passage: str, n: int) -> float:
    """Fraction of the query's word n-grams that also occur in the passage (lower-cased words)."""
    query_words = _WORD.findall(query.lower())
    passage_words = _WORD.findall(passage.lower())
    if len(query_words) < n:
        return 0.0
    passage_grams = {tuple(passage_words[i: i + n]) for i in range(len(passage_words) - n + 1)}
    query_grams = [tuple(query_words[i: i + n]) for i in range(len(query_words) - n + 1)]
    return sum(gram in passage_grams for gram in query_grams) / len(query_grams)


def _dedupe_key(query: str) -> str:
    return " ".join(_WORD.findall(query.lower()))


CLEANING_COUNTS = ("documents", "documents_failed", "lines", "truncated", "preamble", "empty", "too_short",
                   "too_long", "prompt_echo", "copied", "duplicate", "extra", "kept")
# Small models sometimes answer with the instruction itself ("Write 3 claims that this passage supports ...").
PROMPT_ECHO_NGRAM = 3
MAX_PROMPT_ECHO_OVERLAP = 0.5


def clean_queries(documents: list[str], outputs: list[str | None], cfg: LLMConfig,
                  cut_off: list[bool] | None = None) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Turn raw LLM answers into (passage index, query) pairs, with a count for every filter.

    ``outputs[i]`` is the answer for ``documents[i]``, None where the request failed; ``cut_off[i]`` is True when
    that answer stopped at ``max_tokens`` (finish_reason "length"), so its last line is dropped as ``truncated``.
    Filters, in order: preamble lines, empty, fewer than ``min_query_words`` / more than ``max_query_words`` words,
    prompt echo (half of its word trigrams are in the instructions), copied (at least ``copy_ngram`` words and a
    word n-gram overlap with the passage of ``max_copy_overlap`` or more), duplicate (same words as an earlier
    query for any passage), and ``extra`` (beyond ``n_queries`` for one passage).
    """
    counts = dict.fromkeys(CLEANING_COUNTS, 0)
    counts["documents"] = len(documents)
    parts = _prompt_parts(cfg)
    instructions = parts.system + "\n" + parts.user_template.replace("{n}", str(cfg.n_queries))
    cut_off = cut_off or [False] * len(documents)
    seen: set[str] = set()
    pairs: list[tuple[int, str]] = []
    for index, (document, output, was_cut) in enumerate(zip(documents, outputs, cut_off, strict=True)):
        if output is None:
            counts["documents_failed"] += 1
            continue
        lines = [line for line in output.splitlines() if line.strip()]  # blank lines are layout, not outputs
        counts["lines"] += len(lines)
        if was_cut and lines:
            lines.pop()
            counts["truncated"] += 1
        kept_here = 0
        for line in lines:
            query, was_preamble = clean_line(line)
            words = len(query.split())
            if was_preamble:
                counts["preamble"] += 1
            elif not query:
                counts["empty"] += 1
            elif words < cfg.min_query_words:
                counts["too_short"] += 1
            elif words > cfg.max_query_words:
                counts["too_long"] += 1
            elif copy_overlap(query, instructions, PROMPT_ECHO_NGRAM) >= MAX_PROMPT_ECHO_OVERLAP:
                counts["prompt_echo"] += 1
            elif copy_overlap(query, document, cfg.copy_ngram) >= cfg.max_copy_overlap:
                counts["copied"] += 1
            elif _dedupe_key(query) in seen:
                counts["duplicate"] += 1
            elif kept_here >= cfg.n_queries:
                counts["extra"] += 1
            else:
                seen.add(_dedupe_key(query))
                pairs.append((index, query))
                kept_here += 1
    counts["kept"] = len(pairs)
    return pairs, counts


# --- round trip


def round_trip_filter(pairs: list[tuple[int, str]], mode: str, k: int, bm25: Retriever | None = None,
                      dense: Retriever | None = None) -> tuple[list[tuple[int, str]], dict[str, Any]]:
    """Keep (passage index, query) pairs whose passage is in the top ``k`` for its query.

    ``mode``: ``none`` keeps all; ``bm25`` / ``dense`` use that retriever; ``either`` keeps a query found by at
    least one, ``both`` one found by both. Returns the kept pairs and counts (``checked``, ``bm25_hits``,
    ``dense_hits``, ``kept``, ``dropped``).
    """
    counts: dict[str, Any] = {"mode": mode, "k": k, "checked": len(pairs), "bm25_hits": None, "dense_hits": None}
    if mode == "none" or not pairs:
        counts.update(kept=len(pairs), dropped=0)
        return list(pairs), counts
    needed = {"bm25": ["bm25"], "dense": ["dense"], "either": ["bm25", "dense"], "both": ["bm25", "dense"]}
    if mode not in needed:
        raise ValueError(f"llm.round_trip must be one of none, bm25, dense, either, both; got {mode!r}")
    retrievers = {"bm25": bm25, "dense": dense}
    queries = [query for _, query in pairs]
    found: dict[str, list[bool]] = {}
    for name in needed[mode]:
        retriever = retrievers[name]
        if retriever is None:
            raise ValueError(f"llm.round_trip is '{mode}' but no {name} retriever was given")
        ranked = retriever(queries)
        if len(ranked) != len(queries):
            raise ValueError(f"the {name} retriever returned {len(ranked)} rankings for {len(queries)} queries")
        found[name] = [source in list(hits)[:k] for (source, _), hits in zip(pairs, ranked)]
        counts[f"{name}_hits"] = sum(found[name])
    if mode in ("bm25", "dense"):
        keep = found[mode]
    elif mode == "either":
        keep = [a or b for a, b in zip(found["bm25"], found["dense"])]
    else:
        keep = [a and b for a, b in zip(found["bm25"], found["dense"])]
    kept = [pair for pair, ok in zip(pairs, keep) if ok]
    counts.update(kept=len(kept), dropped=len(pairs) - len(kept))
    return kept, counts


# --- the whole step


@dataclass
class SynthesisResult:
    rows: list[dict[str, str]]  # {"query", "positive", "doc_id"}
    report: dict[str, Any] = field(default_factory=dict)  # {"llm": RunStats, "cleaning": ..., "round_trip": ...}
    failures: dict[str, str] = field(default_factory=dict)  # doc_id -> LLMRequestFailed message


def synthesize(doc_ids: list[str], documents: list[str], cfg: LLMConfig, cache_path: str | Path | None = None,
               bm25: Retriever | None = None, dense: Retriever | None = None) -> SynthesisResult:
    """Generate, clean and round-trip filter synthetic queries for a corpus (``documents[i]`` has ``doc_ids[i]``).

    Retrievers rank indices into ``documents``. Failed documents are listed in ``failures`` and counted; the
    cache makes a rerun request only those.
    """
    run = generate_all(build_requests(doc_ids, documents, cfg), cfg, cache_path)
    outputs = [result.text for result in run.results]
    cut_off = [result.finish_reason == "length" for result in run.results]
    failures = {result.id: result.error for result in run.results if result.error is not None}
    pairs, cleaning = clean_queries(documents, outputs, cfg, cut_off)
    kept, round_trip = round_trip_filter(pairs, cfg.round_trip, cfg.round_trip_k, bm25=bm25, dense=dense)
    rows = [{"query": query, "positive": documents[index], "doc_id": doc_ids[index]} for index, query in kept]
    # run.stats counts this call's work; the answers' own token counts (cached ones included) are what the corpus cost.
    answers = {"prompt_tokens": sum(r.prompt_tokens for r in run.results),
               "completion_tokens": sum(r.completion_tokens for r in run.results)}
    report = {"llm": run.stats.to_dict(), "answers": answers, "cleaning": cleaning, "round_trip": round_trip}
    logger.info("synthesis: %s", {**cleaning, "after_round_trip": round_trip["kept"]})
    return SynthesisResult(rows=rows, report=report, failures=failures)
