"""Exact, fast BM25Okapi: rank-bm25's scores from a scipy sparse matrix.

rank-bm25 (the reference for hard-negative mining) scores one query by looping in Python over every document for
every query token, so its time grows with the corpus (benchmarks/results/bm25_speed.json). bm25s is fast but
scores with other idf variants (none has BM25Okapi's ``epsilon * average_idf`` floor), so it cannot reproduce
rank-bm25's ranking. ``FastBM25`` precomputes rank-bm25's per-(document, term) contribution once, as a sparse
``(vocab, docs)`` matrix, and scores a batch of queries with one sparse product.

Exactness, term by term against ``rank_bm25.BM25Okapi.get_scores`` (0.2.2):

- ``idf = log(N - df + 0.5) - log(df + 0.5)``; ``average_idf`` is the mean over the whole vocabulary *before*
  flooring; every term with ``idf < 0`` gets ``epsilon * average_idf`` (a term with ``idf == 0`` keeps 0).
- document length is the number of tokens (repeats included), ``avgdl = total tokens / N``.
- a query token counts once per occurrence (a repeated query token adds its contribution again); tokens not in
  the corpus add 0; an empty query scores 0 everywhere.
- all arithmetic is float64, in the same operation order per term, so only the order of the final sum over
  query terms differs (differences ~1e-15).

Rankings use one deterministic order everywhere, :func:`rank_order`: score descending, then document index
ascending, so documents that tie (including all zero-score documents) come in corpus order.

Example::

    tokenizer = BM25Tokenizer(token_pattern=r"\\w+", stopwords="english", stemmer="english")
    index = FastBM25(tokenizer.tokenize_many(texts))
    scores, indices = index.search(tokenizer.tokenize_many(queries), k=100)  # (n_queries, 100) each
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import scipy.sparse as sp

# Upper bound on the posting entries (sum of document frequencies of the query terms) one batch of queries may
# touch; the sparse product holds at most this many scores, so ~16.8M * 12 bytes = 200 MB per batch.
MAX_BATCH_POSTINGS = 1 << 24
# Scores equal to this many decimals are ties (see rank_order).
TIE_DECIMALS = 9


@dataclass
class BM25Tokenizer:
    """Turns text into BM25 tokens: lowercase → split → drop stopwords → stem, in that order.

    The default (``lowercase=True``, no pattern, no stopwords, no stemmer) is ``text.lower().split()``, the
    tokenization rank-bm25's users usually pass to ``BM25Okapi``. Punctuation stays attached to words
    (``"cells."`` != ``"cells"``); for retrieval quality use ``token_pattern=r"\\w+"`` with ``stopwords="english"``
    and ``stemmer="english"``.

    Args:
        lowercase: lowercase the text before splitting.
        token_pattern: a regex; tokens are its ``findall`` matches. ``None`` splits on whitespace.
        stopwords: ``None``, ``"english"`` (bm25s' ``STOPWORDS_EN``, Lucene's 33-word English list), or your
            own list. Compared after lowercasing and before stemming.
        stemmer: ``None`` or a PyStemmer (Snowball) language name such as ``"english"``.
    """

    lowercase: bool = True
    token_pattern: str | None = None
    stopwords: None | Literal["english"] | Sequence[str] = None
    stemmer: str | None = None
    # Runs of an unsegmented script (Chinese, Japanese, Thai...) become overlapping character bigrams
    # (embtune.retrieval.language.tokenize_with_bigrams); other words are \w+ tokens. token_pattern is then unused.
    bigrams: bool = False
    _regex: re.Pattern | None = field(init=False, repr=False, default=None)
    _stopword_set: frozenset[str] = field(init=False, repr=False, default=frozenset())
    _stemmer: object = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.token_pattern is not None:
            self._regex = re.compile(self.token_pattern)
        if isinstance(self.stopwords, str):
            if self.stopwords != "english":
                raise ValueError(f"BM25Tokenizer.stopwords: expected None, 'english' or a list of words, "
                                 f"got {self.stopwords!r}")
            from bm25s.stopwords import STOPWORDS_EN

            self._stopword_set = frozenset(STOPWORDS_EN)
        elif self.stopwords is not None:
            self._stopword_set = frozenset(self.stopwords)
        if self.stemmer is not None:
            import Stemmer  # PyStemmer

            try:
                self._stemmer = Stemmer.Stemmer(self.stemmer)
            except KeyError as error:
                raise ValueError(f"BM25Tokenizer.stemmer: unknown PyStemmer language {self.stemmer!r}; "
                                 f"available: {Stemmer.algorithms()}") from error

    def __call__(self, text: str) -> list[str]:
        """Tokens of one text."""
        if self.lowercase:
            text = text.lower()
        if self.bigrams:
            from embtune.retrieval.language import tokenize_with_bigrams

            tokens = tokenize_with_bigrams(text)
        else:
            tokens = self._regex.findall(text) if self._regex is not None else text.split()
        if self._stopword_set:
            tokens = [token for token in tokens if token not in self._stopword_set]
        if self._stemmer is not None:
            tokens = self._stemmer.stemWords(tokens)
        return tokens

    def tokenize_many(self, texts: Iterable[str]) -> Iterable[list[str]]:
        """Tokens of each text, lazily (a generator), so a large corpus need not be held as token lists."""
        return (self(text) for text in texts)

    def describe(self) -> dict:
        """The settings, for benchmark and manifest files."""
        stopwords = self.stopwords if self.stopwords is None or isinstance(self.stopwords, str) else "custom"
        return {"lowercase": self.lowercase, "token_pattern": self.token_pattern, "stopwords": stopwords,
                "stemmer": self.stemmer, "bigrams": self.bigrams}


def rank_order(scores: np.ndarray, doc_indices: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top ``k`` of ``scores`` ordered by score descending, then doc index ascending.

    Scores are compared rounded to ``TIE_DECIMALS`` decimals: summing the same terms in another order changes
    a float64 score by ~1e-15, which must not reorder documents whose scores are mathematically equal.
    ``np.argpartition`` finds the k-th largest; every candidate at or above it (so all ties at the cut) is then
    sorted, which makes the result independent of argpartition's internal order.
    """
    k = min(k, scores.shape[0])
    if k == 0:
        return np.empty(0, dtype=np.int64)
    rounded = np.round(scores, TIE_DECIMALS)
    if k < scores.shape[0]:
        kth_score = rounded[np.argpartition(-rounded, k - 1)[k - 1]]
        candidates = np.flatnonzero(rounded >= kth_score)
    else:
        candidates = np.arange(scores.shape[0])
    # lexsort sorts by the last key first: score descending, then doc index ascending.
    order = np.lexsort((doc_indices[candidates], -rounded[candidates]))
    return candidates[order[:k]]


