"""Hybrid fusion and cross-encoder rerank: hand-checked fusion, rerank order = cross-encoder order, eval rows."""

import json
import math

import numpy as np
import pytest

from embtune.retrieval.fusion import rrf_fuse, weighted_fuse
from embtune.retrieval.rerank import rerank


def build_tiny_cross_encoder(folder):
    """A 2-layer BERT with one output label, loadable as ``CrossEncoder(folder)``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from tests.conftest import _vocab

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tmp_path_factory):
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_ce") / "model")


def test_rrf_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.8, "c": 0.1}}
    sparse = {"q": {"c": 12.0, "a": 3.0}}
    fused = rrf_fuse([dense, sparse], k=60)["q"]
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert sorted(fused, key=fused.get, reverse=True) == ["a", "c", "b"]
    # depth cuts each run before fusing: only the top 1 of each counts
    assert rrf_fuse([dense, sparse], k=60, depth=1)["q"] == {"a": 1 / 61, "c": 1 / 61}


def test_weighted_fusion_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}  # min-max: a 1, b 0.5, c 0
    sparse = {"q": {"c": 10.0, "b": 4.0, "d": 0.0}}  # min-max: c 1, b 0.4, d 0
    fused = weighted_fuse(dense, sparse, dense_weight=0.75, normalization="topk_minmax")["q"]
    assert fused == pytest.approx({"a": 0.75, "b": 0.75 * 0.5 + 0.25 * 0.4, "c": 0.25, "d": 0.0})


def test_corpus_zscore_fusion_by_hand():
    """The default: z-scores over the query's whole-corpus scores; a document one run lacks gets that run's lowest."""
    from embtune.retrieval.fusion import MemberRun, ScoreStats

    dense_all = np.array([0.9, 0.5, 0.1, 0.3, 0.2])  # every document's cosine; the run holds the top 3
    sparse_all = np.array([0.0, 4.0, 10.0, 0.0, 1.0])  # BM25; the run holds the top 2
    ids = ["a", "b", "c", "d", "e"]
    dense = MemberRun({"q": {ids[i]: dense_all[i] for i in (0, 1, 3)}}, {"q": ScoreStats.of(dense_all)})
    sparse = MemberRun({"q": {ids[i]: sparse_all[i] for i in (2, 1)}}, {"q": ScoreStats.of(sparse_all)})
    z_dense = (dense_all - dense_all.mean()) / dense_all.std()
    z_sparse = (sparse_all - sparse_all.mean()) / sparse_all.std()
    floor_dense, floor_sparse = z_dense[3], z_sparse[1]  # the lowest of each run's top
    fused = weighted_fuse(dense, sparse, dense_weight=0.6, depth=3)["q"]
    assert fused == pytest.approx({"a": 0.6 * z_dense[0] + 0.4 * floor_sparse,
                                   "b": 0.6 * z_dense[1] + 0.4 * z_sparse[1],
                                   "c": 0.6 * floor_dense + 0.4 * z_sparse[2],
                                   "d": 0.6 * z_dense[3] + 0.4 * floor_sparse})
    # corpus_minmax: the same over (min, max) of the corpus
    fused = weighted_fuse(dense, sparse, 0.5, 3, normalization="corpus_minmax")["q"]
    assert fused["b"] == pytest.approx(0.5 * (0.5 - 0.1) / 0.8 + 0.5 * 4.0 / 10.0)


def test_a_whole_corpus_normalization_without_statistics_is_an_error():
    dense = {"q": {"a": 0.9, "b": 0.5}}
    sparse = {"q": {"b": 3.0}}
    with pytest.raises(ValueError, match="whole-corpus score statistics, missing for query 'q'"):
        weighted_fuse(dense, sparse, 0.5, 10)
    with pytest.raises(ValueError, match="unknown fusion normalization"):
        weighted_fuse(dense, sparse, 0.5, 10, normalization="rank")


class Oracle:
    """Scores a (query, document) pair 1 when the document is the query's relevant one."""

    def __init__(self, relevant):
        self.relevant = relevant

    def predict(self, pairs, batch_size=32, **kwargs):
        return np.array([1.0 if self.relevant.get(q) == d else 0.0 for q, d in pairs])


def test_rerank_with_an_oracle_puts_the_relevant_document_first_and_keeps_the_tail():
    run = {"q1": {f"d{i}": 10.0 - i for i in range(6)}}
    texts = {f"d{i}": f"d{i}" for i in range(6)}
    out = rerank(Oracle({"query one": "d3"}), run, {"q1": "query one"}, texts, top_k=4)["q1"]
    order = sorted(out, key=out.get, reverse=True)
    assert order == ["d3", "d0", "d1", "d2", "d4", "d5"]  # d3 promoted; d4, d5 below top_k in first-stage order
    # top_k=3 never sees d3: nothing moves above it
    out = rerank(Oracle({"query one": "d3"}), run, {"q1": "query one"}, texts, top_k=3)["q1"]
    assert sorted(out, key=out.get, reverse=True)[3:] == ["d3", "d4", "d5"]


