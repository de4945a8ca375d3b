"""Issue 32: the label-free student trained through the fused score (``labelfree.positives: cut``,
``train.loss: query_fused``). The loss must score each candidate exactly as the deployed fusion does, and BM25's
score of a passage outside the index must be the score that passage gets inside one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_labelfree import recipe, sentence_corpus


def test_fused_scores_are_the_deployed_fusion():
    """QueryFusedLoss's logits equal ``weighted_fuse`` (corpus z-scores, the core's formula) on the same scores:
    the student's cosines over the whole index for the dense member, BM25 z-scores given."""
    from embtune.retrieval.fusion import MemberRun, ScoreStats, weighted_fuse
    from embtune.train.losses import QueryFusedLoss, split_rows

    rng = np.random.default_rng(0)
    docs = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(50, 8)), dtype=torch.float32), dim=-1)
    positives = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(3, 8)), dtype=torch.float32), dim=-1)
    query = torch.tensor(rng.normal(size=(1, 8)), dtype=torch.float32)
    bm25 = rng.gamma(2.0, size=50)  # the query's BM25 scores over the corpus
    rows = [4, 17, 30]
    z = (bm25 - bm25.mean()) / bm25.std()
    cosine = (torch.nn.functional.normalize(query, dim=-1) @ docs.T)[0].double().numpy()  # (50,)
    # the base model's statistics of this query, here made up (the student's own are cosine.mean(), cosine.std())
    base_mean, base_std = 0.1, 0.25
    labels = torch.tensor([[*split_rows([2]), *split_rows(rows), *z[rows], 0.5, base_mean, base_std]],
                          dtype=torch.float32)
    loss = QueryFusedLoss(None, docs, positives, dense_weight=0.7, stats="student")
    fused = loss.fused_scores([query], labels)[0].double().numpy()  # (1 + 3,)
    with_base = QueryFusedLoss(None, docs, positives, dense_weight=0.7)
    fixed = with_base.fused_scores([query], labels)[0].double().numpy()
    assert fixed[1:] == pytest.approx(0.7 * (cosine[rows] - base_mean) / base_std + 0.3 * z[rows], abs=1e-4)

    ids = [str(i) for i in range(50)]
    dense = MemberRun({"q": dict(zip(ids, cosine.tolist()))}, {"q": ScoreStats.of(cosine)})
    sparse = MemberRun({"q": dict(zip(ids, bm25.tolist()))}, {"q": ScoreStats.of(bm25)})
    reference = weighted_fuse(dense, sparse, 0.7, depth=50)["q"]
    assert fused[1:] == pytest.approx([reference[str(r)] for r in rows], abs=1e-4)
    # the positive (outside the index): the same formula with its own cosine and the given BM25 z-score
    cos_positive = float(torch.nn.functional.normalize(query, dim=-1)[0] @ positives[2])
    expected = 0.7 * (cos_positive - cosine.mean()) / cosine.std() + 0.3 * 0.5
    assert fused[0] == pytest.approx(expected, abs=1e-4)


def test_fused_loss_gradient_is_small_where_bm25_already_ranks_the_positive_first():
    """BM25's share is a constant of the loss: with BM25 far in favour of the positive the student has little to
    learn; with BM25 in favour of a wrong candidate (its confident mistake) the same query has much more."""
    from embtune.train.losses import QueryFusedLoss, split_rows

    docs = torch.eye(4)
    positives = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), dim=-1)
    loss = QueryFusedLoss(None, docs, positives, dense_weight=0.5)
    norms = []
    for bm25_positive, bm25_wrong in ((6.0, 0.0), (0.0, 6.0)):
        query = torch.tensor([[1.0, 0.2, 0.1, 0.3]], requires_grad=True)
        labels = torch.tensor([[*split_rows([0]), *split_rows([2, 3]), bm25_wrong, 0.0, bm25_positive, 0.0, 1.0]])
        loss.compute_loss_from_embeddings([query], labels).backward()
        norms.append(float(query.grad.norm()))
    assert norms[0] < 0.1 * norms[1]


def test_score_outside_the_index_equals_the_score_inside():
    from embtune.retrieval.bm25 import FastBM25

    corpus = [["cell", "growth", "cell"], ["tumor", "suppressor", "gene", "cell"], ["protein", "folding"],
              ["gene", "gene", "expression", "tumor"]]
    index = FastBM25(corpus)
    for query in (["gene", "tumor"], ["cell", "cell", "protein"], ["absent"]):
        scores = index.get_scores(query)
        for i, document in enumerate(corpus):
            assert index.score_outside(query, document) == pytest.approx(scores[i], rel=1e-12, abs=1e-12)


