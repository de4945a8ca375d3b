"""The length-grouped sampler: every row once per epoch, order fixed by seed + epoch, less padding, no duplicates."""

import random

import numpy as np
from datasets import Dataset

from embtune.train.batching import SeededBatchSampler, padded_tokens


def table(rows=300, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    return Dataset.from_dict({"query": [f"q{i} {text(3)}" for i in range(rows)],
                              "positive": [f"p{i} {text(rng.randint(5, 200))}" for i in range(rows)],
                              "negative_1": [f"n{i} {text(rng.randint(5, 200))}" for i in range(rows)]})


def test_each_row_once_and_seeded_by_epoch():
    data = table()
    sampler = SeededBatchSampler(data, batch_size=16, drop_last=False, seed=3, group_by_length=True)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(data)))
    assert len(epoch0) == len(sampler)
    again = SeededBatchSampler(data, batch_size=16, drop_last=False, seed=3, group_by_length=True)
    assert list(again) == epoch0  # a fresh sampler (a resumed run) replays the epoch
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_length_grouping_cuts_padding():
    data = table()
    lengths = np.array([len(p) + len(n) for p, n in zip(data["positive"], data["negative_1"])])
    plain = SeededBatchSampler(data, batch_size=16, drop_last=False, seed=0, group_by_length=False)
    grouped = SeededBatchSampler(data, batch_size=16, drop_last=False, seed=0, group_by_length=True)
    assert padded_tokens(list(grouped), lengths) < 0.75 * padded_tokens(list(plain), lengths)


def test_avoid_duplicates_keeps_texts_unique_within_a_batch():
    data = Dataset.from_dict({"query": [f"q{i % 7}" for i in range(70)], "positive": [f"p{i}" for i in range(70)]})
    sampler = SeededBatchSampler(data, batch_size=5, drop_last=False, seed=0, group_by_length=True,
                                 avoid_duplicates=True)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(70))
    for batch in batches:
        queries = [data[i]["query"] for i in batch]
        assert len(set(queries)) == len(queries)
    unchecked = SeededBatchSampler(data, batch_size=5, drop_last=False, seed=0, group_by_length=True)
    assert any(len({data[i]["query"] for i in b}) < len(b) for b in unchecked)  # the check is doing something
