"""python -m embtune.eval.choose: candidates, BM25 and hybrids ranked on dev (or synthetic) queries, with a fit
check."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from embtune.dataio import split_dev
from embtune.eval.choose import choose, main, resolve_candidates
from embtune.schema import load_config


def load_qrels(path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in Path(path).read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    return qrels


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def fake_run(run_dir: Path, model_src: Path) -> Path:
    """An earlier run's folder as the train stage leaves it: a model and a manifest naming it."""
    model = run_dir / "train" / "model"
    shutil.copytree(model_src, model)
    (run_dir / "train" / "manifest.json").write_text(json.dumps({"outputs": {"model": str(model)}}))
    return model


def test_candidates_bm25_and_hybrids_are_ranked_on_the_dev_split(tmp_path, tiny_beir, tiny_model_dir):
    fake_run(tmp_path / "runs" / "old", tiny_model_dir)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.5",
                             "eval.choose.timing_documents=16", "eval.choose.resamples=200",
                             "eval.choose.hybrid=[rrf, weighted]"])
    result = choose(cfg, [str(tiny_model_dir), f"run:{tmp_path / 'runs'}/*", f"run:{tmp_path / 'runs' / 'none'}*"])

    # Dev is the seeded split of the train queries that data_prep would carve; test queries never take part.
    train = load_qrels(tiny_beir / "qrels" / "train.tsv")
    _, dev = split_dev(train, 0.5, cfg.seed)
    assert result["queries"]["source"] == "dev" and result["queries"]["num_queries"] == len(dev)
    assert set(result["per_query"]["bm25"]) == set(dev)
    assert not set(dev) & set(load_qrels(tiny_beir / "qrels" / "test.tsv"))

    ranking = result["ranking"]
    names = [row["name"] for row in ranking]
    old = f"run:{tmp_path / 'runs' / 'old'}"
    assert set(names) == {str(tiny_model_dir), old, "bm25", *(f"{m}+bm25_{f}" for m in (str(tiny_model_dir), old)
                                                             for f in ("rrf", "weighted"))}
    scores = [row["ndcg@10"] for row in ranking]
    assert scores == sorted(scores, reverse=True) and [row["rank"] for row in ranking] == list(range(1, 8))
    assert ranking[0]["vs_best"] is None and result["best"] == names[0]
    for row in ranking[1:]:
        assert 0.0 <= row["vs_best"]["p_value"] <= 1.0
        assert row["vs_best"]["diff"] == pytest.approx(row["ndcg@10"] - ranking[0]["ndcg@10"])
    dense = next(row for row in ranking if row["name"] == str(tiny_model_dir))
    assert dense["kind"] == "dense" and dense["dim"] == 32 and dense["bytes_per_vector"] == 128
    assert dense["encode_s_per_1k_docs"] > 0 and dense["fit"]["documents"] == 72
    # The fixture's documents are mostly the tiny model's own vocabulary (titles are not): no warning about it.
    assert dense["fit"]["unknown_share"] < cfg.eval.choose.max_unknown_share
    assert not any("cannot read" in w for w in dense["warnings"])
    assert any("no earlier run" in w for w in result["warnings"])  # the glob that matched nothing

    out = tmp_path / "run" / "eval"
    assert read_json(out / "choose.json")["best"] == result["best"]
    assert "bm25" in (out / "choose.txt").read_text()


ETHIOPIC = [chr(c) for c in range(0x1200, 0x1248)]  # Ge'ez syllables: absent from MiniLM's English vocabulary


def ethiopic_beir(folder: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Documents of random Ge'ez-script words; each query is four words of its document (BM25 finds it)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(ETHIOPIC) for _ in range(rng.randint(2, 4))) for _ in range(300)]
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as corpus, open(folder / "queries.jsonl", "w") as queries:
        for i in range(n_docs):
            words = rng.sample(vocab, 25)
            corpus.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(words)}, ensure_ascii=False) + "\n")
            queries.write(json.dumps({"_id": f"q{i}", "text": " ".join(words[:4])}, ensure_ascii=False) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                + "".join(f"q{i}\td{i}\t1\n" for i in range(n_docs)))
    return folder


def test_an_english_model_on_a_script_it_cannot_read_is_flagged(tmp_path, minilm_dir):
    beir = ethiopic_beir(tmp_path / "amharic")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={beir}", "data.dev_fraction=0.5",
                             "eval.choose.timing_documents=8", "eval.choose.resamples=200"])
    result = choose(cfg, ["minilm"])
    rows = {row["name"]: row for row in result["ranking"]}
    assert result["best"] == "bm25" and rows["bm25"]["ndcg@10"] > 0.9
    # Every Ge'ez word is [UNK] to MiniLM, so all documents look alike: it scores a fraction of BM25.
    assert rows["minilm"]["fit"]["unknown_share"] > 0.9 and rows["minilm"]["fit"]["unknown_token"] == "[UNK]"
    assert rows["minilm"]["ndcg@10"] < 0.3 * rows["bm25"]["ndcg@10"]
    assert rows["minilm"]["vs_best"]["p_value"] < 0.01
    warnings = " ".join(rows["minilm"]["warnings"])
    assert "[UNK]" in warnings and "cannot read" in warnings and "does not fit" in warnings
    assert any(w.startswith("minilm:") for w in result["warnings"])


