"""An entity-search BEIR folder from Debian's package descriptions: one record per package, titled by the package's
name (the entity), its long description the passage, and keyword queries made from its one-line synopsis.

    apt-get update -o Acquire::Languages=en      # fetches main/i18n/Translation-en (the long descriptions)
    python scripts/debian_packages_corpus.py --out runs/debian_packages [--passages 3000 --queries 300]

Why this corpus: entity search is short records named by their entity, searched with a few keywords that describe
it, not with a sentence of its text (DBpedia-entity's kind). A Debian package is such a record, and Debian ships
every package's description with apt, offline once ``apt-get update`` has run: the name (``0ad``, ``git``,
``python3-requests``) is the title, the long description the passage, and the synopsis line (``fast, scalable,
distributed revision control system``) is what a user types to find it. The synopsis is a separate field, written
to name what the package is; it is not a sentence of the passage. It becomes a keyword query by the rule a search
box teaches (lower case, words only, English function words and the package's own name dropped), and the query
is judged relevant to its package alone.

Records are read from ``/var/lib/apt/lists/*_main_i18n_Translation-en*`` (``apt-helper cat-file`` reads any of its
compressions). Sibling packages share one description (``0ad`` / ``0ad-data``): one package per long description's
first paragraph and per synopsis is kept, packages named ``*-dev``, ``*-doc``, ``*-dbg``, ``*-data`` or ``*-common``
are left out, and so are passages under ``min_chars``. A seeded sample of ``passages`` packages is the corpus; a
seeded ``queries`` of them get their query. Nothing from apt's lists is kept in the repository.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

LISTS = Path("/var/lib/apt/lists")
# Packages whose description is a sibling's with a suffix ("This package contains the development files").
_SKIP_SUFFIXES = ("-dev", "-doc", "-dbg", "-dbgsym", "-data", "-common")
_WORD = re.compile(r"\w+", re.UNICODE)
# Function words a search-box query leaves out (the synopsis is a noun phrase: "tool for converting X to Y").
_STOPWORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or that the this to with without via using your "
    "you can which based".split())


def translation_files(lists: Path = LISTS) -> list[Path]:
    files = sorted(p for p in lists.glob("*_main_i18n_Translation-en*") if not p.name.endswith(".diff_Index"))
    if not files:
        raise FileNotFoundError(f"no *_main_i18n_Translation-en* under {lists}: run "
                                "`apt-get update -o Acquire::Languages=en` (Debian's long package descriptions)")
    return files


def read_records(path: Path) -> list[dict[str, str]]:
    """``{"package", "synopsis", "description"}`` of each record of one Translation-en file."""
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, check=True,
                          timeout=300).stdout.decode("utf-8", "replace")
    return parse_translation(text)


def parse_translation(text: str) -> list[dict[str, str]]:
    """Records of a Translation-en file (RFC 822 stanzas; the long description's lines start with a space, ``.``
    alone is a paragraph break)."""
    out = []
    for stanza in text.split("\n\n"):
        package, synopsis, body = None, None, []
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith("Description-en:"):
                synopsis = line.split(":", 1)[1].strip()
            elif line.startswith(" ") and synopsis is not None:
                body.append(line[1:])
        if package and synopsis and body:
            out.append({"package": package, "synopsis": synopsis, "description": join_paragraphs(body)})
    return out


def join_paragraphs(lines: list[str]) -> str:
    """One paragraph per line: wrapped lines joined, `` .`` breaks kept, each list item (``*``, ``-``) its own line."""
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        stripped = line.strip()
        if stripped == ".":
            paragraphs.append([])
        elif re.match(r"^[*+\-o] ", stripped) or line.startswith("  "):
            paragraphs.append([stripped])  # a list item or a preformatted line starts a line of its own
        else:
            paragraphs[-1].append(stripped)
    return "\n".join(" ".join(p) for p in paragraphs if p)


def keyword_query(synopsis: str, package: str) -> str:
    """The synopsis as a search-box query: lower-case words, function words and the package's own name dropped."""
    own = {w.lower() for w in _WORD.findall(package)}
    words = [w for w in _WORD.findall(synopsis.lower()) if w not in _STOPWORDS and w not in own]
    return " ".join(dict.fromkeys(words))  # a word once


def build(out: Path, passages: int = 3000, queries: int = 300, seed: int = 0, min_chars: int = 200,
          lists: Path = LISTS) -> dict:
    """Write ``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv`` and ``corpus_only/corpus.jsonl``; counts."""
    records = [r for path in translation_files(lists) for r in read_records(path)]
    seen_packages: set[str] = set()
    seen_descriptions: set[str] = set()
    seen_queries: set[str] = set()
    kept, skipped = [], {"suffix": 0, "short": 0, "duplicate": 0, "query": 0}
    for r in sorted(records, key=lambda r: r["package"]):
        first = r["description"].split("\n", 1)[0].lower()
        query = keyword_query(r["synopsis"], r["package"])
        if r["package"].endswith(_SKIP_SUFFIXES):
            skipped["suffix"] += 1
        elif len(r["description"]) < min_chars:
            skipped["short"] += 1
        elif r["package"] in seen_packages or first in seen_descriptions or query in seen_queries:
            skipped["duplicate"] += 1
        elif len(query.split()) < 2:
            skipped["query"] += 1
        else:
            seen_packages.add(r["package"])
            seen_descriptions.add(first)
            seen_queries.add(query)
            kept.append({**r, "query": query})
    rng = random.Random(seed)
    if passages and len(kept) > passages:
        kept = sorted(rng.sample(kept, passages), key=lambda r: r["package"])
    judged = set(rng.sample(range(len(kept)), min(queries, len(kept))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    (out / "corpus_only").mkdir(exist_ok=True)
    with open(out / "corpus.jsonl", "w") as corpus, open(out / "queries.jsonl", "w") as qfile, \
            open(out / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, r in enumerate(kept):
            corpus.write(json.dumps({"_id": r["package"], "title": r["package"], "text": r["description"]},
                                    ensure_ascii=False) + "\n")
            if i in judged:
                qfile.write(json.dumps({"_id": f"q{i}", "text": r["query"]}, ensure_ascii=False) + "\n")
                qrels.write(f"q{i}\t{r['package']}\t1\n")
    (out / "corpus_only" / "corpus.jsonl").write_text((out / "corpus.jsonl").read_text())
    return {"records": len(records), "usable": len(seen_packages), "passages": len(kept), "queries": len(judged),
            "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--passages", type=int, default=3000, help="seeded sample of this many packages (0 = all)")
    parser.add_argument("--queries", type=int, default=300, help="judged keyword queries (seeded among them)")
    args = parser.parse_args()
    print(json.dumps(build(Path(args.out), args.passages, args.queries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
