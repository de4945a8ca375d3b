"""Label-free mode (``data.queries: labelfree``): pseudo-queries cut from a corpus alone, the fused teacher chosen
by the inverse-cloze probe, the query-side distillation loss, and the pipeline from ``corpus.jsonl`` alone."""

from __future__ import annotations

import json
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from embtune.data_prep.labelfree import cut_queries, split_sentences
from embtune.retrieval.probe import ClozeProbe
from embtune.schema import load_config
from tests.conftest import FILLER, TOPICS


def sentence_corpus(folder: Path, docs_per_topic: int = 8, seed: int = 0, qrels: bool = False) -> Path:
    """A BEIR folder of titled passages of 4 sentences of topic words; optionally queries and test qrels."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs, queries, judged = [], [], []
    for t, (topic, words) in enumerate(TOPICS.items()):
        vocab = words.split()
        for i in range(docs_per_topic):
            # each passage has a word of its own in every sentence (what an entity name is in a real corpus)
            own = f"w{(t * docs_per_topic + i) % 64}"
            sentences = [" ".join([own, *(rng.choice(vocab + FILLER) for _ in range(8))]).capitalize() + "."
                         for _ in range(4)]
            doc_id = f"{topic}-{i}"
            docs.append({"_id": doc_id, "title": f"{topic} {rng.choice(vocab)}", "text": " ".join(sentences)})
            if i % 4 == 0:
                queries.append({"_id": f"q-{doc_id}", "text": sentences[1]})
                judged.append((f"q-{doc_id}", doc_id))
    with open(folder / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    if qrels:
        (folder / "qrels").mkdir(exist_ok=True)
        with open(folder / "queries.jsonl", "w") as handle:
            handle.writelines(json.dumps(q) + "\n" for q in queries)
        with open(folder / "qrels" / "test.tsv", "w") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            handle.writelines(f"{q}\t{d}\t1\n" for q, d in judged)
    return folder


def test_cut_queries_take_titles_and_bounded_sentences():
    corpus = {
        "a": {"title": "Aspirin and stroke",
              "text": "Aspirin lowers the risk of a second stroke in adults. Short one. "
                      "It was tested in a trial of four thousand patients over five years."},
        "b": {"title": "", "text": "No title here but a sentence that is long enough to count. Tiny."},
    }
    queries = cut_queries(corpus, documents=0, sentences_per_document=5, titles=True, min_words=6, max_words=40,
                          seed=0)
    assert {(q.source, q.kind) for q in queries} == {("a", "title"), ("a", "sentence"), ("b", "sentence")}
    assert sum(q.source == "a" and q.kind == "sentence" for q in queries) == 2  # "Short one." is too short
    assert all(len(q.text.split()) >= 6 for q in queries if q.kind == "sentence")
    assert split_sentences("One two. Three four! (Five) six? 7 eight") == ["One two.", "Three four!", "(Five) six?",
                                                                            "7 eight"]
    # seeded: the same recipe cuts the same queries
    again = cut_queries(corpus, 0, 5, True, 6, 40, seed=0)
    assert [q.text for q in again] == [q.text for q in queries]


def test_span_words_cut_each_sentence_to_a_run_of_its_words():
    text = ("Aspirin lowers the risk of a second stroke in adults over sixty years of age. "
            "It was tested in a randomized trial of four thousand patients followed for five years.")
    corpus = {"a": {"title": "Aspirin and stroke", "text": text}}
    sentences = split_sentences(text)
    queries = cut_queries(corpus, 0, 5, True, 6, 40, seed=3, span_words=(4, 6))
    spans = [q for q in queries if q.kind == "span"]
    assert len(spans) == 2 and [q.kind for q in queries].count("title") == 1
    for q in spans:
        words = q.text.split()
        assert 4 <= len(words) <= 6
        assert any(q.text in s and q.text != s for s in sentences)  # a run of one sentence, not all of it
    # a sentence shorter than the span is kept whole
    whole = cut_queries({"b": {"text": "Six words make this one sentence."}}, 0, 1, False, 6, 40, seed=0,
                        span_words=(8, 12))
    assert [q.text for q in whole] == ["Six words make this one sentence."]


def recipe(tmp_path, corpus_dir, model_dir, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={corpus_dir}", "data.queries=labelfree",
                              f"train.base_model={model_dir}", "train.matryoshka_dims=[]", "tracking.report_to=none",
                              "train.batch_size=8", "train.epochs=1", "train.learning_rate=1e-3",
                              "labelfree.depth=8", "labelfree.probe_queries=40", "eval.max_seq_length=64",
                              "eval.dims=[]", "mining.batch_size=16",
                              # the tiny fixture model's 12% unknown tokens and a small probe: train regardless
                              "labelfree.max_unknown_share=1", "labelfree.max_single_letter_share=1",
                              "labelfree.min_headroom=0", *extra])


@pytest.mark.slow
def test_labelfree_runs_from_a_corpus_alone(tmp_path, tiny_model_dir):
    """A BEIR folder with only corpus.jsonl: data_prep cuts queries, probes and labels; train distils; eval says
    there is nothing to measure instead of failing."""
    from datasets import load_from_disk

    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import run as run_eval
    from embtune.train.recipe import run as run_train

    corpus_dir = sentence_corpus(tmp_path / "corpus_only")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = recipe(tmp_path, corpus_dir, model_dir)
    outputs = run_data_prep(cfg)
    assert "dev_qrels" not in outputs
    table = load_from_disk(outputs["train_table"])
    assert {"query", "candidates", "teacher_scores", "base_scores", "source_row"} <= set(table.column_names)
    row = table[0]
    assert len(row["candidates"]) == len(row["teacher_scores"]) == 8
    assert row["source_row"] not in row["candidates"]  # labelfree.source: drop
    assert row["teacher_scores"] == sorted(row["teacher_scores"], reverse=True)
    manifest = json.loads((tmp_path / "run" / "data_prep" / "manifest.json").read_text())
    choice = manifest["teacher_choice"]
    assert choice["by"].startswith("inverse-cloze probe")
    fused = choice["fused_by_dense_weight"]
    # the probe's choice is never below its best member
    assert choice["choice_mrr"] >= max(choice["dense_alone"], choice["bm25_alone"]) - 1e-9
    assert choice["choice_mrr"] == max(fused.values())
    assert manifest["teacher"]["dense_weight"] == choice["choice"]

    run_train(cfg)
    assert (tmp_path / "run" / "train" / "model").is_dir()
    results = json.loads(Path(run_eval(cfg)["results"]).read_text())
    assert results["num_queries"] == 0 and "no labelled queries" in results["note"]


def test_labelfree_queries_only_feed_dev_when_labels_exist(tmp_path, tiny_model_dir):
    from embtune.data_prep.run import run as run_data_prep

    corpus_dir = sentence_corpus(tmp_path / "beir", qrels=True)
    (corpus_dir / "qrels" / "test.tsv").rename(corpus_dir / "qrels" / "train.tsv")
    cfg = recipe(tmp_path, corpus_dir, tiny_model_dir, "data.dev_fraction=0.5")
    outputs = run_data_prep(cfg)
    dev = Path(outputs["dev_qrels"]).read_text().splitlines()[1:]
    assert len(dev) == 6  # half of 12 judged queries
    report = json.loads(Path(outputs["report"]).read_text())
    assert report["mode"] == "labelfree" and report["dev_queries"] == 6


def test_probe_chooses_bm25_when_the_dense_model_cannot_read(tmp_path):
    """A dense 'model' whose embeddings are noise: the probe must give the teacher to BM25."""
    from embtune.data_prep.labelfree import FusedTeacher, probe_teacher
    from embtune.dataio import document_text
    from embtune.retrieval.bm25 import BM25Config

    corpus_dir = sentence_corpus(tmp_path / "c", docs_per_topic=10)
    corpus = {d["_id"]: d for d in map(json.loads, (corpus_dir / "corpus.jsonl").read_text().splitlines())}
    doc_ids = list(corpus)
    texts = [document_text(corpus[d]) for d in doc_ids]

    class Noise:  # encodes any text to a fixed random unit vector
        # crc32, not hash(): str hashes are salted per process, so hash() drew new noise on every run, and about one
        # draw in 40 breaks BM25's ties on the title queries well enough to win at weight 0.5 (CI met one)
        def encode(self, batch, **kwargs):
            out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in batch])
            return out / np.linalg.norm(out, axis=1, keepdims=True)

        similarity_fn_name = "cosine"

    model = Noise()
    doc_emb = model.encode(texts).astype(np.float32)
    teacher = FusedTeacher(doc_ids, texts, doc_emb, model, BM25Config())
    probe = probe_teacher(teacher, ClozeProbe.build(corpus, 40, 4, 40, seed=0, include_title=True), texts,
                          [0.0, 0.5, 1.0])
    assert probe["bm25_alone"] > 2 * probe["dense_alone"]
    assert probe["choice"] == 0.0


@pytest.mark.slow
def test_query_distill_loss_moves_the_student_toward_the_teacher(tiny_model_dir):
    """A few steps of query_kl on fixed document embeddings: the student's ranking of each query's candidates
    agrees more with the teacher's afterwards."""
    from sentence_transformers import SentenceTransformer

    from embtune.train.losses import QueryDistillLoss, split_rows

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    topics = list(TOPICS)
    docs = [f"{t} " + " ".join(TOPICS[t].split()[:6]) for t in topics for _ in range(2)]
    doc_emb = torch.tensor(model.encode(docs), dtype=torch.float32)
    queries = [" ".join(TOPICS[t].split()[6:]) for t in topics]
    # teacher: the two passages of the query's own topic first
    k = 4
    labels = []
    for i in range(len(topics)):
        own = [2 * i, 2 * i + 1]
        others = [(2 * i + 2) % len(docs), (2 * i + 4) % len(docs)]
        labels.append([*split_rows([-1]), *split_rows(own + others), 1.0, 0.95, 0.2, 0.1, *[0.0] * k])
    labels = torch.tensor(labels)
    loss_fn = QueryDistillLoss(model, doc_emb, objective="kl", student_temperature=0.05, teacher_temperature=0.1)

    def loss_value():
        with torch.no_grad():
            features = model.tokenize(queries)
            return float(loss_fn([features], labels))

    teacher_order = [[2 * i, 2 * i + 1, (2 * i + 2) % len(docs), (2 * i + 4) % len(docs)] for i in range(len(topics))]

    def agreement():
        """Share of candidate pairs the student orders as the teacher does (teacher scores strictly decrease)."""
        with torch.no_grad():
            query_emb = torch.tensor(model.encode(queries), dtype=torch.float32)  # (n_queries, dim)
        agree = total = 0
        for i, order in enumerate(teacher_order):
            student = (doc_emb[order] @ query_emb[i]).tolist()  # teacher's order: best first
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    if docs[order[a]] == docs[order[b]]:
                        continue  # the topic's two passages are one text: no order to agree on
                    agree += student[a] > student[b]
                    total += 1
        return agree / total

    before, agree_before = loss_value(), agreement()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn([model.tokenize(queries)], labels)
        loss.backward()
        optimizer.step()
    agree_after = agreement()
    assert agree_after > agree_before and agree_after >= 0.9, (agree_before, agree_after)
    assert loss_value() < before


