"""scripts/bench_serve_load.py: every level is driven with texts of the same cost, and its ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"word{letter}{n}" for letter in "abcdefgh" for n in range(50)]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_serve_load

    yield bench_serve_load
    sys.modules.pop("bench_serve_load", None)
    sys.modules.pop("benchlib", None)


def test_levels_get_the_same_tags_and_different_words(bench):
    """A forward pass costs about its tokens: two levels' texts differ only in their random words (drawn alike),
    never in a tag whose length grows with the level or with the request's number."""
    low, high = (bench.queries(1200, WORDS, level, "q") for level in (32, 1000))
    tags = [text.rsplit(" ", 1)[1] for text in low]
    assert tags == [text.rsplit(" ", 1)[1] for text in high]
    assert len({len(tag) for tag in tags}) == 1  # q000000 ... q001199: one width
    assert not set(low) & set(high)  # no cache answers a level's text with another level's
    assert len(set(low)) == len(low)


def _level(in_flight: int, goodput: float, cpu_ms: float) -> dict:
    return {"server": "embtune", "backend": "onnx-int8", "in_flight": in_flight, "goodput_per_s": goodput,
            "server_cpu_ms_per_200": cpu_ms}


def test_overload_ratio_by_goodput_and_by_cpu(bench):
    levels = [_level(1, 400.0, 2.0), _level(32, 500.0, 2.0), _level(1000, 350.0, 2.5),
              {**_level(1000, 10.0, 9.0), "backend": "torch"}]
    assert bench.overload_ratio(levels, "onnx-int8") == {"goodput_1000_over_32": 0.7, "by_cpu_per_200": 0.8}
    assert bench.overload_ratio(levels[:1], "onnx-int8") == {"goodput_1000_over_32": None, "by_cpu_per_200": None}