class FastBM25:
    """BM25Okapi (rank-bm25 0.2.2) as a sparse matrix: the same scores and rankings, much faster.

    Args:
        corpus_tokens: the tokenized documents, e.g. ``BM25Tokenizer().tokenize_many(texts)``; any iterable
            (read once, so a generator keeps memory at the size of the index).
        k1, b, epsilon: as in ``rank_bm25.BM25Okapi`` (same defaults). With ``b == 1`` rank-bm25 scores empty
            documents as nan (0/0); here they score 0.

    Memory: the index holds one float64 weight and one int32 doc index per distinct (document, term) pair
    (~12 bytes each), plus the vocabulary dict. ``search`` holds at most ``MAX_BATCH_POSTINGS`` scores per batch
    (~200 MB) besides the result arrays.
    """

    def __init__(self, corpus_tokens: Iterable[Sequence[str]], k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25) -> None:
        if k1 <= 0:
            raise ValueError(f"FastBM25: k1 must be > 0 (rank-bm25 scores non-matching documents nan), got {k1}")
        self.k1 = k1
        self.b = b
        self.epsilon = epsilon
        self.vocab: dict[str, int] = {}

        # Term ids per document in order of first appearance; counting is left to scipy (duplicates are summed).
        term_ids = array("i")  # all documents' term ids, concatenated
        doc_len: list[int] = []
        for document in corpus_tokens:
            ids = [self.vocab.setdefault(token, len(self.vocab)) for token in document]
            term_ids.extend(ids)
            doc_len.append(len(ids))
        if not doc_len:
            raise ValueError("FastBM25: corpus_tokens is empty (rank-bm25 fails on an empty corpus too)")
        self.corpus_size = len(doc_len)
        self.doc_len = np.asarray(doc_len, dtype=np.float64)
        self.avgdl = float(np.sum(doc_len)) / self.corpus_size  # same as rank-bm25: total tokens / N (int sum)

        doc_ids = np.repeat(np.arange(self.corpus_size, dtype=np.int32), self.doc_len.astype(np.int64))
        flat_term_ids = np.frombuffer(term_ids, dtype=np.int32)
        # (vocab, docs) with term frequencies; CSR so that a batch of queries (rows) @ this is one product.
        term_freq = sp.csr_matrix((np.ones(flat_term_ids.shape[0], dtype=np.float32), (flat_term_ids, doc_ids)),
                                  shape=(len(self.vocab), self.corpus_size))
        del doc_ids, flat_term_ids, term_ids
        term_freq.sum_duplicates()

        doc_freq = np.diff(term_freq.indptr).astype(np.float64)  # (vocab,) documents containing each term
        idf = np.log(self.corpus_size - doc_freq + 0.5) - np.log(doc_freq + 0.5)
        # rank-bm25 averages over the whole vocabulary before flooring, summing in first-appearance order.
        self.average_idf = sum(idf.tolist()) / len(idf) if len(idf) else 0.0
        idf[idf < 0] = self.epsilon * self.average_idf
        self.idf = idf  # (vocab,) indexed by self.vocab[token]

        # Each stored value becomes rank-bm25's contribution of that term to that document, with the same
        # float64 operations in the same order as BM25Okapi.get_scores.
        doc_of_entry = term_freq.indices  # (nnz,) doc index of each stored term frequency
        tf = term_freq.data.astype(np.float64)
        length_norm = self.k1 * (1 - self.b + self.b * self.doc_len[doc_of_entry] / self.avgdl)
        term_of_entry = np.repeat(np.arange(len(idf)), np.diff(term_freq.indptr))
        term_freq.data = idf[term_of_entry] * (tf * (self.k1 + 1) / (tf + length_norm))
        self.weights = term_freq  # (vocab, docs) CSR
        self.doc_freq = doc_freq

    @classmethod
    def from_weights(cls, vocab: dict[str, int], weights: sp.csr_matrix, doc_freq: np.ndarray, k1: float = 1.5,
                     b: float = 0.75, epsilon: float = 0.25) -> "FastBM25":
        """An index over weights computed elsewhere, ``(len(vocab), docs)`` CSR: one shard of a corpus scored with
        the whole corpus's statistics (``embtune.compute.search``). ``doc_freq`` only sizes ``search``'s batches."""
        index = cls.__new__(cls)
        index.k1, index.b, index.epsilon = k1, b, epsilon
        index.vocab, index.weights, index.doc_freq = vocab, weights, np.asarray(doc_freq, dtype=np.float64)
        index.corpus_size = weights.shape[1]
        return index

    def _query_matrix(self, queries: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """(n_queries, vocab) counts of the known query tokens; unknown tokens contribute 0 in rank-bm25."""
        indptr = [0]
        indices: list[int] = []
        for query in queries:
            indices.extend(self.vocab[token] for token in query if token in self.vocab)
            indptr.append(len(indices))
        data = np.ones(len(indices), dtype=np.float64)
        matrix = sp.csr_matrix((data, np.asarray(indices, dtype=np.int32), np.asarray(indptr)),
                               shape=(len(queries), len(self.vocab)))
        matrix.sum_duplicates()  # a repeated query token counts once per occurrence, as in rank-bm25
        return matrix

    def score_outside(self, query_tokens: Sequence[str], document_tokens: Sequence[str]) -> float:
        """BM25 score of one document that is not in the index (e.g. a passage with a sentence cut out), with the
        index's idf and average length: what ``get_scores`` would give it as one more document whose addition
        left the corpus statistics unchanged."""
        if not hasattr(self, "idf"):
            raise ValueError("FastBM25.score_outside needs the index's own statistics (not a from_weights shard)")
        counts: dict[str, int] = {}
        for token in document_tokens:
            counts[token] = counts.get(token, 0) + 1
        norm = self.k1 * (1 - self.b + self.b * len(document_tokens) / self.avgdl)
        score = 0.0
        for token in query_tokens:  # a repeated query token counts once per occurrence, as in get_scores
            tf = counts.get(token, 0)
            if tf and token in self.vocab:
                score += float(self.idf[self.vocab[token]]) * (tf * (self.k1 + 1) / (tf + norm))
        return score

    def get_scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """(docs,) float64 BM25 scores of one tokenized query, equal to ``BM25Okapi.get_scores``."""
        return (self._query_matrix([query_tokens]) @ self.weights).toarray()[0]

    def search(self, queries: Sequence[Sequence[str]], k: int = 10,
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` documents of each tokenized query, in :func:`rank_order` (score desc, doc index asc).

        Queries are scored ``batch_size`` at a time (and fewer when their posting lists are long, see
        ``MAX_BATCH_POSTINGS``) as one sparse product ``(batch, vocab) @ (vocab, docs)``; the top ``k`` of each row
        is taken from its nonzero scores, falling back to the dense row only when fewer than ``k`` scores are
        positive (then zero-score documents, in corpus order, fill the ranking exactly as rank-bm25's would).

        Returns:
            scores: (n_queries, min(k, docs)) float64 scores.
            indices: (n_queries, min(k, docs)) int64 document indices.
        """
        if k < 1:
            raise ValueError(f"FastBM25.search: k must be >= 1, got {k}")
        k = min(k, self.corpus_size)
        out_indices = np.empty((len(queries), k), dtype=np.int64)
        out_scores = np.empty((len(queries), k), dtype=np.float64)
        all_docs = np.arange(self.corpus_size)
        query_matrix = self._query_matrix(queries)  # (n_queries, vocab)
        postings = query_matrix.astype(bool).astype(np.int64) @ self.doc_freq.astype(np.int64)  # (n_queries,)

        start = 0
        while start < len(queries):
            # Grow the batch while it stays under batch_size queries and MAX_BATCH_POSTINGS score entries.
            budget = np.cumsum(postings[start:start + batch_size])
            stop = start + max(1, int(np.searchsorted(budget, MAX_BATCH_POSTINGS, side="right")))
            batch_scores = (query_matrix[start:stop] @ self.weights).tocsr()  # (batch, docs) sparse
            for row in range(stop - start):
                lo, hi = batch_scores.indptr[row], batch_scores.indptr[row + 1]
                row_scores = batch_scores.data[lo:hi]
                row_docs = batch_scores.indices[lo:hi]
                top = rank_order(row_scores, row_docs, k)
                if top.shape[0] == k and np.round(row_scores[top[-1]], TIE_DECIMALS) > 0:
                    out_indices[start + row] = row_docs[top]
                    out_scores[start + row] = row_scores[top]
                else:  # fewer than k positive scores: zero (and negative) scores take part in the ranking
                    dense = np.zeros(self.corpus_size)
                    dense[row_docs] = row_scores
                    top = rank_order(dense, all_docs, k)
                    out_indices[start + row] = top
                    out_scores[start + row] = dense[top]
            start = stop
        return out_scores, out_indices


def top_k_rank_bm25(bm25okapi, queries: Sequence[Sequence[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-``k`` from ``rank_bm25.BM25Okapi.get_scores``, ranked with :func:`rank_order`.

    Returns ``(scores, indices)``, each (n_queries, min(k, docs)), comparable with ``FastBM25.search``.
    """
    k = min(k, bm25okapi.corpus_size)
    all_docs = np.arange(bm25okapi.corpus_size)
    indices = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float64)
    for row, query in enumerate(queries):
        doc_scores = bm25okapi.get_scores(query)
        top = rank_order(doc_scores, all_docs, k)
        indices[row] = top
        scores[row] = doc_scores[top]
    return scores, indices


@dataclass
class BM25Config:
    """BM25 (the ``bm25`` section): one setting for mining, eval's baseline and hybrid rows, the teacher and serve.

    Stemming and English stopwords are the default for English, chosen because they measured best there (the BM25
    rows of benchmarks/results/scifact_supervised.json).

    ``language`` decides what applies to a corpus in another language:

    - ``auto`` (default): detected from the documents (``embtune.retrieval.language.detect_language``): English
      keeps ``stemmer`` and ``stopwords`` as set; another language gets its PyStemmer stemmer (when PyStemmer has
      one) and no stop words; Chinese, Japanese, Thai get character bigrams. Every stage detects it from the same
      documents, so data_prep, eval and serve tokenise alike.
    - ``english``: ``stemmer`` and ``stopwords`` as set, whatever the corpus (the behaviour before ``language``).
    - a PyStemmer language (``german``, ``russian``...): that stemmer, no stop words.
    - ``cjk``: character bigrams of unsegmented runs, no stemmer, no stop words.
    - ``none``: ``token_pattern`` tokens only.
    """

    backend: Literal["fast", "rank_bm25"] = "fast"  # "rank_bm25" is the reference (a Python loop per query)
    lowercase: bool = True
    token_pattern: str = r"\w+"  # "" splits on whitespace
    stopwords: str = "english"  # "" or "english"
    stemmer: str = "english"  # "" or a PyStemmer language
    k1: float = 1.5
    b: float = 0.75
    language: str = "auto"  # auto | english | cjk | none | a PyStemmer language (see above)

    def validate(self) -> None:
        if self.language not in ("auto", "english", "cjk", "none"):
            import Stemmer  # PyStemmer

            if self.language not in Stemmer.algorithms():
                raise ValueError(f"bm25.language must be auto, english, cjk, none or a PyStemmer language "
                                 f"{Stemmer.algorithms()}, got {self.language!r}")
        if self.stopwords not in ("", "english"):
            raise ValueError(f"bm25.stopwords must be '' or 'english', got {self.stopwords!r}")
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"bm25.k1 must be >= 0 and bm25.b in [0, 1], got k1={self.k1}, b={self.b}")


def resolve_language(settings: BM25Config, doc_texts: Sequence[str] | None) -> str:
    """The language ``settings`` tokenise ``doc_texts`` in: ``language`` itself, or for ``auto`` the detected one
    (``english`` when no documents are given: the settings as set)."""
    if settings.language != "auto":
        return settings.language
    if not doc_texts:
        return "english"
    from embtune.retrieval.language import detect_language

    return detect_language(doc_texts)["language"]


def build_tokenizer(settings: BM25Config, doc_texts: Sequence[str] | None = None) -> BM25Tokenizer:
    """The tokenizer a ``bm25`` section describes for a corpus of ``doc_texts`` (``language: auto`` reads them;
    without them ``auto`` means the settings as set)."""
    language = resolve_language(settings, doc_texts)
    pattern = settings.token_pattern or None
    if language == "english":
        return BM25Tokenizer(lowercase=settings.lowercase, token_pattern=pattern,
                             stopwords=settings.stopwords or None, stemmer=settings.stemmer or None)
    if language == "cjk":
        return BM25Tokenizer(lowercase=settings.lowercase, bigrams=True)
    if language == "none":
        return BM25Tokenizer(lowercase=settings.lowercase, token_pattern=pattern)
    import Stemmer  # PyStemmer

    stemmer = language if language in Stemmer.algorithms() else None
    return BM25Tokenizer(lowercase=settings.lowercase, token_pattern=pattern, stemmer=stemmer)


def bm25_search(doc_texts: Sequence[str], query_texts: Sequence[str], k: int,
                settings: BM25Config | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` BM25 documents per query text: (scores, indices), each (n_queries, min(k, docs))."""
    settings = settings or BM25Config()
    tokenizer = build_tokenizer(settings, doc_texts)
    query_tokens = list(tokenizer.tokenize_many(query_texts))
    if settings.backend == "fast":
        return FastBM25(tokenizer.tokenize_many(doc_texts), k1=settings.k1, b=settings.b).search(query_tokens, k)
    if settings.backend == "rank_bm25":
        from rank_bm25 import BM25Okapi

        reference = BM25Okapi(list(tokenizer.tokenize_many(doc_texts)), k1=settings.k1, b=settings.b)
        return top_k_rank_bm25(reference, query_tokens, k)
    raise ValueError(f"bm25.backend must be 'fast' or 'rank_bm25', got {settings.backend!r}")
