"""A BEIR folder from Debian's translated manual pages: one page per command, its NAME line's description as the
labelled query (the way the pydoc demo uses docstring summary lines: data_prep/pydoc_corpus.py).

    apt-get install -y man-db manpages-zh manpages-ja manpages-ru manpages-de manpages-fr
    python scripts/manpages_corpus.py --language zh_CN --out runs/manpages/zh_CN [--max-pages 600]

Each page is rendered with ``man -l`` (wide lines, no hyphenation) and ``col -b``; the first section (NAME,
名称, ИМЯ, BEZEICHNUNG, NOM...) gives ``command - description``. The document is the rest of the page: each
section's paragraphs, lines joined, one paragraph per line, with the NAME section left out (so the query is not in
its passage verbatim). Pages are read from /usr/share/man/<language>/man*/ at run time; nothing from there is kept
in the repository. Writes ``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv`` and ``corpus_only/corpus.jsonl``
(the same passages without any query: what the label-free pipeline sees).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
# "name - description"; translations use several dashes
_NAME_LINE = re.compile(r"^(?P<names>.+?)\s+[-–—－]+\s*(?P<description>.+)$")


def render(page: Path) -> str:
    """The page as plain text (man -l, 1000-column lines, backspace overstrikes removed)."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "1000", "MAN_KEEP_FORMATTING": ""}
    text = subprocess.run(["man", "-l", str(page)], env=env, capture_output=True, timeout=60).stdout
    return subprocess.run(["col", "-b"], input=text, capture_output=True, env=env).stdout.decode("utf-8", "replace")


def parse(text: str) -> tuple[str, str, str] | None:
    """(command, description, document) of a rendered page; None when it has no NAME line or too little text."""
    lines = text.splitlines()[1:-1]  # the header and footer lines
    sections: list[tuple[str, list[list[str]]]] = []
    for line in lines:
        if line.strip() and not line[0].isspace():  # a section heading starts at column 0
            sections.append((line.strip(), [[]]))
        elif sections:
            paragraphs = sections[-1][1]
            if line.strip():
                paragraphs[-1].append(line.strip())
            elif paragraphs[-1]:
                paragraphs.append([])
    if len(sections) < 2:
        return None
    name_text = " ".join(" ".join(p) for p in sections[0][1] if p)
    match = _NAME_LINE.match(name_text)
    if not match:
        return None
    command = match["names"].split(",")[0].strip()
    body = []
    for heading, paragraphs in sections[1:]:
        body.append(heading)
        body.extend(" ".join(p) for p in paragraphs if p)
    document = "\n".join(body)
    return command, match["description"].strip(), document


def build(language: str, out: Path, max_pages: int, seed: int = 0, min_document_chars: int = 200) -> dict:
    """Write the BEIR folder; returns counts."""
    pages = sorted(p for p in (MAN_ROOT / language).glob("man*/*") if p.is_file() and not p.is_symlink())
    if not pages:
        raise FileNotFoundError(f"no manual pages under {MAN_ROOT / language}: apt-get install manpages-<lang> man-db")
    with ThreadPoolExecutor(2) as pool:
        parsed = list(pool.map(lambda p: (p, parse(render(p))), pages))
    seen_commands: set[str] = set()
    seen_queries: set[str] = set()
    kept, skipped = [], {"no name line": 0, "short": 0, "duplicate": 0}
    for page, item in parsed:
        if item is None:
            skipped["no name line"] += 1
            continue
        command, description, document = item
        if len(document) < min_document_chars or len(description) < 4:
            skipped["short"] += 1
            continue
        if command in seen_commands or description.lower() in seen_queries:
            skipped["duplicate"] += 1
            continue
        seen_commands.add(command)
        seen_queries.add(description.lower())
        kept.append((page, command, description, document))
    if max_pages and len(kept) > max_pages:
        kept = random.Random(seed).sample(kept, max_pages)
        kept.sort(key=lambda item: str(item[0]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    (out / "corpus_only").mkdir(exist_ok=True)
    with open(out / "corpus.jsonl", "w") as corpus, open(out / "queries.jsonl", "w") as queries, \
            open(out / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, (page, command, description, document) in enumerate(kept):
            doc_id = f"{page.parent.name}/{page.name}"
            corpus.write(json.dumps({"_id": doc_id, "title": "", "text": document}, ensure_ascii=False) + "\n")
            queries.write(json.dumps({"_id": f"q{i}", "text": description}, ensure_ascii=False) + "\n")
            qrels.write(f"q{i}\t{doc_id}\t1\n")
    (out / "corpus_only" / "corpus.jsonl").write_text((out / "corpus.jsonl").read_text())
    return {"language": language, "pages_found": len(pages), "passages": len(kept), "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", required=True, help="a folder of /usr/share/man (zh_CN, ja, ru, de, fr...)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-pages", type=int, default=0, help="seeded sample of this many pages (0 = all)")
    args = parser.parse_args()
    print(json.dumps(build(args.language, Path(args.out), args.max_pages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
