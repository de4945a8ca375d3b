"""Text in any language and script: sentences, word counts, the corpus's script and language, and whether a model's
tokenizer can read it.

Stages need these before they pick a retriever: data_prep cuts pseudo-queries out of sentences and checks that the
base model can read the corpus; BM25 (``embtune.retrieval.bm25``) picks its tokenisation from the corpus's language
(``bm25.language: auto``). One copy lives here, in the core, so data_prep and eval read text the same way.

- :func:`split_sentences` ends a sentence at ``. ! ?`` followed by a space and anything but a lower-case letter
  (so it works for scripts without letter case: Arabic, Hebrew, CJK, Devanagari...), at the full stops that need no
  space (``。！？`` and their full-width forms, Arabic ``؟ ۔``, Devanagari ``। ॥``), at a line break, and between two
  Thai phrases (Thai puts spaces between phrases, not words). A maintained segmenter (pysbd, blingfire) needs the
  language up front or a model file; a rule that works without either is what the label-free path needs.
- :func:`count_words` counts a run of characters of an unsegmented script (Han, kana, Thai, Lao, Khmer, Myanmar)
  as one word per two characters (Chinese words average under two characters), and any other ``\\w+`` run as one.
- :func:`detect_language` names the corpus's BM25 language: ``cjk`` for unsegmented scripts (character bigrams),
  the PyStemmer language of a script that has one stemmer (Cyrillic: russian, Greek: greek, Arabic: arabic,
  Devanagari: hindi), and for Latin script the language whose function words are most frequent (english, german,
  french, spanish, italian, portuguese, dutch); ``none`` (no stemmer, no stop words) when nothing fits.
- :func:`tokenizer_fit` measures how a subword tokenizer reads the corpus: the share of its unknown token, and the
  share of word pieces that are single letters (a BERT vocabulary reads Cyrillic or Arabic letter by letter, with no
  unknown token, and cannot read it either).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Sequence

# Scripts written without spaces between words: a run of them is tokenised into character bigrams for BM25.
UNSEGMENTED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f"
_UNSEGMENTED_RUN = re.compile(f"[{UNSEGMENTED}]+")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD_RUN = re.compile(f"[^\\W{UNSEGMENTED}]+|[{UNSEGMENTED}]+")

_SENTENCE_END = re.compile(
    r"(?<=[.!?])\s+(?=[^\s])"  # Latin-style: a candidate; kept only when the next letter is not lower case
    r"|(?<=[。！？．])\s*"  # CJK full stops need no space after them
    r"|(?<=[؟۔।॥])\s*"  # Arabic and Devanagari
    r"|\s*\n\s*"  # a line break
    r"|(?<=[\u0e00-\u0e7f])\s+(?=[\u0e00-\u0e7f])"  # Thai: a space between phrases
)


_OPENING = "([{“‘«¿¡"  # a straight quote may open or close: not a sentence start


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones dropped (see the module docstring for the boundaries)."""
    text = text or ""
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() == match.start() == start or match.end() >= len(text):
            continue
        if text[match.start() - 1:match.start()] in ".!?" and "\n" not in match.group():
            following = text[match.end()]
            # "e.g. the": not a boundary in a cased script; '"stroma. " At': a closing quote is not a start either
            if following.islower() or not (following.isalnum() or following in _OPENING):
                continue
        out.append(text[start:match.start()])
        start = match.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def count_words(text: str) -> int:
    """Words of ``text``: ``\\w+`` runs, and for unsegmented scripts one word per two characters (rounded up)."""
    total = 0
    for run in _WORD_RUN.findall(text or ""):
        total += (len(run) + 1) // 2 if _UNSEGMENTED_RUN.fullmatch(run) else 1
    return total


