"""A teacher you bring to label-free training (labelfree.teacher): a cross-encoder scores the fused teacher's
candidates, alone or fused with it, offline with a tiny cross-encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_labelfree import recipe, sentence_corpus
from tests.test_teacher_distill import tiny_cross_encoder_dir  # noqa: F401  (a fixture)


def data_prep_table(cfg):
    """(train table, document texts by row, data_prep's manifest) of a label-free data_prep run."""
    from datasets import load_from_disk

    from embtune.data_prep.run import run as run_data_prep

    outputs = run_data_prep(cfg)
    manifest = json.loads((Path(cfg.run_dir) / "data_prep" / "manifest.json").read_text())
    texts = json.loads((Path(outputs["corpus_embeddings"]).parent / "doc_texts.json").read_text())
    return load_from_disk(outputs["train_table"]), texts, manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_a_cross_encoder_teacher_labels_the_candidates_alone_or_fused(tmp_path, tiny_model_dir,
                                                                       tiny_cross_encoder_dir, cache):  # noqa: F811
    import torch
    from sentence_transformers import CrossEncoder

    corpus_dir = sentence_corpus(tmp_path / "corpus")
    fusion, texts, _ = data_prep_table(recipe(tmp_path / "fusion", corpus_dir, tiny_model_dir))
    teacher = [f"labelfree.teacher={tiny_cross_encoder_dir}", "labelfree.teacher_max_length=64"]
    alone, _, manifest = data_prep_table(recipe(tmp_path / "alone", corpus_dir, tiny_model_dir, *teacher))
    assert manifest["teacher"]["cross_encoder"] == str(tiny_cross_encoder_dir)
    assert alone["query"] == fusion["query"]  # the same pseudo-queries

    cross = CrossEncoder(str(tiny_cross_encoder_dir), max_length=64, device="cpu")
    changed = 0
    for row, fused_row in zip(alone, fusion):
        # candidates come from the fusion's top depth + 1 (one may be the dropped source)
        assert len(set(row["candidates"]) - set(fused_row["candidates"])) <= 1
        scores = cross.predict([(row["query"], texts[c]) for c in row["candidates"]],
                               activation_fn=torch.nn.Identity())  # (depth,)
        assert list(scores) == sorted(scores, reverse=True)  # the cross-encoder's order
        expected = (scores - scores.min()) / (scores.max() - scores.min())
        np.testing.assert_allclose(row["teacher_scores"], expected, atol=1e-4)
        changed += row["candidates"] != fused_row["candidates"]
    assert changed > 0  # the brought teacher ranks otherwise than the fusion

    # weight 0: the fusion alone, through the same path: the default table again
    zero, _, _ = data_prep_table(recipe(tmp_path / "zero", corpus_dir, tiny_model_dir, *teacher,
                                        "labelfree.teacher_weight=0"))
    assert zero["candidates"] == fusion["candidates"]
    np.testing.assert_allclose(np.array(zero["teacher_scores"]), np.array(fusion["teacher_scores"]), atol=1e-5)
