"""Your own documents as a corpus: a folder of files, a table, or a ``datasets`` dataset (``data.format``).

Each reader yields ``(doc_id, title, text)`` one document at a time, and :func:`write_corpus` streams them into the
``corpus.jsonl`` of a BEIR folder (the stage's ``dataset/``), so that everything after loading (label-free data,
eval, the bundle) reads one format. These sources bring no queries or qrels: ``data.queries: auto`` takes the
label-free route for them (docs/labelfree.md).

- ``files``: ``data.path`` is a folder, read recursively through ``data.glob``; ``.txt``, ``.md``, ``.rst`` and
  ``.html``/``.htm`` are read (any other file the glob matches is counted as skipped). HTML text comes from
  BeautifulSoup (script, style and navigation removed). A document's id is its path relative to the folder; its
  title the first heading (Markdown ``#``, reStructuredText underline, HTML ``<title>``/``<h1>``), else the file
  name.
- ``table``: ``data.path`` is a CSV, TSV, Parquet or JSONL file; ``data.id_column``, ``data.text_column`` and the
  optional ``data.title_column`` name the columns. Read in batches with pyarrow (JSONL line by line).
- ``hf``: ``data.path`` is a dataset saved with ``save_to_disk`` (a folder) or a hub name read with
  ``datasets.load_dataset`` (``data.split``; streamed), with the same column keys.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from embtune.config import InputError
from embtune.dataio import DataError, LoadReport

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                  ".json": "jsonl"}
# Formats that bring a corpus only: no queries, no qrels.
CORPUS_ONLY_FORMATS = ("files", "table", "hf")

Document = tuple[str, str, str]  # (doc_id, title, text)


# --- files -------------------------------------------------------------------------------------------------------

def html_text(markup: str) -> tuple[str, str]:
    """(title, text) of an HTML page: its ``<title>`` or first ``<h1>``, and its visible text."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "header", "footer", "template"]):
        tag.decompose()
    heading = soup.title or soup.find(["h1", "h2"])
    title = heading.get_text(" ", strip=True) if heading is not None else ""
    if soup.title is not None:
        soup.title.decompose()
    body = soup.body or soup
    text = "\n".join(line.strip() for line in body.get_text("\n").splitlines() if line.strip())
    return title, text