def crop_words(text: str, low: int, high: int, rng) -> str:
    """A random run of ``low``..``high`` consecutive words of ``text`` (all of it when shorter); an unsegmented
    script's words are character pairs, so its runs are cut by characters."""
    if _UNSEGMENTED_RUN.search(text) and len(text.split()) <= 1:
        length = min(len(text), 2 * rng.randint(low, high))
        start = rng.randint(0, len(text) - length)
        return text[start:start + length]
    words = text.split()
    length = min(len(words), rng.randint(low, high))
    start = rng.randint(0, len(words) - length)
    return " ".join(words[start:start + length])


def script_of(char: str) -> str | None:
    """The script of one letter: ``latin``, ``cyrillic``, ``greek``, ``arabic``, ``hebrew``, ``devanagari``,
    ``cjk`` (Han, kana), ``hangul``, ``thai`` or ``other``; None for a non-letter."""
    if not char.isalpha():
        return None
    point = ord(char)
    if point < 0x250 or 0x1e00 <= point < 0x1f00:
        return "latin"
    for name, low, high in (("greek", 0x370, 0x400), ("cyrillic", 0x400, 0x530), ("hebrew", 0x590, 0x600),
                            ("arabic", 0x600, 0x780), ("devanagari", 0x900, 0x980), ("thai", 0xe00, 0xe80),
                            ("cjk", 0x3040, 0x3100), ("cjk", 0x3400, 0x4dc0), ("cjk", 0x4e00, 0xa000),
                            ("cjk", 0xf900, 0xfb00), ("hangul", 0xac00, 0xd7b0), ("greek", 0x1f00, 0x2000)):
        if low <= point < high:
            return name
    return "other"


def script_shares(texts: Iterable[str], max_chars: int = 300_000) -> dict[str, float]:
    """Share of each script among the letters of ``texts`` (at most ``max_chars`` characters are read)."""
    counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        for char in text:
            script = script_of(char)
            if script is not None:
                counts[script] += 1
        seen += len(text)
        if seen >= max_chars:
            break
    total = sum(counts.values())
    return {script: count / total for script, count in counts.most_common()} if total else {}


# Frequent function words (lower case) of the Latin-script languages PyStemmer stems; a corpus's language is the
# one whose words make up the largest share of its tokens.
FUNCTION_WORDS = {
    "english": "the of and to in is that for it with as was on are be by this an from or which not",
    "german": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an "
              "werden aus oder",
    "french": "le la les de des et en un une du est que pour dans par sur au qui pas ne ce il sont avec",
    "spanish": "el la los las de del y en que un una por con para es se no lo al como su",
    "italian": "il la di che e un una per in del della non con sono si da gli le al",
    "portuguese": "o a os as de do da e em um uma para com não que por se no na dos",
    "dutch": "de het een en van in is op te dat die niet met voor zijn er aan ook als",
}
_FUNCTION_SETS = {language: frozenset(words.split()) for language, words in FUNCTION_WORDS.items()}
# A script that PyStemmer stems with one language.
SCRIPT_LANGUAGE = {"cjk": "cjk", "thai": "cjk", "cyrillic": "russian", "greek": "greek", "arabic": "arabic",
                   "devanagari": "hindi"}
MIN_FUNCTION_SHARE = 0.05  # below this share of function words a Latin-script corpus gets no stemmer


def detect_language(texts: Sequence[str], max_chars: int = 300_000) -> dict[str, Any]:
    """The BM25 language of a corpus and the evidence: ``{"language", "script", "script_share", "function_word
    shares"}``. ``language`` is ``cjk``, a PyStemmer language, or ``none``."""
    shares = script_shares(texts, max_chars)
    if not shares:
        return {"language": "none", "script": None, "script_share": {}, "why": "no letters in the corpus"}
    script = next(iter(shares))
    out: dict[str, Any] = {"script": script, "script_share": {k: round(v, 4) for k, v in shares.items()}}
    if script != "latin":
        language = SCRIPT_LANGUAGE.get(script, "none")
        return {"language": language, **out, "why": f"{script} script"}
    counts: Counter[str] = Counter()
    tokens = 0
    seen = 0
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        tokens += len(words)
        for language, words_of in _FUNCTION_SETS.items():
            counts[language] += sum(word in words_of for word in words)
        seen += len(text)
        if seen >= max_chars:
            break
    function_share = {language: round(counts[language] / tokens, 4) if tokens else 0.0 for language in FUNCTION_WORDS}
    best = max(function_share, key=function_share.get)
    if function_share[best] < MIN_FUNCTION_SHARE:
        return {"language": "none", **out, "function_word_share": function_share,
                "why": f"Latin script, no language's function words reach {MIN_FUNCTION_SHARE:.0%} of tokens"}
    return {"language": best, **out, "function_word_share": function_share,
            "why": f"Latin script, {best} function words {function_share[best]:.0%} of tokens"}


