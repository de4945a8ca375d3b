"""Label-free in any language and script, and never losing (issue 19): script-aware sentences and BM25, the
tokenizer fit, the probe's decision, the probe set held out of training, and a deploy choice that never reads the
split being reported."""

from __future__ import annotations

import json
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from embtune.retrieval.language import count_words, detect_language, split_sentences, tokenize_with_bigrams
from embtune.retrieval.probe import ClozeProbe
from tests.test_labelfree import recipe, sentence_corpus

# Han characters grouped by topic: a passage's sentences draw from its topic's characters and its own "name".
HAN = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈剑号巨阙珠称夜光"


def han_corpus(folder: Path, topics: int = 4, docs_per_topic: int = 8, seed: int = 0) -> Path:
    """A BEIR folder of Chinese-script passages, 4 sentences each ending in 。, no spaces, no letter case."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(HAN)
    docs = []
    for t in range(topics):
        vocab = chars[t * 10:(t + 1) * 10]
        for i in range(docs_per_topic):
            own = chars[(t * docs_per_topic + i) % len(chars)] + chars[(7 * i + t) % len(chars)]
            sentences = [own + "".join(rng.choice(vocab) for _ in range(14)) + "。" for _ in range(4)]
            docs.append({"_id": f"t{t}-{i}", "title": "", "text": "".join(sentences)})
    with open(folder / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    return folder


def test_sentences_and_words_in_any_script():
    assert split_sentences("这是第一句。这是第二句！好吗？") == ["这是第一句。", "这是第二句！", "好吗？"]
    assert split_sentences("مرحبا بالعالم. هذا اختبار؟ نعم") == ["مرحبا بالعالم.", "هذا اختبار؟", "نعم"]
    assert split_sentences("पहला वाक्य। दूसरा वाक्य।") == ["पहला वाक्य।", "दूसरा वाक्य।"]
    assert split_sentences("Первое. Второе предложение.") == ["Первое.", "Второе предложение."]
    # a cased script keeps its abbreviations: no boundary before a lower-case letter
    assert split_sentences("It works, e.g. here. Next one.") == ["It works, e.g. here.", "Next one."]
    assert count_words("这是第一句") == 3 and count_words("two words") == 2
    assert tokenize_with_bigrams("这是第一 abc") == ["这是", "是第", "第一", "abc"]


def test_bm25_language_follows_the_corpus():
    from embtune.retrieval.bm25 import BM25Config, build_tokenizer

    english = ["The cells of the patient were treated with the drug and the results are shown."] * 3
    german = ["Die Datei wird mit dem Befehl kopiert und ist danach in dem Verzeichnis, das auch leer sein kann."] * 3
    assert detect_language(english)["language"] == "english"
    assert detect_language(german)["language"] == "german"
    assert detect_language(["Выводит список файлов каталога."])["language"] == "russian"
    assert detect_language(["显示文件。"])["language"] == "cjk"
    settings = BM25Config()
    assert build_tokenizer(settings, english).describe() == build_tokenizer(settings).describe()  # as before
    assert build_tokenizer(settings, german).describe()["stemmer"] == "german"
    assert build_tokenizer(settings, german).describe()["stopwords"] is None  # no English stop words on German
    assert build_tokenizer(settings, ["显示文件。"]).describe()["bigrams"]
    assert build_tokenizer(BM25Config(language="english"), german).describe()["stemmer"] == "english"


class Noise:  # encodes any text to a fixed random unit vector: a model that reads nothing
    def encode(self, batch, **kwargs):
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in batch])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    similarity_fn_name = "cosine"


def test_a_non_latin_corpus_yields_pseudo_queries_and_a_measured_probe(tmp_path):
    """Sentences ending in 。 with no capital letters: every passage gives queries, and the probe measures (BM25 on
    character bigrams finds the cut passage)."""
    from embtune.data_prep.labelfree import FusedTeacher, cut_queries, probe_teacher
    from embtune.dataio import document_text
    from embtune.retrieval.bm25 import BM25Config, resolve_language

    corpus_dir = han_corpus(tmp_path / "han")
    corpus = {d["_id"]: d for d in map(json.loads, (corpus_dir / "corpus.jsonl").read_text().splitlines())}
    doc_ids = list(corpus)
    texts = [document_text(corpus[d]) for d in doc_ids]
    probe_set = ClozeProbe.build(corpus, 20, 6, 40, seed=0, include_title=True)
    assert len(probe_set) == 20
    queries = cut_queries(corpus, 0, 2, True, 6, 40, seed=0, exclude=set(probe_set.targets))
    assert {q.source for q in queries} == set(doc_ids) - set(probe_set.targets)  # probe passages held out
    assert all(q.kind == "sentence" and q.text.endswith("。") for q in queries)
    settings = BM25Config(language=resolve_language(BM25Config(), texts))
    assert settings.language == "cjk"
    model = Noise()
    teacher = FusedTeacher(doc_ids, texts, model.encode(texts).astype(np.float32), model, settings)
    probe = probe_teacher(teacher, probe_set, texts, [0.0, 0.5, 1.0])
    assert probe["queries"] == 20 and probe["choice"] is not None
    assert probe["bm25_alone"] > 50 > probe["dense_alone"]


def test_decide_keeps_the_base_without_headroom_and_says_why():
    from embtune.data_prep.labelfree import decide

    probe = {"queries": 600, "dense_alone": 76.36, "bm25_alone": 40.0, "choice": 0.8, "choice_mrr": 76.89}
    decision = decide(True, "reads", probe, min_headroom=5.0)
    assert decision["train"] is False and decision["decision"] == "base"
    assert "+0.53" in decision["reason"] and "min_headroom" in decision["reason"]
    rich = {**probe, "dense_alone": 80.02, "choice_mrr": 88.64, "choice": 0.4}
    assert decide(True, "reads", rich, min_headroom=5.0)["train"] is True
    blind = decide(True, "reads", {"queries": 0, "choice": None, "reason": "no passage"}, min_headroom=5.0)
    assert blind["decision"] == "base" and "could not measure" in blind["reason"]
    unreadable = decide(False, "67% [UNK]", rich, min_headroom=5.0)
    assert unreadable["decision"] == "bm25" and "cannot read" in unreadable["reason"]


def test_a_student_ships_only_when_it_beats_the_base_on_the_probe():
    from embtune.eval.deploy import choose_on_evidence

    scores = {"base": 60.0, "bm25": 55.0, "base+bm25_weighted": 70.0, "finetuned": 62.0,
              "finetuned+bm25_weighted": 70.5}
    assert choose_on_evidence(scores, 1.0)[0] == "base+bm25_weighted"  # +0.5 is not enough
    assert choose_on_evidence({**scores, "finetuned+bm25_weighted": 71.5}, 1.0)[0] == "finetuned+bm25_weighted"
    assert choose_on_evidence({"base": 50.0, "bm25": 50.0}, 1.0)[0] == "base"  # a tie goes to the simpler row


@pytest.mark.slow
def test_a_corpus_the_model_cannot_read_ships_bm25_and_says_why(tmp_path, tiny_model_dir):
    """Every character is the tiny model's unknown token: data_prep says so, no student is trained, eval and the
    bundle serve BM25 (on character bigrams)."""
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import run as run_eval
    from embtune.serve.export import run as run_export
    from embtune.train.recipe import run as run_train

    corpus_dir = han_corpus(tmp_path / "han")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = recipe(tmp_path, corpus_dir, model_dir, "labelfree.max_unknown_share=0.05",
                 "labelfree.max_single_letter_share=0.5", "labelfree.min_words=6", "export.targets=[faiss]")
    run_data_prep(cfg)
    report = json.loads((tmp_path / "run" / "data_prep" / "report.json").read_text())["labelfree"]
    assert report["tokenizer_fit"]["reads"] is False and report["decision"]["decision"] == "bm25"
    assert "cannot read" in report["decision"]["reason"] and report["language"]["bm25_language"] == "cjk"
    assert report["teacher"]["dense_weight"] == 0.0
    run_train(cfg)
    assert json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())["trained"] is False
    results = json.loads(Path(run_eval(cfg)["results"]).read_text())
    recommended = results["recommended"]
    assert recommended["row"] == "bm25" and recommended["chosen_by"] == "tokenizer fit"
    assert "cannot read" in recommended["why"]
    bundle = Path(run_export(cfg)["bundle"])
    served = json.loads((bundle / "retriever.json").read_text())
    assert served["dense"] is None and served["bm25"] is not None


@pytest.mark.slow
def test_without_labels_the_probe_chooses_what_ships(tmp_path, tiny_model_dir):
    """A readable corpus, no queries: eval measures the rows on the held-out probe and the bundle serves the
    winner, with the evidence recorded."""
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import run as run_eval
    from embtune.serve.export import run as run_export
    from embtune.train.recipe import run as run_train

    corpus_dir = sentence_corpus(tmp_path / "corpus_only")
    cfg = recipe(tmp_path, corpus_dir, tiny_model_dir, "export.targets=[faiss]")
    run_data_prep(cfg)
    run_train(cfg)
    results = json.loads(Path(run_eval(cfg)["results"]).read_text())
    recommended = results["recommended"]
    assert recommended["chosen_by"] == "probe"
    evidence = {k: v for k, v in recommended["evidence"].items() if k != "metric"}
    assert set(evidence) == {"base", "bm25", "base+bm25_weighted", "finetuned", "finetuned+bm25_weighted"}
    assert evidence[recommended["row"]] == max(evidence.values()) or recommended["row"].startswith("base")
    bundle = Path(run_export(cfg)["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["retriever_source"]["chosen_by"] == "probe"
    assert manifest["retriever_source"]["evidence"] == recommended["evidence"]


@pytest.mark.slow
@pytest.mark.parametrize("favour", ["bm25", "base"])
def test_the_deploy_choice_never_reads_the_reported_split(tmp_path, tiny_model_dir, favour):
    """Labelled queries with a dev split: the recommended row and its fusion weight come from dev. Rewriting the
    test qrels so that another row is perfect on test changes nothing."""
    from embtune.data_prep.run import run as run_data_prep
    from embtune.eval.run import read_run
    from embtune.eval.run import run as run_eval

    corpus_dir = sentence_corpus(tmp_path / "beir", qrels=True)
    shutil.copy(corpus_dir / "qrels" / "test.tsv", corpus_dir / "qrels" / "train.tsv")
    cfg = recipe(tmp_path, corpus_dir, tiny_model_dir, "data.dev_fraction=0.5", "labelfree.min_headroom=1000",
                 "eval.save_runs=10", "eval.significance_resamples=0")
    run_data_prep(cfg)
    from embtune.train.recipe import run as run_train

    run_train(cfg)
    first = json.loads(Path(run_eval(cfg)["results"]).read_text())
    assert first["recommended"]["chosen_by"] == "dev"
    assert first["hybrid_weight"]["from"] == "dev"
    # another row than the dev choice becomes perfect on test: its top document is judged relevant
    row = favour if first["recommended"]["row"] != favour else ("base" if favour == "bm25" else "bm25")
    top = read_run(tmp_path / "run" / "eval" / "runs" / f"{row}.trec")
    with open(corpus_dir / "qrels" / "test.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"{q}\t{docs[0]}\t1\n" for q, docs in top.items())
    second = json.loads(Path(run_eval(cfg, force=True)["results"]).read_text())
    assert second["results"][row]["ndcg@10"] == pytest.approx(1.0)
    assert second["recommended"]["best_on_split"]["ndcg@10"] == pytest.approx(1.0)
    for key in ("row", "spec", "chosen_by", "evidence"):
        assert second["recommended"][key] == first["recommended"][key]
