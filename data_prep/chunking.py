"""Split long documents into overlapping token windows, cut at the tokenizer's character offsets."""

from __future__ import annotations

from typing import Any


def chunk_text(text: str, tokenizer: Any, max_tokens: int, overlap: int) -> list[str]:
    """Windows of at most ``max_tokens`` tokens, each starting ``max_tokens - overlap`` tokens after the last.

    Cutting the original string at token offsets (not decoding tokens) keeps the text exactly as written.
    """
    if max_tokens <= 0:
        return [text]
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} with max_tokens={max_tokens}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= max_tokens:
        return [text]
    stride = max_tokens - overlap
    chunks = []
    for start in range(0, len(offsets), stride):
        window = offsets[start : start + max_tokens]
        chunks.append(text[window[0][0] : window[-1][1]])
        if start + max_tokens >= len(offsets):
            break
    return chunks


def chunk_corpus(
    corpus: dict[str, dict[str, str]], tokenizer: Any, max_tokens: int, overlap: int
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Chunk every document's text; chunk ids are ``<doc id>#<n>`` and keep the title.

    Returns the chunked corpus and a map from chunk id to parent document id. A document that fits is kept
    under its own id.
    """
    chunked: dict[str, dict[str, str]] = {}
    parent: dict[str, str] = {}
    for doc_id, doc in corpus.items():
        pieces = chunk_text(doc["text"], tokenizer, max_tokens, overlap)
        if len(pieces) == 1:
            chunked[doc_id] = doc
            parent[doc_id] = doc_id
            continue
        for n, piece in enumerate(pieces):
            chunk_id = f"{doc_id}#{n}"
            chunked[chunk_id] = {"title": doc.get("title", ""), "text": piece}
            parent[chunk_id] = doc_id
    return chunked, parent
