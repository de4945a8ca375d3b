"""``embtune init PATH``: look at a folder or file of your own documents and write a commented recipe for it.

It detects the format (a BEIR folder, a folder of text/Markdown/reStructuredText/HTML files, a CSV/TSV/Parquet/JSONL
table, or a dataset saved with ``datasets``), a table's id/text/title columns, and the corpus's language, and
writes ``embtune.yaml`` with the label-free recipe (docs/labelfree.md) and the two commands to run next.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from embtune.cli import exit_code
from embtune.config import InputError

ID_COLUMNS = ("_id", "id", "doc_id", "docid", "document_id", "uid", "key", "url")
TEXT_COLUMNS = ("text", "content", "contents", "body", "passage", "document", "abstract", "article")
TITLE_COLUMNS = ("title", "heading", "name", "subject")
SAMPLE_DOCUMENTS = 200  # documents read to detect the language


def detect_columns(columns: list[str], rows: list[dict]) -> dict[str, str]:
    """id, text and title columns of a table: by name first, else the text is the longest string column."""
    lower = {c.lower(): c for c in columns}
    found = {}
    for key, names in (("id_column", ID_COLUMNS), ("text_column", TEXT_COLUMNS), ("title_column", TITLE_COLUMNS)):
        found[key] = next((lower[n] for n in names if n in lower), "")
    if not found["text_column"]:
        lengths = {c: sum(len(r[c]) for r in rows if isinstance(r.get(c), str)) for c in columns}
        longest = max((c for c in columns if lengths[c] and c != found["id_column"]), key=lengths.get, default="")
        found["text_column"] = longest
    if not found["id_column"] or not found["text_column"]:
        raise InputError(f"could not tell the id and text columns apart among {columns}: set data.id_column and "
                         "data.text_column in the recipe")
    return found


def detect(path: Path) -> dict:
    """What ``path`` holds: ``{"format", "data": {recipe keys}, "summary", "texts": [a sample]}``."""
    from embtune.data_prep.sources import (
        FILE_SUFFIXES,
        TABLE_SUFFIXES,
        hf_batches,
        read_files,
        read_rows,
        table_batches,
    )
    from embtune.dataio import LoadReport

    report = LoadReport()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (give a folder of documents, a table file or a saved "
                         "dataset)")
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        labelled = (path / "queries.jsonl").is_file() and (path / "qrels").is_dir()
        texts = []
        with open(path / "corpus.jsonl", encoding="utf-8") as handle:
            for line, _ in zip(handle, range(SAMPLE_DOCUMENTS)):
                texts.append(json.loads(line).get("text", ""))
        return {"format": "beir", "data": {"format": "beir", "path": str(path)}, "texts": texts,
                "summary": "a BEIR folder" + (" with queries and qrels (they feed the dev split and eval only)"
                                              if labelled else " (corpus.jsonl only)")}
    parts = sorted((path / "corpus").glob("*.parquet")) if (path / "corpus").is_dir() else []
    if path.is_dir() and ((path / "corpus.parquet").is_file() or parts):
        import pyarrow.parquet as pq

        labelled = (path / "queries.jsonl").is_file() and (path / "qrels").is_dir()
        first = path / "corpus.parquet" if (path / "corpus.parquet").is_file() else parts[0]
        batch = next(pq.ParquetFile(first).iter_batches(batch_size=SAMPLE_DOCUMENTS), None)
        texts = [str(t or "") for t in batch.to_pydict().get("text", [])] if batch is not None else []
        return {"format": "parquet", "data": {"format": "parquet", "path": str(path)}, "texts": texts,
                "summary": "a BEIR folder with its corpus in Parquet" + (
                    " with queries and qrels (they feed the dev split and eval only)" if labelled else "")}
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        split = "train"
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            split = "train" if "train" in splits or not splits else splits[0]
        rows = next(hf_batches(str(path), split, batch_rows=SAMPLE_DOCUMENTS), [])
        columns = detect_columns(list(rows[0]) if rows else [], rows)
        data = {"format": "hf", "path": str(path), "split": split, **columns}
        texts = [r.get(columns["text_column"]) or "" for r in rows]
        return {"format": "hf", "data": data, "texts": texts, "summary": f"a saved dataset (split {split})"}
    if path.is_dir():
        suffixes = Counter(p.suffix.lower() for p in path.rglob("*") if p.is_file())
        readable = {s: n for s, n in suffixes.items() if s in FILE_SUFFIXES}
        if not readable:
            raise InputError(f"{path}: no {', '.join(FILE_SUFFIXES)} file in this folder (and it is not a BEIR "
                             "folder or a saved dataset)")
        texts = [text for _, (_, _, text) in zip(range(SAMPLE_DOCUMENTS), read_files(path, "**/*", report))]
        counts = ", ".join(f"{n} {s}" for s, n in sorted(readable.items()))
        return {"format": "files", "data": {"format": "files", "path": str(path), "glob": "**/*"}, "texts": texts,
                "summary": f"a folder of documents ({counts})"}
    if path.suffix.lower() in TABLE_SUFFIXES:
        rows = next(table_batches(path, batch_rows=SAMPLE_DOCUMENTS), [])
        columns = detect_columns(list(rows[0]) if rows else [], rows)
        docs = read_rows(iter([rows]), str(path), columns["id_column"], columns["text_column"],
                         columns["title_column"], report)
        texts = [text for _, _, text in docs]
        return {"format": "table", "data": {"format": "table", "path": str(path), **columns}, "texts": texts,
                "summary": f"a {path.suffix.lstrip('.').upper()} table (columns: id {columns['id_column']}, text "
                           f"{columns['text_column']}, title {columns['title_column'] or '(none)'})"}
    raise InputError(f"{path}: not a folder, nor a {', '.join(TABLE_SUFFIXES)} table")


def yaml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_recipe(path: Path, out: Path, name: str) -> str:
    """Detect what ``path`` holds and write the label-free recipe for it to ``out``; returns the recipe text."""
    from embtune.retrieval.language import detect_language

    found = detect(path)
    language = detect_language([t for t in found["texts"] if t]) if found["texts"] else {"language": "unknown",
                                                                                       "why": "no text sampled"}
    config_arg = str(out)
    data_lines = "\n".join(f"  {k}: {yaml_value(v)}" for k, v in found["data"].items())
    chunk = found["format"] not in ("beir", "parquet")
    text = f"""\
