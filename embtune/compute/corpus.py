"""The corpus as the stages read it: a dict in this process on the local engine, a file read by row on Ray.

:func:`open_corpus` returns one of two objects with one interface, so data_prep, eval and export run the same code
on either engine:

- :class:`MemoryCorpus` (``compute.engine: local``): ``embtune.dataio.load_corpus``'s dict, as before;
- :class:`CorpusFile` (``compute.engine: ray``): the BEIR ``corpus.jsonl`` stays on disk. One streaming pass plans
  its shards (byte ranges) and hashes it; a second, once per content hash, writes a row-offset and id-hash index
  under the embedding cache (``embtune.retrieval.docstore.index_jsonl``), so an id's row and a row's text are one
  binary search and one ``pread``. Its ``texts(...)`` column carries the shard plan, so an encode
  (``embtune.compute.encoding.encode_corpus``) or a BM25 index (:func:`bm25_index`) over it is built by the
  actors from the file, never from texts the driver holds.

The driver then holds ids only where a stage asks for them (qrels, hits, mined rows), never the corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from embtune.compute import ComputeConfig, active
from embtune.retrieval.bm25 import BM25Config, resolve_language
from embtune.retrieval.fusion import ScoreStats

logger = logging.getLogger(__name__)


class MemoryCorpus:
    """A corpus held in this process (``load_corpus``'s ``{doc id: {"title", "text"}}``), in file order."""

    def __init__(self, corpus: dict[str, dict[str, str]]) -> None:
        self.corpus = corpus
        self.ids: list[str] = list(corpus)
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.corpus

    def row_of(self, doc_id: str) -> int:
        if self._row_of is None:
            self._row_of = {d: i for i, d in enumerate(self.ids)}
        return self._row_of[doc_id]

    def texts(self, include_title: bool = True) -> list[str]:
        from embtune.dataio import document_text

        return [document_text(self.corpus[d], include_title) for d in self.ids]

    def docs(self) -> Iterator[dict[str, Any]]:
        return ({"_id": doc_id, **doc} for doc_id, doc in self.corpus.items())

    def rows(self) -> list[dict[str, Any]]:
        """The documents (``{"_id", "title", "text"}``) as a list, in file order."""
        return list(self.docs())

    def text_by_id(self, include_title: bool = True) -> dict[str, str]:
        return dict(zip(self.ids, self.texts(include_title)))


class CorpusFile:
    """A BEIR ``corpus.jsonl`` read by row (see the module docstring); ``len``, ``in`` and ``row_of`` by id."""

    def __init__(self, path: str | Path, shard_rows: int, compute: ComputeConfig | None = None) -> None:
        from embtune.compute.search import map_shards
        from embtune.compute.shards import plan_jsonl
        from embtune.retrieval.docstore import DocStore, idhash_path, index_jsonl
        from embtune.retrieval.encoder import cache_dir

        self.path = Path(path)
        self.shard_rows = shard_rows
        self.items, self.hash = plan_jsonl(self.path, shard_rows)  # byte ranges and the content hash, one pass
        index_dir = cache_dir() / f"corpus_{self.hash}"
        if not idhash_path(self.path, index_dir).is_file():
            # Written to a temporary folder and renamed: a killed run leaves no half index behind.
            scratch = index_dir.with_name(f"{index_dir.name}.tmp{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            # On Ray a task writes it (its arrays are O(rows), kept out of the driver); locally, here.
            (rows,) = map_shards(index_jsonl, [(self.path, scratch)], compute or active())
            shutil.rmtree(index_dir, ignore_errors=True)
            scratch.rename(index_dir)
            logger.info("%s: %d rows indexed by offset and id under %s", self.path, rows, index_dir)
        # Read by pread, not mapped: the driver looks up thousands of rows, and mapped pages would stay resident.
        self.store = DocStore(self.path, index_dir, mapped=False)
        self.ids = self.store.ids  # read on demand; unique (index_jsonl refused a repeated id)

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.ids  # by the id index

    def row_of(self, doc_id: str) -> int:
        return self.store.row_of(doc_id)

    def texts(self, include_title: bool = True) -> "FileTexts":
        return FileTexts(self, include_title)

    def docs(self) -> Iterator[dict[str, Any]]:
        return iter(self.store)

    def rows(self):
        """The documents as a sequence read on demand (``store[i]``, ``store[a:b]``: a row's line, read by offset)."""
        return self.store

    def text_by_id(self, include_title: bool = True) -> "_TextById":
        return _TextById(self, include_title)


class FileTexts(Sequence):
    """Each row's text as a model and BM25 read it (``document_text``), read on demand, with the shard plan the
    engine's actors read the same texts from (:meth:`shard_items`)."""

    def __init__(self, corpus: CorpusFile, include_title: bool) -> None:
        self.corpus, self.include_title = corpus, include_title
        self._column = corpus.store.texts(include_title)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, row: int):  # type: ignore[override]
        return self._column[row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._column)

    @property
    def content_key(self) -> str:
        """The corpus file's content hash, and whether titles are read: what a cache of these texts is keyed by."""
        return self.corpus.hash + ("" if self.include_title else "-notitle")

    def shard_items(self) -> list[dict[str, Any]]:
        """The corpus file's shards (``embtune.compute.shards.plan_jsonl``), each reading titles as this column."""
        out = []
        for item in self.corpus.items:
            source = json.loads(item["source"])
            source["include_title"] = self.include_title
            out.append({**item, "source": json.dumps(source)})
        return out


class _TextById:
    """``{doc id: text}`` read on demand (what a rerank looks hits up in)."""

    def __init__(self, corpus: CorpusFile, include_title: bool) -> None:
        self.corpus, self.texts = corpus, corpus.texts(include_title)

    def __getitem__(self, doc_id: str) -> str:
        return self.texts[self.corpus.row_of(doc_id)]

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.corpus


_OPENED: dict[tuple, "CorpusFile"] = {}


def open_corpus(path: str | Path, on_error: str = "raise", compute: ComputeConfig | None = None
                ) -> MemoryCorpus | CorpusFile:
    """The corpus at ``path`` (a BEIR ``corpus.jsonl``) as the engine reads it (see the module docstring).

    On the Ray engine a malformed row is an error naming the file and line whatever ``on_error`` says: rows are
    counted by line in the shard plans, so none can be skipped.
    """
    from embtune.dataio import DataError, load_corpus

    compute = compute or active()
    if compute.engine != "ray":
        return MemoryCorpus(load_corpus(path, on_error))
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    # One per file, size, time and shard size in a process: the stages of one pipeline share its plan and index.
    stat = Path(path).stat()
    from embtune.retrieval.encoder import cache_dir

    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, compute.shard_rows, str(cache_dir()))
    if key in _OPENED:
        return _OPENED[key]
    try:
        _OPENED[key] = CorpusFile(path, compute.shard_rows, compute)
        return _OPENED[key]
    except ValueError as err:  # raised in a Ray task: its cause, not the remote traceback
        raise DataError(f"{getattr(err, 'cause', None) or err} (compute.engine: ray reads the corpus by line and "
                        "skips none; fix the line, or use compute.engine: local with data.on_error: skip)") from None


