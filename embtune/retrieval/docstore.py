"""Documents on disk, read one row at a time: what a served index returns without the corpus in memory.

A store is the bundle's ``docs.jsonl`` (one JSON object per index row) and two arrays beside it, written once:

- ``docs.offsets.npy``: (rows + 1,) int64 byte offset of each line, so row ``i`` is one ``pread``;
- ``docs.idhash.npy``: (rows, 2) int64, each row's ``(hash of its _id, row)`` sorted by hash, so an id is found by a
  binary search and one read (no dict of every id: at 10M rows that dict alone is about a gigabyte).

Both arrays are memory-mapped, so opening a store reads nothing but their headers. A corpus file that exists
already (a BEIR ``corpus.jsonl``) gets the same two arrays in a folder of their own (:func:`index_jsonl`), so the
stages read it by row on the Ray engine without copying it.

Example::

    write_store(docs, "bundle/index/docs.jsonl")       # docs: an iterable of {"_id", "text", ...}, streamed
    store = DocStore("bundle/index/docs.jsonl")
    store[3]["text"]; store.ids[3]; store.row_of("doc-17")
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

TEXT_FIELDS = {"_id", "title", "text"}


def offsets_path(path: str | Path, index_dir: str | Path | None = None) -> Path:
    path = Path(path)
    name = path.name.removesuffix(".jsonl") + ".offsets.npy"
    return Path(index_dir) / name if index_dir else path.with_name(name)


def idhash_path(path: str | Path, index_dir: str | Path | None = None) -> Path:
    path = Path(path)
    name = path.name.removesuffix(".jsonl") + ".idhash.npy"
    return Path(index_dir) / name if index_dir else path.with_name(name)


def id_hash(doc_id: str) -> int:
    """A 63-bit hash of a document id, the same in every process (Python's ``hash`` of a str is salted)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little") >> 1


def write_store(docs: Iterable[dict[str, Any]], path: str | Path) -> tuple[int, list[str]]:
    """Write ``docs`` (streamed, never held) as JSONL with its offsets and id index; returns the row count and the
    metadata fields seen (keys other than ``_id``, ``title``, ``text`` with a scalar value: what filters read).

    Raises ``ValueError`` naming the row for a document without string ``_id`` and ``text``, or an id that occurs
    twice (runs are keyed by id).
    """
    path = Path(path)
    # array('q'): 8 bytes a row, where a list of Python ints costs about 36 (tens of millions of rows at scale)
    offsets = array("q", [0])
    hashes = array("q")
    fields: set[str] = set()
    with open(path, "wb") as handle:
        for row, doc in enumerate(docs):
            if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str) or not isinstance(doc.get("text"), str):
                raise ValueError(f"docs[{row}]: expected a dict with string '_id' and 'text', got {doc!r:.200}")
            line = (json.dumps(doc, ensure_ascii=False) + "\n").encode()
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
            hashes.append(id_hash(doc["_id"]))
            if len(doc) > 3 or not doc.keys() <= TEXT_FIELDS:
                fields.update(k for k, v in doc.items() if k not in TEXT_FIELDS and not isinstance(v, (list, dict)))
    np.save(offsets_path(path), np.frombuffer(offsets, dtype=np.int64))
    _write_id_table(path, None, np.frombuffer(hashes, dtype=np.int64))
    return len(hashes), sorted(fields)


def _write_id_table(path: Path, index_dir: Path | None, hashes: np.ndarray) -> None:
    """The sorted ``(id hash, row)`` table, after checking that equal hashes are not the same id."""
    order = np.argsort(hashes, kind="stable")
    table = np.stack([hashes[order], order.astype(np.int64)], axis=1) if len(hashes) else np.zeros((0, 2), np.int64)
    del order
    store = DocStore(path, index_dir)
    for at in np.flatnonzero(table[1:, 0] == table[:-1, 0]):  # equal hashes: the same id, or (rarely) a collision
        first, second = int(table[at, 1]), int(table[at + 1, 1])
        if store[first]["_id"] == store[second]["_id"]:
            raise ValueError(f"{path}: document id {store[first]['_id']!r} occurs at rows {first} and {second}; "
                             "runs are keyed by id")
    np.save(idhash_path(path, index_dir), table)