def test_synthetic_queries_rank_the_candidates_when_there_is_no_dev_split(tmp_path, tiny_beir, tiny_model_dir):
    """Without labels, data_prep's synthetic queries are used (judged chunk ids map to their documents)."""
    run_dir = tmp_path / "run"
    synthetic = run_dir / "data_prep" / "synthetic"
    (synthetic / "qrels").mkdir(parents=True)
    corpus_ids = [json.loads(line)["_id"] for line in open(tiny_beir / "corpus.jsonl")]
    texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(tiny_beir / "corpus.jsonl")}
    (synthetic / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"syn{i}", "text": " ".join(texts[d].split()[:6])}) + "\n"
        for i, d in enumerate(corpus_ids[:10])))
    (synthetic / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"syn{i}\t{d}#0\t1\n" for i, d in enumerate(corpus_ids[:10])))
    (run_dir / "data_prep" / "manifest.json").write_text(json.dumps({"outputs": {
        "eval_dataset": str(tiny_beir), "synthetic_queries": str(synthetic / "queries.jsonl"),
        "synthetic_qrels": str(synthetic / "qrels" / "train.tsv")}}))
    cfg = load_config(None, [f"run_dir={run_dir}", f"data.path={tiny_beir}", "eval.choose.timing_documents=8",
                             "eval.choose.resamples=200", "eval.choose.hybrid=[]"])
    result = choose(cfg, [str(tiny_model_dir)])
    assert result["queries"]["source"] == "synthetic" and result["queries"]["num_queries"] == 10
    assert set(result["per_query"]["bm25"]) == {f"syn{i}" for i in range(10)}
    assert result["ranking"][0]["name"] == "bm25" and result["ranking"][0]["ndcg@10"] > 0.5  # ids were mapped
    assert any("synthetic queries" in w for w in result["warnings"])


def test_no_queries_to_choose_on_names_the_settings(tmp_path, tiny_beir):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}"])
    with pytest.raises(ValueError, match="data.dev_fraction"):
        choose(cfg, ["minilm"])
    with pytest.raises(ValueError, match="no dev split"):
        choose(load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}",
                                  "eval.choose.queries=dev"]), ["minilm"])


def test_candidate_forms(tmp_path, tiny_model_dir, minilm_dir):
    model = fake_run(tmp_path / "runs" / "a", tiny_model_dir)
    candidates, warnings = resolve_candidates(
        ["minilm", str(minilm_dir), f"run:{tmp_path / 'runs' / 'a'}", "openai:emb@http://127.0.0.1:9/v1", "org/model"])
    # The alias and its folder are one model; run: reads the train manifest; endpoints and hub names pass through.
    assert [c.model for c in candidates] == [str(minilm_dir), str(model), "openai:emb@http://127.0.0.1:9/v1",
                                             "org/model"]
    assert warnings == []
    with pytest.raises(FileNotFoundError, match="no trained model"):
        resolve_candidates([f"run:{tmp_path / 'runs' / 'missing'}"])


def test_a_hub_name_without_a_hub_is_skipped_not_fatal(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.5",
                             "eval.choose.timing_documents=8", "eval.choose.resamples=200", "eval.choose.hybrid=[]"])
    result = choose(cfg, ["embtune-no-such-org/no-such-model", str(tiny_model_dir)])
    assert [s["candidate"] for s in result["skipped"]] == ["embtune-no-such-org/no-such-model"]
    assert {row["name"] for row in result["ranking"]} == {str(tiny_model_dir), "bm25"}


def test_help_documents_the_candidate_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for form in ("minilm", "run:runs/*", "openai:<model>[@<base_url>]", "hub name", "eval.choose.candidates"):
        assert form in text


def test_the_choice_reads_titles_as_eval_does(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    """mining.include_title false: the candidates and BM25 read each document's text alone, as eval and the bundle
    do (the choice ranks what ships)."""
    import embtune.eval.choose as choose_module
    from embtune.dataio import document_text, load_corpus

    seen: list[list[str]] = []
    real = choose_module.BM25Index

    def spy(doc_texts, settings):
        seen.append(list(doc_texts))
        return real(doc_texts, settings)

    monkeypatch.setattr(choose_module, "BM25Index", spy)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", "data.dev_fraction=0.5",
                             "eval.choose.timing_documents=8", "eval.choose.resamples=100", "eval.choose.hybrid=[]",
                             "mining.include_title=false"])
    choose(cfg, [str(tiny_model_dir)])
    corpus = load_corpus(tiny_beir / "corpus.jsonl")
    assert seen == [[document_text(doc, False) for doc in corpus.values()]]
    assert seen[0] != [document_text(doc, True) for doc in corpus.values()]  # the fixture's titles matter
