"""serve under concurrency: the bundle's token counting and encoding run on different threads at once (the event
loop counts tokens to validate a request while the micro-batcher's thread encodes a batch), and neither may see
the other's tokenizer settings."""

from __future__ import annotations

import random
import sys
import threading

import numpy as np
import pytest

from embtune.serve.bundle import build_bundle, load_bundle
from tests.conftest import FILLER, TOPICS

WORDS = sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER))


def _texts(rng: random.Random, n: int) -> list[str]:
    """``n`` texts of 1 to 40 words: a batch of them pads to its longest, a count must not."""
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.slow
def test_counting_tokens_while_encoding_on_another_thread(tiny_model_dir, tmp_path):
    bundle = load_bundle(build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu"), device="cpu")
    rng = random.Random(0)
    count_batches = [_texts(rng, rng.randint(1, 4)) for _ in range(2000)]
    encode_batches = [_texts(rng, rng.randint(2, 8)) for _ in range(500)]
    # Single-threaded reference: what each count and each vector must be.
    expected_counts = [bundle.count_tokens(texts) for texts in count_batches]
    probe = encode_batches[0]
    expected_probe = bundle.encode(probe)  # (len(probe), dim)

    errors: list[BaseException] = []
    counts: list[list[int]] = []
    vectors: list[np.ndarray] = []
    start = threading.Barrier(2)

    encoding_done = threading.Event()

    def count_loop() -> None:
        start.wait()
        try:
            counts.extend(bundle.count_tokens(texts) for texts in count_batches)
            while not encoding_done.is_set():  # keep counting while the other thread still encodes
                assert bundle.count_tokens(count_batches[0]) == expected_counts[0]
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    def encode_loop() -> None:
        start.wait()
        try:
            for i, texts in enumerate(encode_batches):
                rows = bundle.encode(texts)  # (len(texts), dim)
                if i % 50 == 0:
                    vectors.append(bundle.encode(probe))
                assert rows.shape[0] == len(texts)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
        finally:
            encoding_done.set()

    threads = [threading.Thread(target=count_loop), threading.Thread(target=encode_loop)]
    # Switch threads far more often than the default 5 ms, so the two interleave inside tokenizer calls.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    assert counts == expected_counts  # no count was cut to the encoder's max_seq_length
    for rows in vectors:
        np.testing.assert_allclose(rows, expected_probe, atol=1e-5)  # no batch padded or cut by the counter's settings
