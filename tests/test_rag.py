"""RAG check against the fake OpenAI server: citation and judge parsing, outcomes computed from the right passages,
base vs fine-tuned paired on the same sample, and the LLM cache (a second run sends no request)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from embtune.eval.rag import (
    ANSWER_SYSTEM,
    main,
    paired_compare,
    parse_citations,
    parse_judge_score,
    sample_queries,
    sign_flip_test,
)
from tests.conftest import build_tiny_model
from tests.fake_openai_server import FakeOpenAIServer


@pytest.mark.parametrize("answer, k, cited, invalid", [
    ("Supported by [2].", 3, [2], 0),
    ("See [1, 3] and [2]; again [1].", 3, [1, 3, 2], 0),
    ("Passages [1-3] agree.", 3, [1, 2, 3], 0),
    ("[Passage 2] says so [passage 1]", 3, [2, 1], 0),
    ("As [7] and [0] show, [3]", 3, [3], 2),
    ("No brackets, passage 2, (1).", 3, [], 0),
    ("A year [2019] is not a citation of 1..k", 5, [], 1),
])
def test_parse_citations(answer, k, cited, invalid):
    assert parse_citations(answer, k) == (cited, invalid)


@pytest.mark.parametrize("reply, score", [
    ("4", 4), (" 5\n", 5), ("Score: 3/5", 3), ("I'd rate this 2 out of 5.", 2), ("**Rating:** 1", 1),
    ("The answer is fully supported. 5", 5), ("four", 4), ("Score: 4.5", 4), ("10", None), ("0", None),
    ("", None), ("I cannot judge this.", None), ("Rating: 5/5 (passage 3 supports it)", 5),
])
def test_parse_judge_score(reply, score):
    assert parse_judge_score(reply) == score


def test_sign_flip_test_exact_and_sampled():
    a, b = np.zeros(6), np.ones(6)
    exact = sign_flip_test(a, b, resamples=10000)
    assert exact["p_value"] == pytest.approx(2 / 64)  # only all-plus and all-minus are as extreme
    assert (exact["wins"], exact["losses"]) == (6, 0)
    assert sign_flip_test(a, a)["p_value"] == 1.0
    rng = np.random.default_rng(0)
    sampled = sign_flip_test(rng.normal(size=40), rng.normal(size=40) + 2.0, resamples=2000)
    assert sampled["p_value"] < 0.01
    binary = paired_compare([0, 0, 0, 1], [1, 1, 1, 1], resamples=1000, seed=0, binary=True)
    assert binary["discordant"] == {"only_b": 3, "only_a": 0} and binary["mcnemar_exact_p"] == pytest.approx(0.25)


def fake_reply(messages: list[dict]) -> str:
    """Answers cite the first passage (and a bogus [9]); the judge gives 4 when the answer cites, else 2."""
    if messages[0]["content"] == ANSWER_SYSTEM:
        query = re.search(r"Query: (.*)", messages[-1]["content"]).group(1)
        return f"About '{query}': the first passage says so [1]; see also [9]."
    return "Score: 4/5" if "[1]" in messages[-1]["content"] else "2"


def test_rag_check_end_to_end_and_cached(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    finetuned = build_tiny_model(tmp_path / "other", seed=1)  # a different model: different rankings
    out = tmp_path / "rag.json"
    with FakeOpenAIServer(reply=fake_reply) as server:
        argv = ["run_dir=" + str(tmp_path / "run"), f"data.path={tiny_beir}", f"train.base_model={tiny_model_dir}",
                f"llm.endpoint={server.base_url}", "llm.model=fake", "llm.progress=false",
                "eval.rag.sample_size=10", "eval.rag.k=2", "eval.rag.resamples=500",
                "--finetuned", str(finetuned), "--out", str(out)]
        assert main(argv) == 0
        first = json.loads(out.read_text())
        sent = server.requests
        assert 0 < sent <= 2 * 2 * 10  # answers + judgements, identical prompts sent once
        assert main(argv) == 0
        assert server.requests == sent  # everything came from the LLM cache
    second = json.loads(out.read_text())
    assert second["llm_requests"]["answers"]["cached"] == second["llm_requests"]["answers"]["requested"] == 20
    assert second["tokens"]["prompt_this_run"] == 0 and second["tokens"]["prompt"] == first["tokens"]["prompt"] > 0

    assert first["sample_size"] == 10 and first["k"] == 2
    # a result file: the commit of the code that produced it, as every benchmark records it
    assert len(first["commit"]) == 40 and isinstance(first["tree_clean"], bool)
    assert first["command"].startswith("python") and "cpu_model" in json.dumps(first["machine"])
    for name in ("base", "finetuned"):
        rows = first["per_query"][name]
        assert [r["query_id"] for r in rows] == [r["query_id"] for r in first["per_query"]["base"]]  # same sample
        for r in rows:
            assert r["cited_numbers"] == [1] and r["invalid_citations"] == 1
            assert r["cited"] == [r["retrieved"][0]]
            assert r["cites_gold"] == (r["retrieved"][0] in r["gold"])
            assert r["gold_in_context"] == any(d in r["gold"] for d in r["retrieved"])
            assert r["judge_score"] == 4 and r["faithfulness"] == 0.75
        summary = first["results"][name]
        assert summary["citation_rate"] == 1.0 and summary["faithfulness_mean"] == 0.75
        assert summary["cites_gold_rate"] == pytest.approx(np.mean([r["cites_gold"] for r in rows]))
    comparison = first["comparison"]
    assert comparison["a"] == "base" and comparison["b"] == "finetuned"
    assert comparison["faithfulness"]["diff"] == 0.0 and comparison["faithfulness"]["p_value"] == 1.0
    assert 0.0 <= comparison["cites_gold"]["p_value"] <= 1.0 and "mcnemar_exact_p" in comparison["cites_gold"]


def test_sample_is_seeded_and_judged_only():
    qrels = {f"q{i}": {"d": 1 if i % 3 else 0} for i in range(30)}
    first = sample_queries(qrels, 5, seed=42)
    assert first == sample_queries(qrels, 5, seed=42) != sample_queries(qrels, 5, seed=7)
    assert all(int(q[1:]) % 3 for q in first)  # only queries with a relevant document
    assert len(sample_queries(qrels, 0, seed=42)) == 20


def test_rerank_orders_first_stage_candidates_by_cross_encoder(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from embtune.dataio import document_text, load_corpus
    from embtune.eval.rag import retrieve

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cross"
    tokenizer = BertTokenizerFast.from_pretrained(str(tiny_model_dir))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(3)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1,
                                             max_position_embeddings=128)).save_pretrained(folder)
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    queries = ["star planet orbit", "flour butter sugar"]
    first_stage = retrieve(str(tiny_model_dir), doc_ids, doc_texts, queries, k=6)
    reranked = retrieve(str(tiny_model_dir), doc_ids, doc_texts, queries, k=2, rerank=str(folder), candidates=6)
    cross = CrossEncoder(str(folder), device="cpu")
    text_of = dict(zip(doc_ids, doc_texts))
    for query, candidates, top in zip(queries, first_stage, reranked):
        scores = cross.predict([(query, text_of[d]) for d in candidates])
        expected = [candidates[i] for i in np.argsort(-scores, kind="stable")[:2]]
        assert top == expected