@pytest.mark.parametrize("over", ["candidates", "corpus"])
def test_query_distill_loss_is_zero_only_when_the_student_matches(over):
    """KL against the teacher's own distribution is minimal when the student reproduces it, and the corpus form
    excludes the query's source passage from the normalizer."""
    from embtune.train.losses import QueryDistillLoss, split_rows

    docs = torch.eye(4)  # (4, 4)
    loss_fn = QueryDistillLoss(None, docs, student_temperature=1.0, teacher_temperature=1.0, over=over)
    query = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    # candidates 0 and 1, teacher scores = the student's cosines; source = passage 3 (excluded in corpus form)
    cos = torch.nn.functional.normalize(query, dim=-1)[0]
    labels = torch.tensor([[*split_rows([3]), *split_rows([0, 1]), float(cos[0]), float(cos[1]), 0.0, 0.0]])
    value = float(loss_fn.compute_loss_from_embeddings([query], labels))
    if over == "candidates":
        assert value == pytest.approx(0.0, abs=1e-6)
    else:  # passage 2 takes probability the teacher gives to nobody: a positive loss, finite
        assert 0 < value < 5


@pytest.mark.slow
def test_symmetric_distillation_trains_the_document_side(tmp_path, tiny_model_dir):
    """train.query_distill_documents: m candidates per row (the teacher's top 2 first, the rest drawn in rank
    order) are encoded by the student, so one plain model comes out whose document embeddings moved."""
    from datasets import load_from_disk
    from sentence_transformers import SentenceTransformer

    from embtune.data_prep.run import run as run_data_prep
    from embtune.train.losses import join_rows, labelfree_dataset
    from embtune.train.recipe import run as run_train

    corpus_dir = sentence_corpus(tmp_path / "c")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = recipe(tmp_path, corpus_dir, model_dir, "train.document_side=student", "train.query_distill_documents=4",
                 "train.max_seq_length=16")
    outputs = run_data_prep(cfg)
    table = load_from_disk(outputs["train_table"])
    texts = json.loads((Path(outputs["corpus_embeddings"]).parent / "doc_texts.json").read_text())
    rows = labelfree_dataset(table, texts, 4, seed=0)
    assert rows.column_names == ["query", "doc_1", "doc_2", "doc_3", "doc_4", "label"]
    first, row = table[0], rows[0]
    assert [row["doc_1"], row["doc_2"]] == [texts[first["candidates"][0]], texts[first["candidates"][1]]]
    k = len(first["candidates"])
    label = torch.tensor([row["label"]])  # as the collator makes it: float32
    source, picked_rows, candidates = (join_rows(label[:, a:b])[0].tolist() for a, b in ((0, 2), (2, 10),
                                                                                          (10, 10 + 2 * k)))
    scores = row["label"][10 + 2 * k:]
    assert len(row["label"]) == 2 + 2 * 4 + 3 * k
    assert source == [first["source_row"]] and candidates == first["candidates"] and scores == first["teacher_scores"]
    assert picked_rows[:2] == first["candidates"][:2]
    ranks = [first["candidates"].index(int(r)) for r in picked_rows]
    assert ranks == sorted(ranks)  # the drawn ones keep the teacher's rank order
    assert [texts[int(r)] for r in picked_rows] == [row[f"doc_{j}"] for j in range(1, 5)]

    run_train(cfg)
    model_path = tmp_path / "run" / "train" / "model"
    assert not (model_path / "router_config.json").exists()  # one plain model for both sides
    probe = texts[:5]
    base, trained = (SentenceTransformer(str(path), device="cpu") for path in (model_dir, model_path))
    assert not np.allclose(base.encode(probe), trained.encode(probe), atol=1e-3)
    # trained on 16-token windows, it still reads documents as far as the base model does
    assert trained.max_seq_length == base.max_seq_length == 64