# embtune recipe for {path}, written by `embtune init`.
# Found: {found['summary']}; language: {language['language']} ({language['why']}).
# The label-free recipe: pseudo-queries cut from your documents (a title or a sentence), each paired with its
# document with the query cut out; the query side of the base model is trained through the dense + BM25 fused score
# it will ship in, at the weight a probe chooses without labels, so it learns where BM25 is wrong (docs/labelfree.md).
# A student is trained only when the teacher beats the base model on the probe; otherwise the base model (or BM25)
# ships, and the report says why. Check every key with `python -m embtune.pipeline --help`.
#
# Next:
#   python -m embtune.pipeline {config_arg}          # prepare, train, evaluate, export a bundle
#   python -m embtune.serve up {config_arg}          # serve the bundle: /search, /v1/embeddings, /health
run_dir: runs/{name}
seed: 42
data:
{data_lines}
  queries: labelfree       # no labelled queries needed; any in a BEIR folder feed only the dev split and eval
chunking:
  max_tokens: {256 if chunk else 0}          # long documents become windows of this many tokens (0 = off)
  overlap: 32
labelfree:
  documents: 10000         # passages to cut pseudo-queries from (seeded sample); 0 = all
  sentences_per_document: 1  # besides the title; each query's cut document is encoded once
  positives: cut           # the document without the query: the positive train.loss query_fused reads
  dense_weight: null       # the teacher's dense share: null = chosen by the probe
bm25:
  language: auto           # BM25's stemmer and stop words follow the corpus's detected language
train:
  base_model: minilm       # the offline all-MiniLM-L6-v2; a hub name or a local folder works too
  loss: query_fused        # the student's z-scores (base model's statistics) + BM25's, at the probe's weight
  matryoshka_dims: []
  epochs: 1
  batch_size: 32
  learning_rate: 2.0e-5
  max_seq_length: 256
eval:
  dims: [384]
  hybrid: [weighted]       # also measure/serve dense + BM25 fused
export:
  model_name: {name}-embtune
tracking:
  report_to: none          # wandb | tensorboard | none
"""
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embtune init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a folder of documents, a table file (CSV/TSV/Parquet/JSONL), a BEIR folder or "
                        "a saved dataset")
    parser.add_argument("--out", default="embtune.yaml", help="where to write the recipe (default: ./embtune.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing recipe")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    args = parser.parse_args(argv)

    def work() -> None:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise InputError(f"{out} exists: pass --force to overwrite it, or --out to write elsewhere")
        path = Path(args.path).resolve()
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.stem).strip("-") or "corpus"
        write_recipe(path, out, name)
        print(f"wrote {out}\nnext:\n  python -m embtune.pipeline {out}\n  python -m embtune.serve up {out}")

    return exit_code(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