def index_jsonl(path: str | Path, index_dir: str | Path) -> int:
    """Offsets and id index for a JSONL corpus that already exists (a BEIR ``corpus.jsonl``), written under
    ``index_dir``; the file itself is not copied or changed. Rows are its non-blank lines, as
    ``embtune.dataio.load_corpus`` and the Ray engine's shard plans count them. Returns the row count.

    Raises ``ValueError`` naming the file and line of a row that is not a JSON object with string ``_id`` and
    ``text``, or of an id that occurs twice.
    """
    path, index_dir = Path(path), Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    offsets = array("q")
    hashes = array("q")
    position = 0
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {err}") from None
                if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str) \
                        or not isinstance(doc.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with string '_id' and 'text'")
                offsets.append(position)
                hashes.append(id_hash(doc["_id"]))
            position += len(line)
    offsets.append(position)
    np.save(offsets_path(path, index_dir), np.frombuffer(offsets, dtype=np.int64))
    _write_id_table(path, index_dir, np.frombuffer(hashes, dtype=np.int64))
    return len(hashes)


class DocStore(Sequence):
    """The documents of a store written by :func:`write_store`, read on demand; ``store[row]`` is a dict."""

    def __init__(self, path: str | Path, index_dir: str | Path | None = None, mapped: bool = True) -> None:
        """``mapped``: the two arrays memory-mapped (a server's many lookups); False reads each entry with a
        ``pread``, so random lookups leave no pages of them resident in this process (a driver that looks up a
        few thousand rows of a corpus of millions)."""
        self.path = Path(path)
        if not offsets_path(self.path, index_dir).is_file():
            raise FileNotFoundError(f"{self.path}: no {offsets_path(self.path, index_dir)} (write it with "
                                    "embtune.retrieval.docstore.write_store or index_jsonl)")
        load = (lambda file: np.load(file, mmap_mode="r")) if mapped else _Int64File
        self.mapped = mapped
        self.offsets = load(offsets_path(self.path, index_dir))  # (rows + 1,)
        table = idhash_path(self.path, index_dir)
        self._idhash = load(table) if table.is_file() else None  # (rows, 2)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.ids = _IdColumn(self, lambda doc: doc["_id"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int | slice) -> dict[str, Any] | list[dict[str, Any]]:  # type: ignore[override]
        if isinstance(row, slice):  # a range of rows, each read on its own
            return [self[i] for i in range(*row.indices(len(self)))]
        if not -len(self) <= row < len(self):
            raise IndexError(f"{self.path}: row {row} out of range ({len(self)} rows)")
        row = row % len(self)
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        line = os.pread(self._fd, end - start, start)
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}:{row + 1}: invalid JSON: {err}") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as handle:
            for line in handle:
                if line.strip():  # an indexed corpus file may have blank lines; they are no rows
                    yield json.loads(line)

    def texts(self, include_title: bool = True) -> "_Column":
        """Each row's text as a model and BM25 read it (``embtune.dataio.document_text``), on demand."""
        from embtune.dataio import document_text

        return _Column(self, lambda doc: document_text(doc, include_title))

    def row_of(self, doc_id: str) -> int:
        """The row of ``doc_id``; ``KeyError`` when the store has no such id."""
        if self._idhash is None:
            raise KeyError(f"{doc_id!r}: {self.path} has no id index ({idhash_path(self.path).name})")
        h = id_hash(doc_id)
        rows = len(self._idhash)
        if self.mapped:
            at = int(np.searchsorted(self._idhash[:, 0], h))
        else:  # the first entry >= h, by binary search over single reads
            lo, hi = 0, rows
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if self._idhash[mid, 0] < h else (lo, mid)
            at = lo
        while at < rows and self._idhash[at, 0] == h:
            row = int(self._idhash[at, 1])
            if self[row]["_id"] == doc_id:
                return row
            at += 1
        raise KeyError(doc_id)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class _Int64File:
    """An int64 ``.npy`` array (1-D or 2-D, C order) whose entries are read one ``pread`` at a time."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(handle))
            self.header = handle.tell()
        if fortran or dtype != np.dtype("<i8"):
            raise ValueError(f"{path}: expected a C-order little-endian int64 array, got {dtype} (fortran {fortran})")
        self.shape = shape
        self.columns = shape[1] if len(shape) == 2 else 1
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, at: int | tuple[int, int]) -> int:
        row, column = at if isinstance(at, tuple) else (at, 0)
        row = row % self.shape[0]
        raw = os.pread(self._fd, 8, self.header + 8 * (row * self.columns + column))
        return int.from_bytes(raw, "little", signed=True)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class _Column(Sequence):
    """A value of every row, read on demand (``store.ids[row]``): what the ``Retriever`` takes as ids and texts."""

    unique = True  # write_store refused duplicate ids (the Retriever's check, done once at write time)

    def __init__(self, store: DocStore, value: Callable[[dict[str, Any]], Any]) -> None:
        self.store, self.value = store, value

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, row: int):  # type: ignore[override]
        return self.value(self.store[row])

    def __iter__(self) -> Iterator[Any]:
        return (self.value(doc) for doc in self.store)


class _IdColumn(_Column):
    """The ids, with ``in`` by the id index (one binary search and a read, not a scan)."""

    def __contains__(self, doc_id: object) -> bool:
        try:
            self.store.row_of(str(doc_id))
        except KeyError:
            return False
        return True