def character_bigrams(run: str) -> list[str]:
    """Overlapping character pairs of an unsegmented run (one character alone is its own token), as Lucene's
    CJKAnalyzer tokenises Chinese and Japanese."""
    return [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]


def tokenize_with_bigrams(text: str) -> list[str]:
    """``\\w+`` tokens, with every run of an unsegmented script replaced by its character bigrams."""
    out: list[str] = []
    for run in _WORD_RUN.findall(text):
        out.extend(character_bigrams(run) if _UNSEGMENTED_RUN.fullmatch(run) else [run])
    return out


def tokenizer_fit(tokenizer, texts: Sequence[str], max_seq_length: int | None = None) -> dict[str, Any]:
    """How well a Hugging Face tokenizer reads ``texts``.

    Returns ``{"documents", "tokens", "unknown_token", "unknown_share", "single_letter_share",
    "tokens_per_document", "truncated_share", "max_seq_length"}``: the share of tokens that are the unknown token,
    and of word pieces that are one letter (``##`` stripped; what a vocabulary does with a script it does not know),
    and of documents longer than ``max_seq_length`` (+ 2 special tokens).
    """
    unk = tokenizer.unk_token_id
    total = unknown = single = letters = truncated = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        total += len(ids)
        unknown += sum(1 for i in ids if i == unk) if unk is not None else 0
        for piece in tokenizer.convert_ids_to_tokens(ids):
            piece = piece.removeprefix("##").lstrip("\u2581\u0120")  # WordPiece / SentencePiece / byte-BPE marks
            # A Han ideograph is a word piece of its own in every BERT vocabulary (even multilingual ones that
            # read Chinese): it does not count as a letter read alone.
            if piece and piece[0].isalpha() and not _HAN.match(piece):
                letters += 1
                single += len(piece) == 1
        if max_seq_length:
            truncated += len(ids) + 2 > max_seq_length
    return {"documents": len(texts), "tokens": total, "unknown_token": tokenizer.unk_token,
            "unknown_share": round(unknown / total, 4) if total else 0.0,
            "single_letter_share": round(single / letters, 4) if letters else 0.0,
            "tokens_per_document": round(total / len(texts), 1) if texts else 0.0,
            "truncated_share": round(truncated / len(texts), 4) if texts and max_seq_length else None,
            "max_seq_length": max_seq_length}


def reads_corpus(fit: dict[str, Any], max_unknown_share: float, max_single_letter_share: float
                 ) -> tuple[bool, str]:
    """Whether a tokenizer with this :func:`tokenizer_fit` can read the corpus, and why (one line)."""
    if fit["tokens"] == 0:
        return False, "the tokenizer produced no token on the corpus sample"
    if fit["unknown_share"] > max_unknown_share:
        return False, (f"{fit['unknown_share']:.0%} of its tokens on {fit['documents']} documents are "
                       f"{fit['unknown_token']} (more than {max_unknown_share:.0%}): its vocabulary does not cover "
                       "this script")
    if fit["single_letter_share"] > max_single_letter_share:
        return False, (f"{fit['single_letter_share']:.0%} of its word pieces on {fit['documents']} documents are "
                       f"single letters (more than {max_single_letter_share:.0%}): it reads this script letter by "
                       "letter")
    return True, (f"unknown tokens {fit['unknown_share']:.1%}, single-letter pieces {fit['single_letter_share']:.0%} "
                  f"on {fit['documents']} documents")