@pytest.mark.slow
def test_fused_student_trains_from_cut_positives(tmp_path, tiny_model_dir):
    """labelfree.positives: cut writes each query's cut passage embedding and BM25 z-scores; query_fused trains."""
    from datasets import load_from_disk
    from sentence_transformers import SentenceTransformer

    from embtune.data_prep.labelfree import PseudoQuery, cut_passage
    from embtune.data_prep.run import run as run_data_prep
    from embtune.train.recipe import run as run_train

    corpus_dir = sentence_corpus(tmp_path / "c")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = recipe(tmp_path, corpus_dir, model_dir, "labelfree.positives=cut", "train.loss=query_fused")
    outputs = run_data_prep(cfg)
    table = load_from_disk(outputs["train_table"])
    positives = np.load(Path(outputs["corpus_embeddings"]).parent / "positive_embeddings.npy")
    assert positives.shape[0] == len(table) and table["positive_row"] == list(range(len(table)))
    row = table[0]
    assert len(row["bm25_z"]) == len(row["candidates"])
    corpus = {d["_id"]: d for d in map(json.loads, (corpus_dir / "corpus.jsonl").read_text().splitlines())}
    cut = cut_passage(corpus[row["source_id"]], PseudoQuery(row["query"], row["source_id"], row["kind"]), True)
    assert row["query"] not in cut and len(cut) < len(corpus[row["source_id"]]["text"]) + 40
    run_train(cfg)
    model_path = tmp_path / "run" / "train" / "model"
    base, trained = (SentenceTransformer(str(p), device="cpu") for p in (model_dir, model_path))
    queries = table["query"][:5]
    assert not np.allclose(base.encode(queries, prompt_name=None), trained.encode_query(queries), atol=1e-4)
    # query_fused_stats: base reads the base model's statistics of each query's cosines over the corpus
    corpus_emb = np.load(outputs["corpus_embeddings"])
    cosines = corpus_emb @ base.encode(queries, prompt_name=None, normalize_embeddings=True).T  # (n_docs, 5)
    assert table["base_cosine_mean"][:5] == pytest.approx(cosines.mean(0).tolist(), abs=1e-4)
    assert table["base_cosine_std"][:5] == pytest.approx(cosines.std(0).tolist(), abs=1e-4)


def test_cut_positives_need_the_source_dropped(tmp_path):
    from embtune.config import ConfigError
    from embtune.schema import load_config

    corpus_dir = sentence_corpus(tmp_path / "c")
    with pytest.raises(ConfigError, match="labelfree.positives"):
        load_config(None, [f"run_dir={tmp_path}", f"data.path={corpus_dir}", "labelfree.positives=cut",
                           "labelfree.source=keep"])


def own_words_reply(messages: list[dict]) -> str:
    """One query per passage: for titled passages of an even index its title and first sentence's words (the
    teacher finds the passage), else words of a topic it is not about (the teacher does not)."""
    from tests.test_labelfree import TOPICS

    passage = messages[-1]["content"].split("Passage:\n", 1)[1].split("\n\n", 1)[0]
    topic, number = passage.split()[0], len(passage)
    if number % 2 == 0:
        return " ".join(passage.split()[:9])
    other = next(t for t in TOPICS if t != topic)
    return f"{other} {' '.join(TOPICS[other].split()[:5])}"


def test_llm_queries_come_through_the_client_and_the_teachers_round_trip(tmp_path, tiny_model_dir):
    """labelfree.query_source: llm asks the LLM about each sampled passage outside the probe, keeps a query only
    when the teacher ranks its passage in its top round_trip_k, and keeps the passage among its candidates (it
    is the answer, not a verbatim copy); with positives: cut the whole passage is the positive."""
    from datasets import load_from_disk

    from embtune.data_prep.run import run as run_data_prep
    from tests.fake_openai_server import FakeOpenAIServer

    corpus_dir = sentence_corpus(tmp_path / "c")
    with FakeOpenAIServer(reply=own_words_reply) as server:
        common = ["labelfree.query_source=llm", "labelfree.round_trip_k=3", f"llm.endpoint={server.base_url}",
                  "llm.model=fake", "llm.progress=false", "llm.documents=24", "llm.n_queries=1",
                  "llm.copy_ngram=20"]  # the findable queries copy their passage's first words
        cfg = recipe(tmp_path, corpus_dir, tiny_model_dir, *common)
        outputs = run_data_prep(cfg)
        assert server.requests == 24
        report = json.loads(Path(outputs["labelfree_report"]).read_text())
        probe = set(json.loads((tmp_path / "run" / "data_prep" / "labelfree" / "probe.json").read_text())["targets"])
        table = load_from_disk(outputs["train_table"])
        trip = report["llm_round_trip"]
        assert trip["written"] == report["llm"]["queries"] and 0 < trip["kept"] < trip["written"]
        assert len(table) == trip["kept"] and set(table["kind"]) == {"llm"}
        assert not set(table["source_id"]) & probe
        for row in table:
            assert row["source_row"] in row["candidates"][:3]

        cut = recipe(tmp_path / "cut", corpus_dir, tiny_model_dir, *common, "labelfree.positives=cut")
        outputs = run_data_prep(cut)
        table = load_from_disk(outputs["train_table"])
    folder = Path(outputs["corpus_embeddings"]).parent
    corpus_emb, positives = np.load(folder / "corpus_embeddings.npy"), np.load(folder / "positive_embeddings.npy")
    for i, row in enumerate(table):
        assert row["source_row"] not in row["candidates"]
        np.testing.assert_allclose(positives[i], corpus_emb[row["source_row"]], atol=1e-5)
