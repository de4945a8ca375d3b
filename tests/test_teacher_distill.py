"""Teacher scores (cached), teacher guards and audit, distillation losses, and the cross-encoder teacher recipe."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embtune.data_prep.mining import Guards, mine_negatives
from embtune.retrieval.rerank import CrossEncoderScorer
from embtune.schema import load_config


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny 2-layer BERT with a fresh one-logit head, saved as a CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertTokenizerFast

    torch.manual_seed(0)
    raw = tmp_path_factory.mktemp("tiny_ce_raw") / "raw"
    shutil.copytree(Path(tiny_model_dir).parent / "raw", raw)
    # transformers 5 ignores ``vocab_file=`` (the word-level vocabulary collapses to the 5 special tokens, so every
    # word is [UNK]); ``vocab=`` keeps it, and a teacher must tell documents apart.
    BertTokenizerFast(vocab=str(raw / "vocab.txt"), do_lower_case=True).save_pretrained(raw)
    model = CrossEncoder(str(raw), num_labels=1, max_length=64, device="cpu")
    # A freshly initialized head (std 0.02) scores every pair alike; spread it so guards have something to cut.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "classifier" in name or "pooler" in name or "word_embeddings" in name:
                param.normal_(0.0, 1.0)
    assert len(model.tokenizer) > 100
    out = tmp_path_factory.mktemp("tiny_ce") / "model"
    model.save_pretrained(str(out))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_corpus(tiny_beir):
    from embtune.dataio import document_text, load_beir

    data = load_beir(tiny_beir, "train")
    texts = {d: document_text(doc) for d, doc in data.corpus.items()}
    return data.corpus, data.queries, data.qrels, texts


def test_teacher_columns_are_added_and_cached(tiny_beir, tiny_cross_encoder_dir, cache):
    corpus, queries, qrels, texts = tiny_corpus(tiny_beir)
    teacher = CrossEncoderScorer(str(tiny_cross_encoder_dir), batch_size=8, max_length=64)
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=2, rank_end=10, teacher=teacher,
                                  audit_size=20)
    assert teacher.model_calls > 0
    direct = teacher.model.predict([(rows[0]["query"], rows[0]["negative_2"])], activation_fn=lambda x: x)
    np.testing.assert_allclose(rows[0]["score_negative_2"], float(direct[0]), rtol=1e-4, atol=1e-5)
    for row in rows:
        assert {"score_positive", "score_negative_1", "score_negative_2"} <= set(row)
    audit = report.audit
    sampled_above = audit["at_or_above_positive"]
    assert audit["sampled"] == 20 and 0 <= sampled_above <= 20
    assert audit["estimated_false_negative_rate"] == pytest.approx(sampled_above / 20)

    again = CrossEncoderScorer(str(tiny_cross_encoder_dir), batch_size=8, max_length=64)  # a new process, same cache
    rows_again, _ = mine_negatives(corpus, queries, qrels, texts, num_negatives=2, rank_end=10, teacher=again)
    assert again.model_calls == 0 and again._model is None  # the model was never even loaded
    assert rows_again == rows


def test_teacher_guards_drop_and_count(tiny_beir, tiny_cross_encoder_dir, cache):
    corpus, queries, qrels, texts = tiny_corpus(tiny_beir)
    teacher = CrossEncoderScorer(str(tiny_cross_encoder_dir), batch_size=16, max_length=64)
    # Independently: every window candidate that passes the always-on guards, with its and its positive's score.
    from embtune.data_prep.mining import bm25_ranking, candidate_query_ids, normalized_hash

    doc_ids = list(corpus)
    query_ids = candidate_query_ids(qrels)
    ranking = bm25_ranking([texts[d] for d in doc_ids], [queries[q] for q in query_ids], 8)
    scores = []
    for qi, q in enumerate(query_ids):
        positives = [d for d, r in qrels[q].items() if r > 0]
        positive_hashes = {normalized_hash(texts[d]) for d in positives}
        seen = set()
        positive_score = teacher.score([(queries[q], texts[d]) for d in positives]).min()
        for index in ranking.indices[qi]:
            h = normalized_hash(texts[doc_ids[index]])
            if doc_ids[index] in positives or h in positive_hashes or h in seen:
                continue
            seen.add(h)
            scores.append((positive_score, teacher.score([(queries[q], texts[doc_ids[index]])])[0]))
    ceiling = float(np.median([s for _, s in scores]))
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=1, rank_end=8, teacher=teacher,
                                  guards=Guards(teacher_max_score=ceiling), on_short="drop")
    assert report.dropped["teacher_max_score"] == sum(s > ceiling for _, s in scores) > 0
    assert all(row["score_negative_1"] <= ceiling for row in rows)
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=1, rank_end=8, teacher=teacher,
                                  guards=Guards(teacher_margin=0.0), on_short="drop")
    assert report.dropped["teacher_margin"] == sum(s > p for p, s in scores)
    assert all(row["score_negative_1"] <= row["score_positive"] for row in rows)
    assert report.audit["teacher_guard_applied"] and report.audit["at_or_above_positive"] <= report.audit["sampled"]


def run_data_prep(tmp_path, tiny_beir, teacher_dir, extra=()):
    from embtune.data_prep.run import run

    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "mining.num_negatives=2",
                 "mining.rank_end=10", f"mining.teacher={teacher_dir}", "mining.teacher_max_length=64", *extra]
    return overrides, run(load_config(None, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["margin_mse", "distill_kl", "mnrl+margin_mse", "mnrl+distill_kl"])
def test_distillation_losses_train_two_steps(loss, tmp_path, tiny_beir, tiny_model_dir, tiny_cross_encoder_dir,
                                             cache):
    from sentence_transformers import SentenceTransformer

    from embtune.train.recipe import run as train_run

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    overrides, _ = run_data_prep(tmp_path, tiny_beir, tiny_cross_encoder_dir)
    cfg = load_config(None, [*overrides, f"train.base_model={base}", f"train.loss={loss}", "train.max_steps=2",
                             "train.batch_size=4", "train.learning_rate=1e-3",
                             "train.matryoshka_dims=[32,16]", "tracking.report_to=none", "train.use_cpu=true"])
    outputs = train_run(cfg)
    manifest = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    losses = [row["loss"] for row in manifest["log_history"] if "loss" in row]
    assert losses and all(np.isfinite(losses)) and max(r["step"] for r in manifest["log_history"]) == 2
    trained = SentenceTransformer(outputs["model"], device="cpu")[0].auto_model.embeddings.word_embeddings.weight
    original = SentenceTransformer(str(base), device="cpu")[0].auto_model.embeddings.word_embeddings.weight
    assert (trained - original).abs().max().item() > 1e-6


def test_distillation_labels_and_missing_teacher_columns(tmp_path, tiny_beir, tiny_cross_encoder_dir, cache):
    from datasets import load_from_disk

    from embtune.train.losses import training_dataset

    _, outputs = run_data_prep(tmp_path, tiny_beir, tiny_cross_encoder_dir)
    table = load_from_disk(outputs["train_table"])
    def train_section(*overrides):
        return load_config(None, [f"data.path={tiny_beir}", *overrides]).train

    margin = training_dataset(table, train_section("train.loss=margin_mse",
                                                   "train.margin_mse_scale=0.5"))
    kl = training_dataset(table, train_section("train.loss=distill_kl"))
    assert margin.column_names == ["query", "positive", "negative_1", "negative_2", "label"]
    row = table[0]
    np.testing.assert_allclose(margin[0]["label"], [0.5 * (row["score_positive"] - row["score_negative_1"]),
                                                    0.5 * (row["score_positive"] - row["score_negative_2"])], rtol=1e-6)
    np.testing.assert_allclose(kl[0]["label"], [row["score_positive"], row["score_negative_1"],
                                                row["score_negative_2"]], rtol=1e-6)
    with pytest.raises(ValueError, match="mining.teacher"):
        training_dataset(table.remove_columns(["score_positive"]), train_section("train.loss=margin_mse"))


@pytest.mark.slow
def test_cross_encoder_teacher_trains_and_loads(tmp_path, tiny_beir, tiny_model_dir, cache):
    from sentence_transformers import CrossEncoder

    from embtune.data_prep.run import run as data_prep_run
    from embtune.train.cross_encoder import run as ce_run

    base = tmp_path / "base"
    shutil.copytree(Path(tiny_model_dir).parent / "raw", base)  # a plain BERT checkpoint: the head is new
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "mining.num_negatives=2",
                 f"cross_encoder.base_model={base}", "cross_encoder.max_steps=2", "cross_encoder.batch_size=4",
                 "cross_encoder.learning_rate=1e-3", "cross_encoder.max_length=64", "cross_encoder.num_negatives=2"]
    cfg = load_config(None, overrides)
    data_prep_run(cfg)
    outputs = ce_run(cfg)
    model = CrossEncoder(outputs["model"], device="cpu")
    assert model.num_labels == 1
    scores = model.predict([("star planet", "star planet orbit"), ("star planet", "flour butter sugar")])
    assert np.isfinite(scores).all() and scores.shape == (2,)
    manifest = json.loads((tmp_path / "run" / "cross_encoder" / "manifest.json").read_text())
    assert max(r["step"] for r in manifest["log_history"]) == 2
    # the trained teacher is a valid mining.teacher
    teacher = CrossEncoderScorer(outputs["model"], max_length=64)
    assert teacher.score([("star planet", "star planet orbit")]).shape == (1,)


def test_hybrid_teacher_is_the_core_fusion_on_the_cosine_scale(tiny_beir, tiny_model_dir, cache):
    """The label-free teacher, recomputed independently: z-scores of the model's cosine and of BM25 (with the
    ``bm25`` section's k1 and b) over the corpus, weighted 1 : bm25_weight, mapped back to the cosine's scale."""
    from sentence_transformers import SentenceTransformer

    from embtune.data_prep.teacher import HybridTeacher
    from embtune.retrieval.bm25 import BM25Config, FastBM25, build_tokenizer

    corpus, queries, qrels, texts = tiny_corpus(tiny_beir)
    doc_texts = [texts[d] for d in corpus]
    settings = BM25Config(k1=0.9, b=0.4)
    tokenizer = build_tokenizer(settings)
    pairs = [(queries[q], texts[d]) for q in list(qrels)[:3] for d in list(corpus)[:5]]
    model = SentenceTransformer(str(tiny_model_dir))
    all_docs = model.encode(doc_texts, normalize_embeddings=True)  # (n_docs, dim)
    index = FastBM25(tokenizer.tokenize_many(doc_texts), k1=0.9, b=0.4)
    expected, cosines = [], []
    for query, doc in pairs:
        cosine = all_docs @ model.encode([query], normalize_embeddings=True)[0]  # (n_docs,)
        lexical = index.get_scores(tokenizer(query))  # (n_docs,)
        row = doc_texts.index(doc)
        z_cosine = (cosine[row] - cosine.mean()) / cosine.std()
        z_lexical = (lexical[row] - lexical.mean()) / lexical.std()
        fused = 0.7 * z_cosine + 0.3 * z_lexical
        expected.append(cosine.mean() + cosine.std() * fused)
        cosines.append(cosine[row])

    dense_only = HybridTeacher(doc_texts, str(tiny_model_dir), settings, bm25_weight=0.0).score(pairs)
    np.testing.assert_allclose(dense_only, cosines, atol=1e-5)
    hybrid = HybridTeacher(doc_texts, str(tiny_model_dir), settings, bm25_weight=3 / 7).score(pairs)
    np.testing.assert_allclose(hybrid, expected, atol=1e-5)
    assert np.ptp(np.array(expected) - np.array(cosines)) > 1e-3  # BM25 moves the scores on these pairs
    # k1 and b are the section's: the default BM25 scores these pairs otherwise
    default = HybridTeacher(doc_texts, str(tiny_model_dir), BM25Config(), bm25_weight=3 / 7).score(pairs)
    assert not np.allclose(default, hybrid, atol=1e-6)
    with pytest.raises(ValueError, match="not in the corpus"):
        HybridTeacher(doc_texts, str(tiny_model_dir), settings).score([("q", "a document nobody indexed")])


def test_hybrid_teacher_feeds_margin_mse_through_the_stage(tmp_path, tiny_beir, tiny_model_dir, cache):
    from datasets import load_from_disk

    from embtune.train.losses import training_dataset

    overrides, outputs = run_data_prep(tmp_path, tiny_beir, "hybrid", extra=[f"train.base_model={tiny_model_dir}",
                                                                            "mining.teacher_bm25_weight=0.5"])
    table = load_from_disk(outputs["train_table"])
    assert {"score_positive", "score_negative_1", "score_negative_2"} <= set(table.column_names)
    # the scores the stage wrote are the teacher's (the bm25 section's BM25, weight 0.5)
    from embtune.data_prep.teacher import HybridTeacher
    from embtune.retrieval.bm25 import BM25Config

    corpus, _, _, texts = tiny_corpus(tiny_beir)
    teacher = HybridTeacher([texts[d] for d in corpus], str(tiny_model_dir), BM25Config(), bm25_weight=0.5)
    np.testing.assert_allclose(teacher.score([(table[0]["query"], table[0]["positive"])]),
                               [table[0]["score_positive"]], atol=1e-5)
    margin = training_dataset(table, load_config(None, [*overrides, "train.loss=margin_mse",
                                                        "train.margin_mse_scale=1"]).train)
    row = table[0]
    np.testing.assert_allclose(margin[0]["label"][0], row["score_positive"] - row["score_negative_1"], rtol=1e-6)
    report = json.loads(Path(outputs["mining_report"]).read_text())
    assert report["audit"]["sampled"] > 0
