"""The embedded demo dataset: Python standard-library docstrings, real text that exists offline.

Each documented function, class or module becomes a document titled by its qualified name whose text is the
docstring *without* its summary line; the summary line becomes the query. So a query is a one-line description
and its positive is the detailed documentation of the same object: a retrieval task made from the corpus's own
structure, with no labels written by us. Source files are parsed with ``ast``, never imported.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "__pycache__", "ensurepip"}


def _split_docstring(doc: str) -> tuple[str, str]:
    lines = [line.strip() for line in doc.strip().splitlines()]
    if not lines:
        return "", ""
    summary_lines = []
    i = 0
    while i < len(lines) and lines[i]:
        summary_lines.append(lines[i])
        i += 1
    body = " ".join(line for line in lines[i:] if line)
    return " ".join(summary_lines), body


def iter_docstrings(stdlib: Path | None = None):
    """Yield ``(qualified_name, summary, body)`` for documented objects in the standard library, in a fixed order."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(stdlib).parts)))
    for path in files:
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and not child.name.startswith("_"):
                        yield (name, *_split_docstring(doc))
                    if isinstance(child, ast.ClassDef):
                        yield from visit(child, name)

        doc = ast.get_docstring(tree)
        if doc:
            yield (module, *_split_docstring(doc))
        yield from visit(tree, module)


def build_pydoc_beir(out_dir: str | Path, max_documents: int = 3000, test_queries: int = 300, seed: int = 42) -> Path:
    """Write the demo dataset as a BEIR folder (corpus, queries, qrels/train.tsv, qrels/test.tsv)."""
    out_dir = Path(out_dir)
    seen_summaries: set[str] = set()
    seen_bodies: set[str] = set()
    items = []
    for name, summary, body in iter_docstrings():
        # Keep informative pairs only: a real one-line description and a body that explains it.
        if len(summary.split()) < 4 or len(body.split()) < 15:
            continue
        if summary.lower() in body.lower():  # a body that repeats its summary would make the pair trivial
            continue
        key = summary.lower()
        if key in seen_summaries or body in seen_bodies:  # copies (e.g. overridden methods) would be ambiguous
            continue
        seen_summaries.add(key)
        seen_bodies.add(body)
        items.append((name, summary, body[:2000]))
    rng = random.Random(seed)
    rng.shuffle(items)
    if max_documents:
        items = items[:max_documents]
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "corpus.jsonl", "w") as corpus, open(out_dir / "queries.jsonl", "w") as queries:
        for i, (name, summary, body) in enumerate(items):
            corpus.write(json.dumps({"_id": f"d{i}", "title": name, "text": body}) + "\n")
            queries.write(json.dumps({"_id": f"q{i}", "text": summary}) + "\n")
    n_test = min(test_queries, len(items) // 5)
    for split, rows in (("test", range(n_test)), ("train", range(n_test, len(items)))):
        with open(out_dir / "qrels" / f"{split}.tsv", "w") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for i in rows:
                handle.write(f"q{i}\td{i}\t1\n")
    return out_dir