# --- BM25 over a corpus file ---------------------------------------------------------------------------------------

class ShardedBM25Index:
    """The core ``Retriever``'s BM25 member (``embtune.retrieval.spec.BM25Index``'s ``search``, ``score_stats``
    and ``save``) over a :class:`CorpusFile`'s texts, built once on the shards (``ShardedBM25``): same scores as
    ``BM25Index`` over the same texts. ``language: auto`` is resolved from the corpus's first rows, as
    ``BM25Index`` resolves it (``detect_language`` reads the texts in order up to its character budget)."""

    def __init__(self, texts: FileTexts, settings: BM25Config, compute: ComputeConfig) -> None:
        from embtune.compute.search import Recent, ShardedBM25

        self.settings = settings  # as asked: the Retriever keys its members by these
        resolved = replace(settings, language=resolve_language(settings, texts))
        self.sharded = ShardedBM25(texts.shard_items(), texts.content_key, resolved, compute)
        self.tokenizer = self.sharded.tokenizer
        self.num_docs = len(texts)
        self._recent = Recent()
        logger.info("BM25 over %d documents in %d shards (%s)", self.num_docs, len(self.sharded.starts),
                    self.tokenizer.describe())

    def search(self, query_texts: Sequence[str], k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        from embtune.compute.search import Recent

        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return self._recent.get(("search", k, Recent.key(list(query_texts))),
                                lambda: self.sharded.search(query_texts, min(k, self.num_docs)))

    def score_stats(self, query_texts: Sequence[str], allowed: np.ndarray | None = None) -> list[ScoreStats]:
        """Each query's BM25 score statistics over the whole corpus, merged from the shards."""
        from embtune.compute.search import Recent

        if allowed is not None:
            raise NotImplementedError("a row filter over a sharded corpus: serve the exported bundle instead")
        return self._recent.get(("stats", Recent.key(list(query_texts))), lambda: [
            ScoreStats(*map(float, row)) for row in self.sharded.score_stats(query_texts)])

    def doc_scores(self, query_text: str, rows: np.ndarray) -> np.ndarray:
        return self.sharded.doc_scores(self.sharded.tokenize([query_text])[0], rows)

    def save(self, directory: str | Path) -> Path:
        """The index as ``BM25Index.save`` writes it (``BM25Index.load`` reads it), merged shard by shard."""
        return self.sharded.save(directory, self.settings)


def bm25_index(doc_texts: Sequence[str], settings: BM25Config, compute: ComputeConfig | None = None):
    """The BM25 member over ``doc_texts`` as the engine builds it: on shards for a :class:`CorpusFile`'s texts on
    the Ray engine (:class:`ShardedBM25Index`), else ``BM25Index`` in this process."""
    from embtune.retrieval.spec import BM25Index

    compute = compute or active()
    if isinstance(doc_texts, FileTexts) and compute.engine == "ray":
        return ShardedBM25Index(doc_texts, settings, compute)
    return BM25Index(doc_texts, settings)
