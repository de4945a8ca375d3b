import pytest
from transformers import AutoTokenizer

from embtune.data_prep.chunking import chunk_corpus, chunk_text


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_windows_have_bounded_length_and_overlap(tokenizer):
    words = [f"w{i % 60}" for i in range(100)]
    text = " ".join(words)
    chunks = chunk_text(text, tokenizer, max_tokens=30, overlap=10)
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert all(n <= 30 for n in lengths)
    assert len(chunks) == 5  # starts at tokens 0, 20, 40, 60, 80
    # consecutive windows share exactly `overlap` words, and the text is cut from the original string
    for a, b in zip(chunks, chunks[1:]):
        assert a.split()[-10:] == b.split()[:10]
        assert a in text and b in text
    assert chunks[0].split()[0] == "w0" and chunks[-1].split()[-1] == words[-1]


def test_short_text_is_one_chunk(tokenizer):
    assert chunk_text("star planet", tokenizer, max_tokens=30, overlap=5) == ["star planet"]


def test_bad_overlap_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a b c", tokenizer, max_tokens=4, overlap=4)


def test_corpus_chunk_ids_map_to_parents(tokenizer):
    corpus = {"long": {"title": "T", "text": " ".join(["star"] * 50)}, "short": {"title": "", "text": "moon"}}
    chunks, parent = chunk_corpus(corpus, tokenizer, max_tokens=20, overlap=5)
    assert parent["short"] == "short" and chunks["short"] == corpus["short"]
    long_chunks = [c for c in chunks if parent[c] == "long"]
    assert long_chunks == ["long#0", "long#1", "long#2"] and all(chunks[c]["title"] == "T" for c in long_chunks)
