"""GradCache (CachedMultipleNegativesRankingLoss) gives plain MNRL's loss and gradients, with and without Matryoshka."""

import copy
from types import SimpleNamespace

import pytest
from sentence_transformers import SentenceTransformer

from embtune.train.losses import build_loss

QUERIES = ["star planet orbit", "oven flour butter", "patient dose vaccine", "market stock bond",
           "guitar melody chord", "team goal match", "comet nebula moon", "bake dough salt"]
POSITIVES = ["the star and the planet in orbit with a telescope", "flour and butter in the oven for the dough",
             "a patient dose of vaccine in a clinical trial", "the market for stock and bond is up",
             "a guitar melody with a chord and rhythm", "the team scored a goal in the match",
             "a comet near the nebula and the moon", "bake the dough with salt in a pan"]
NEGATIVES = POSITIVES[1:] + POSITIVES[:1]


def tcfg(**overrides):
    base = dict(loss="mnrl", mnrl_scale=20.0, mini_batch_size=3, gather_across_devices=True, matryoshka_dims=[],
                triplet_margin=5.0)
    return SimpleNamespace(**{**base, **overrides})


def loss_and_grads(model, cfg):
    model.eval()  # dropout off: both losses must see the same function
    model.zero_grad()
    loss = build_loss(model, cfg)
    features = [model.tokenize(texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    value = loss(features, None)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), grads


@pytest.mark.parametrize("dims", [[], [32, 16]])
def test_cached_mnrl_equals_mnrl(tiny_model_dir, dims):
    base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    plain_loss, plain = loss_and_grads(copy.deepcopy(base), tcfg(matryoshka_dims=dims))
    cached_loss, cached = loss_and_grads(copy.deepcopy(base), tcfg(loss="cached_mnrl", matryoshka_dims=dims))
    assert plain_loss == pytest.approx(cached_loss, rel=1e-5)
    assert plain.keys() == cached.keys() and len(plain) > 10
    worst = max(float((plain[n] - cached[n]).abs().max()) for n in plain)
    scale = max(float(g.abs().max()) for g in plain.values())
    assert scale > 1e-4  # the gradients are not trivially zero
    assert worst <= 1e-5 * max(1.0, scale), worst


def test_cached_mnrl_uses_mini_batches(tiny_model_dir):
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    loss = build_loss(model, tcfg(loss="cached_mnrl", mini_batch_size=3))
    assert type(loss).__name__ == "CachedMultipleNegativesRankingLoss" and loss.mini_batch_size == 3
    wrapped = build_loss(model, tcfg(loss="cached_mnrl", matryoshka_dims=[32, 16]))
    assert type(wrapped).__name__ == "MatryoshkaLoss" and list(wrapped.matryoshka_dims) == [32, 16]


def test_the_loss_sees_every_mined_negative():
    """One negatives count (mining.num_negatives): train reads every negative column the table has."""
    from embtune.schema import load_config
    from embtune.train.losses import training_columns

    columns = ["query", "positive", "negative_1", "negative_2", "negative_1_id", "negative_2_id"]
    train = load_config(None, ["data.path=/x"]).train
    assert training_columns(train, columns) == ["query", "positive", "negative_1", "negative_2"]
    assert training_columns(train, ["query", "positive"]) == ["query", "positive"]  # pairs only
    distill = load_config(None, ["data.path=/x", "train.loss=distill_kl"]).train
    with pytest.raises(ValueError, match="mining.num_negatives >= 1"):
        training_columns(distill, ["query", "positive"])
