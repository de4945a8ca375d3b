"""The inverse-cloze probe's lexical check: a gain that BM25 shows only on probe queries it matches word for word
must not move the label-free teacher or the shipped retriever off the dense model (issue 28, item 6)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from embtune.retrieval.bm25 import BM25Config
from embtune.retrieval.probe import ClozeProbe
from embtune.retrieval.spec import BM25Index

# Two probe queries whose every term is in their passage (BM25 finds them verbatim) and two sharing none.
LEXICAL = {"d0": ("alpha beta gamma", "alpha beta gamma delta epsilon"),
           "d1": ("zeta theta iota", "zeta theta iota kappa lambda")}
SEMANTIC = {"d2": ("omega sigma", "tau upsilon phi chi psi"),
            "d3": ("rho pi", "nu xi omicron mu eta")}


def toy_probe() -> ClozeProbe:
    items = {**LEXICAL, **SEMANTIC}
    return ClozeProbe(queries=[q for q, _ in items.values()], targets=list(items), kinds=["sentence"] * len(items),
                      cut_texts={d: text for d, (_, text) in items.items()})


def test_least_lexical_keeps_the_queries_sharing_the_fewest_terms_with_their_passage():
    # (issue 28: the probe's queries were all judged alike, the verbatim ones included)
    probe = toy_probe()
    tokenize = BM25Index(list(probe.cut_texts.values()), BM25Config()).tokenizer
    assert probe.lexical_overlap(tokenize) == [1.0, 1.0, 0.0, 0.0]
    assert probe.least_lexical(tokenize) == [2, 3]
    run = {"0": {"d0": 1.0}, "1": {"x": 1.0, "d1": 0.5}, "2": {"d2": 1.0}, "3": {}}
    assert probe.mrr(run) == 62.5 and probe.mrr(run, only=[2, 3]) == 50.0 and probe.mrr(run, only=[1]) == 50.0


class Noise:  # any text to a fixed random unit vector (the stub runs below decide the ranks)
    similarity_fn_name = "cosine"

    def encode(self, batch, **kwargs):
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in batch])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class StubTeacher:
    """What ``probe_teacher`` reads of a ``FusedTeacher``, with member runs set by the test: the dense model ranks
    each target second; BM25 ranks the lexical queries' targets first and the others' below two distractors (or
    first too, with ``bm25_finds_all``)."""

    def __init__(self, bm25_finds_all: bool) -> None:
        self.doc_ids = [*LEXICAL, *SEMANTIC, "x", "y"]
        self.model, self.batch_size = Noise(), 8
        self.doc_emb = self.model.encode(self.doc_ids).astype(np.float32)
        self.bm25_finds_all = bm25_finds_all

    def index(self, texts):
        return BM25Index(texts, BM25Config())

    def runs(self, queries, depth, doc_emb=None, bm25=None):
        targets = [*LEXICAL, *SEMANTIC]
        dense = {str(i): {t: 0.5, "x": 0.6} for i, t in enumerate(targets)}
        sparse = {}
        for i, t in enumerate(targets):
            lexical = t in LEXICAL or self.bm25_finds_all
            sparse[str(i)] = {t: 1.0} if lexical else {"x": 1.0, "y": 0.9}
        return dense, sparse, None


def plain_fuse(dense, sparse, w, depth):
    """``w * dense + (1 - w) * sparse`` over the union (0 where a run lacks a document): the stub's scores are on
    one scale already."""
    return {q: {d: w * dense[q].get(d, 0.0) + (1 - w) * sparse[q].get(d, 0.0) for d in {*dense[q], *sparse[q]}}
            for q in dense}


@pytest.mark.parametrize("bm25_finds_all", [False, True])
def test_a_fusion_gaining_on_verbatim_queries_alone_does_not_move_the_teacher_off_the_dense_model(
        monkeypatch, bm25_finds_all):
    from embtune.data_prep import labelfree

    monkeypatch.setattr(labelfree, "weighted_fuse", plain_fuse)
    texts = [toy_probe().cut_texts.get(d, d) for d in StubTeacher(bm25_finds_all).doc_ids]
    probe = labelfree.probe_teacher(StubTeacher(bm25_finds_all), toy_probe(), texts, [0.0, 0.5, 1.0])
    # On the whole probe the fusion at 0.5 beats the dense model alone either way
    assert probe["fused_by_dense_weight"]["0.5"] > probe["dense_alone"]
    if bm25_finds_all:  # the gain holds on the queries sharing no term with their passage: BM25 joins the teacher
        assert probe["choice"] < 1.0 and probe["lexical_check"]["choice"] == "kept"
    else:  # verbatim overlap alone: the teacher stays the dense model, and the report says why
        assert probe["choice"] == 1.0 and probe["choice_mrr"] == probe["dense_alone"]
        assert probe["lexical_check"]["best_on_probe"] == 0.5
        assert "lexical overlap alone" in probe["lexical_check"]["why"]
        assert labelfree.decide(True, "reads", probe, min_headroom=5.0)["decision"] == "base"


def test_bm25_alone_ships_over_the_base_only_when_it_beats_it_on_the_least_lexical_queries():
    from embtune.eval.deploy import choose_on_evidence, lexically_checked

    mrr = {"base": 50.0, "bm25": 60.0, "base+bm25_weighted": 50.0}
    verbatim = {"queries": 300, "mrr@10": {"base": 40.0, "bm25": 20.0, "base+bm25_weighted": 40.0}}
    assert choose_on_evidence(lexically_checked(mrr, verbatim), 1.0)[0] == "base"
    throughout = {"queries": 300, "mrr@10": {"base": 40.0, "bm25": 45.0, "base+bm25_weighted": 40.0}}
    assert choose_on_evidence(lexically_checked(mrr, throughout), 1.0)[0] == "bm25"


def test_lexical_check_says_which_way_it_went():
    from embtune.retrieval.probe import lexical_check

    assert lexical_check(41.0, 40.0, 300)["passes"] is True
    failed = lexical_check(40.0, 40.0, 300)
    assert failed["passes"] is False and "300 probe queries" in failed["why"]