def markup_title(text: str, suffix: str) -> str:
    """The first heading of a Markdown or reStructuredText file, or ""."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if suffix in (".md", ".markdown"):
            match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
            if match:
                return match.group(1)
        if suffix == ".rst" and i + 1 < len(lines) and line.strip():
            underline = lines[i + 1].strip()
            if len(underline) >= len(line.strip()) and re.fullmatch(r"([=\-~^\"'`#*+:.])\1+", underline):
                return line.strip()
    return ""


def read_files(folder: Path, pattern: str, report: LoadReport) -> Iterator[Document]:
    """Every readable file under ``folder`` that ``pattern`` matches, sorted by path (ids are relative paths)."""
    matched = 0
    for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
        matched += 1
        rel = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            report.add(f"unsupported file type {suffix or '(none)'}", rel)
            continue
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            report.add("not UTF-8 text", rel)
            continue
        if suffix in (".html", ".htm"):
            title, text = html_text(raw)
        else:
            title, text = markup_title(raw, suffix), raw.strip()
        if not text.strip():
            report.add("empty document", rel)
            continue
        yield rel, title or path.stem.replace("_", " ").replace("-", " "), text
    if not matched:
        raise InputError(f"data.path {folder}: no file matches data.glob {pattern!r} (data.format files reads "
                         f"{', '.join(FILE_SUFFIXES)})")


# --- tables ------------------------------------------------------------------------------------------------------

def table_kind(path: Path) -> str:
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"data.path {path}: data.format table reads {', '.join(TABLE_SUFFIXES)} files, not "
                         f"{path.suffix or 'a file without a suffix'}")
    return kind


def table_batches(path: Path, batch_rows: int = 4096) -> Iterator[list[dict[str, Any]]]:
    """Rows of a CSV/TSV/Parquet/JSONL file in batches, never the whole table in memory."""
    kind = table_kind(path)
    if kind == "jsonl":
        batch: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    batch.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: invalid JSON: {err.msg}") from None
                if len(batch) == batch_rows:
                    yield batch
                    batch = []
        if batch:
            yield batch
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield record_batch.to_pylist()
        return
    import pyarrow.csv as pacsv

    # Every column as a string: an id column of digits stays "007", not 7.
    reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                            read_options=pacsv.ReadOptions(block_size=1 << 22),
                            convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                                                                 column_types=_all_strings(path, kind)))
    for record_batch in reader:
        yield record_batch.to_pylist()


def _all_strings(path: Path, kind: str) -> dict[str, Any]:
    import pyarrow as pa

    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
    names = [name.strip('"') for name in header.split("\t" if kind == "tsv" else ",")]
    return {name: pa.string() for name in names}


def table_columns(path: Path) -> list[str]:
    """The column names of a table file (its first batch)."""
    first = next(table_batches(path, batch_rows=16), [])
    return list(first[0]) if first else []


def read_rows(rows: Iterator[list[dict[str, Any]]], source: str, id_column: str, text_column: str,
              title_column: str, report: LoadReport) -> Iterator[Document]:
    """Documents from row batches, checking the configured columns exist (named in the error) and ids are unique."""
    seen: set[str] = set()
    row_no = 0
    for batch in rows:
        for row in batch:
            row_no += 1
            if row_no == 1:
                missing = [f"data.{key}={name!r}" for key, name in
                           (("id_column", id_column), ("text_column", text_column), ("title_column", title_column))
                           if name and name not in row]
                if missing:
                    raise InputError(f"{source}: no column {', '.join(missing)}; its columns are {sorted(row)}")
            where = f"{source}: row {row_no}"
            doc_id, text = row.get(id_column), row.get(text_column)
            if doc_id is None or str(doc_id) == "":
                report.add("missing id", where)
                continue
            doc_id = str(doc_id)
            if doc_id in seen:
                report.add("duplicate id", where)
                continue
            if not isinstance(text, str) or not text.strip():
                report.add("empty text", where)
                continue
            seen.add(doc_id)
            title = row.get(title_column) if title_column else ""
            yield doc_id, str(title or ""), text


def hf_batches(name_or_path: str, split: str, batch_rows: int = 4096) -> Iterator[list[dict[str, Any]]]:
    """Rows of a saved dataset (``save_to_disk`` folder) or a hub dataset's split, in batches."""
    import datasets

    if Path(name_or_path).exists():
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(f"data.path {name_or_path}: no split {split!r} (data.split); it has "
                                 f"{sorted(loaded)}")
            loaded = loaded[split]
        for start in range(0, len(loaded), batch_rows):
            yield loaded.select(range(start, min(start + batch_rows, len(loaded)))).to_list()
        return
    try:
        streamed = datasets.load_dataset(name_or_path, split=split, streaming=True)
    except Exception as err:  # datasets raises a different class per cause (offline, not found, gated, bad split)
        first = str(err).splitlines()[0] if str(err) else ""
        raise InputError(f"data.path {name_or_path!r}: no such saved dataset, and the hub could not load it "
                         f"({type(err).__name__}: {first[:200]}); give a save_to_disk folder or a reachable hub "
                         "name (HF_HUB_OFFLINE=1 allows only what the local cache has)") from None
    batch = []
    for row in streamed:
        batch.append(row)
        if len(batch) == batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


# --- writing -----------------------------------------------------------------------------------------------------

def documents(data, report: LoadReport) -> Iterator[Document]:
    """The configured source's documents (``data`` is the recipe's ``data`` section)."""
    path = Path(data.path)
    if data.format == "files":
        if not path.is_dir():
            raise InputError(f"data.path {path}: data.format files needs a folder of documents")
        return read_files(path, data.glob, report)
    if data.format == "table":
        return read_rows(table_batches(path), str(path), data.id_column, data.text_column, data.title_column,
                         report)
    if data.format == "hf":
        return read_rows(hf_batches(data.path, data.split), data.path, data.id_column, data.text_column,
                         data.title_column, report)
    raise ValueError(f"not a corpus-only format: {data.format!r}")


def write_corpus(docs: Iterator[Document], folder: Path, chunker=None) -> int:
    """Stream documents into ``folder/corpus.jsonl`` (chunked by ``chunker(text) -> [pieces]`` when given);
    returns the number of rows written. A chunk's id is ``<doc id>#<n>`` and it keeps its document's title."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, title, text in docs:
            pieces = chunker(text) if chunker else [text]
            for n, piece in enumerate(pieces):
                row_id = doc_id if len(pieces) == 1 else f"{doc_id}#{n}"
                handle.write(json.dumps({"_id": row_id, "title": title, "text": piece}, ensure_ascii=False) + "\n")
                written += 1
    return written