def test_in_batch_teacher_scores_every_passage_of_the_batch_for_every_query():
    """Symmetric in-batch form: query 0's softmax runs over query 1's passages too. A passage among query 0's own
    candidates keeps its teacher score wherever in the batch it sits; any other passage scores 0; query 0's dropped
    source passage (never scored by its teacher) is left out, not taught as a negative."""
    from embtune.train.losses import QueryDistillLoss, in_batch_teacher, split_rows

    # m = 2, k = 3. Query 0: source 9, candidates 1, 2, 3; query 1: source 1, candidates 4, 3, 9.
    labels = torch.tensor([[*split_rows([9]), *split_rows([1, 2]), *split_rows([1, 2, 3]), 0.9, 0.5, 0.2],
                           [*split_rows([1]), *split_rows([4, 9]), *split_rows([4, 3, 9]), 1.0, 0.6, 0.7]])
    teacher, unscored = in_batch_teacher(labels, 2)
    # the batch's passages: 1, 2 (query 0's), 4, 9 (query 1's)
    assert teacher.flatten().tolist() == pytest.approx([0.9, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.7])
    assert unscored.tolist() == [[False, False, False, True], [True, False, False, False]]

    # a student that agrees with the teacher over the whole batch beats one that agrees on its own passages only
    loss_fn = QueryDistillLoss(None, torch.zeros(1, 2), teacher_temperature=0.1, student_temperature=0.1)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # doc_1, doc_2 columns; "far" turns passage 2 (query 0's, a 0 for query 1) away from query 1, same cosine to query 0
    near = [torch.tensor([[1.0, 0.1], [0.1, 1.0]]), torch.tensor([[1.0, 0.6], [0.6, 1.0]])]
    far = [torch.tensor([[1.0, 0.1], [0.1, 1.0]]), torch.tensor([[1.0, -0.6], [0.6, 1.0]])]
    assert float(loss_fn.compute_loss_from_embeddings([query, *far], labels)) < \
        float(loss_fn.compute_loss_from_embeddings([query, *near], labels))
    own = QueryDistillLoss(None, torch.zeros(1, 2), in_batch=False)
    assert float(own.compute_loss_from_embeddings([query, *near], labels)) == pytest.approx(
        float(own.compute_loss_from_embeddings([query, *far], labels)), abs=1e-6)
    # without in-batch negatives each query's own passages carry the scores its teacher gave them
    cosines = torch.tensor([[1 / np.hypot(1, 0.1), 1 / np.hypot(1, 0.6)]] * 2, dtype=torch.float32)
    expected = own.kl(torch.tensor([[0.9, 0.5], [1.0, 0.7]]), cosines)
    assert float(own.compute_loss_from_embeddings([query, *near], labels)) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("bad, key", [(["train.query_distill_documents=4"], "document_side"),
                                      (["train.document_side=student", "train.query_distill_documents=1"], ">= 2"),
                                      (["train.document_side=student", "train.query_distill_documents=4",
                                        "train.query_distill_over=corpus"], "candidates")])