def test_rerank_orders_by_the_cross_encoder(tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    scorer = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu")
    docs = {"d0": "star planet orbit", "d1": "oven flour butter", "d2": "guitar melody chord", "d3": "bank loan"}
    run = {"q": {"d0": 4.0, "d1": 3.0, "d2": 2.0, "d3": 1.0}}
    out = rerank(scorer, run, {"q": "moon telescope"}, docs, top_k=4)["q"]
    expected = scorer.predict([("moon telescope", docs[d]) for d in ("d0", "d1", "d2", "d3")])
    assert [out[d] for d in ("d0", "d1", "d2", "d3")] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.slow
def test_eval_stage_adds_hybrid_rerank_significance_and_sweep(tiny_beir, minilm_dir, tiny_cross_encoder_dir,
                                                              tmp_path, monkeypatch):
    # MiniLM rather than the untrained tiny BERT: the tiny model scores every document the same, and a ranking of
    # ties says nothing about parity between the sweep and the eval table.
    from embtune.eval.run import run
    from embtune.schema import load_config

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=beir", f"data.path={tiny_beir}",
                             f"train.base_model={minilm_dir}", "eval.dims=[384,64]", "eval.sweep.dims=[64]",
                             "eval.hybrid=[rrf,weighted]",
                             f"eval.reranker={tiny_cross_encoder_dir}", "eval.rerank_on=[base,bm25]",
                             "eval.rerank_top_k=5", "eval.significance_resamples=500", "eval.sweep.enabled=true",
                             "eval.sweep.indexes=[flat,binary]", "eval.sweep.rescore_docs=[bits]",
                             "eval.sweep.rescore_multiplier=[4]", "eval.save_runs=100"])
    outputs = run(cfg)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    rows = results["results"]
    assert set(rows) == {"base", "bm25", "base+bm25_rrf", "base+bm25_weighted", "base>rerank", "bm25>rerank"}
    # The RRF row, rebuilt outside eval from the two runs it saved (fusion by hand, pytrec_eval called directly):
    # the fused row scores what fusing its members' rankings scores, not some other list.
    runs_dir = tmp_path / "run" / "eval" / "runs"
    members = {}
    for row in ("base", "bm25"):
        ranks: dict[str, dict[str, int]] = {}
        for line in (runs_dir / f"{row}.trec").read_text().splitlines():
            qid, _, doc, rank, _, _ = line.split()
            ranks.setdefault(qid, {})[doc] = int(rank)
        members[row] = ranks
    fused = {q: {} for q in members["base"]}
    for ranks in members.values():
        for qid, docs in ranks.items():
            for doc, rank in docs.items():
                fused[qid][doc] = fused[qid].get(doc, 0.0) + 1.0 / (60 + rank)
    qrels: dict[str, dict[str, int]] = {}
    for line in (tiny_beir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(score)
    import pytrec_eval

    by_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(
        {q: {d: s for d, s in docs.items()} for q, docs in fused.items() if q in qrels})
    expected = sum(v["ndcg_cut_10"] for v in by_query.values()) / len(qrels)
    assert rows["base+bm25_rrf"]["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    # rerank of the top 5 leaves recall@100 of the first stage unchanged: the tail is kept
    assert rows["bm25>rerank"]["recall@100"] == pytest.approx(rows["bm25"]["recall@100"])
    # nothing was trained, so every other row is tested against base (diff = base - row)
    assert set(results["significance"]) == {f"base vs {name}" for name in rows if name != "base"}
    # "base vs bm25" counts base's wins (diff = base - row), from the per-query scores the table reports
    sig = results["significance"]["base vs bm25"]
    base_q, bm25_q = results["per_query"]["base"], results["per_query"]["bm25"]
    diffs = [base_q[q]["ndcg@10"] - bm25_q.get(q, {}).get("ndcg@10", 0.0) for q in base_q]
    assert (sig["wins"], sig["losses"]) == (sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs))
    assert sig["diff"] == pytest.approx(np.mean(diffs), abs=1e-9)

    # The sweep's exact row at full dim reproduces the eval table's nDCG@10 for the same model.
    sweep = json.loads((tmp_path / "run" / "eval" / "sweep.json").read_text())["rows"]
    flat = next(r for r in sweep if r["index"] == "flat" and r["precision"] == "fp32")
    assert flat["dim"] == 384 and flat["recall@10_vs_exact"] == 1.0
    assert flat["ndcg@10"] == pytest.approx(rows["base"]["ndcg@10"], abs=1e-6)
    assert (tmp_path / "run" / "eval" / "sweep.png").stat().st_size > 1000
    assert "sweep_plot" in outputs and math.isfinite(flat["qps"])


def test_rerank_on_an_unknown_row_fails_before_encoding(tiny_beir, tmp_path):
    from embtune.eval.run import run
    from embtune.schema import load_config

    cfg = load_config(None, [f"run_dir={tmp_path}", "data.format=beir", f"data.path={tiny_beir}",
                             "train.base_model=/nonexistent/model", "eval.reranker=some/cross-encoder",
                             "eval.rerank_on=[finetuned]"])
    with pytest.raises(ValueError, match="eval.rerank_on.*finetuned"):
        run(cfg)


def test_hybrid_needs_bm25():
    from embtune.config import ConfigError
    from embtune.schema import load_config

    # data.path is set: without it the first error is data.path's, whatever else is wrong.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", "eval.hybrid=[rrf]", "eval.compare_bm25=false"])
    assert err.value.key == "eval.hybrid" and "set eval.compare_bm25=true" in err.value.reason
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", "eval.sweep.indexes=[flat,lsh]"])
    assert err.value.key == "eval.sweep.indexes" and "unknown ['lsh']" in err.value.reason
    load_config(None, ["data.path=/x", "eval.hybrid=[rrf]", "eval.compare_bm25=true"])  # the valid neighbour