def test_symmetric_distillation_config_errors(tmp_path, bad, key):
    from embtune.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"run_dir={tmp_path}", f"data.path={tmp_path}", "data.queries=labelfree", *bad])

def asymmetric_model(base_dir, out_dir):
    """(base, student): a student perturbed from the base, saved at ``out_dir`` as a Router (student queries, base
    documents), as label-free training with ``train.document_side: base`` saves it."""
    from sentence_transformers import SentenceTransformer

    from embtune.train.recipe import save_asymmetric

    base = SentenceTransformer(str(base_dir), device="cpu")
    student = SentenceTransformer(str(base_dir), device="cpu")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_asymmetric(student, str(base_dir), out_dir)
    return base, student


def test_asymmetric_model_keeps_the_base_index(tmp_path, tiny_model_dir):
    """train.document_side: base saves a Router: queries take the trained route, documents the base model's, and
    the document side's embedding-cache key is the base model's (the corpus is not encoded again)."""
    from sentence_transformers import SentenceTransformer

    from embtune.retrieval.encoder import cache_key, encode

    base, student = asymmetric_model(tiny_model_dir, tmp_path / "model")
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    texts = ["star planet orbit", "flour butter sugar"]
    np.testing.assert_allclose(encode(model, texts, role="document"), encode(base, texts), atol=1e-5)
    np.testing.assert_allclose(encode(model, texts, role="query"), encode(student, texts), atol=1e-5)
    assert not np.allclose(encode(model, texts, role="query"), encode(base, texts), atol=1e-3)
    msl = model.max_seq_length
    assert cache_key(str(tmp_path / "model"), msl, role="document") == cache_key(str(tiny_model_dir), msl)
    assert cache_key(str(tmp_path / "model"), msl) != cache_key(str(tiny_model_dir), msl)
    # a plain model: roles change nothing
    np.testing.assert_allclose(encode(base, texts, role="query"), encode(base, texts), atol=1e-6)


def test_bundle_of_an_asymmetric_model_indexes_documents_and_serves_queries_by_role(tmp_path, tiny_model_dir):
    """Export and serve keep the routes apart: the index holds the base (document) route's vectors and a query is
    encoded with the trained route, as eval encodes them, so /search ranks as eval measured."""
    from embtune.retrieval.encoder import encode
    from embtune.serve.bundle import build_bundle, load_bundle

    base, student = asymmetric_model(tiny_model_dir, tmp_path / "model")
    docs = [{"_id": f"d{i}", "text": t} for i, t in enumerate(["star planet orbit", "flour butter sugar", "tide moon"])]
    bundle = load_bundle(build_bundle(tmp_path / "model", docs, tmp_path / "bundle"))
    stored = bundle.index.reconstruct_n(0, len(docs))  # (n_docs, dim)
    np.testing.assert_allclose(stored, encode(base, [d["text"] for d in docs]), atol=1e-5)
    queries = ["moon and tides", "baking"]
    np.testing.assert_allclose(bundle.encode(queries), encode(student, queries), atol=1e-5)
    assert not np.allclose(bundle.encode(queries), encode(base, queries), atol=1e-3)
