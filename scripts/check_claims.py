"""Check that every tagged number in README.md and docs/*.md equals the result file it comes from.

    python scripts/check_claims.py            # print each mismatch as FILE:LINE: ...; exit 1 if any
    python scripts/check_claims.py --fix      # rewrite each tagged number from its result file, printing each change
    python scripts/check_claims.py --list     # every tag with its value

The tag is an HTML comment right after the number (GitHub renders nothing for it, also inside a table cell)::

    fine-tuned **70.65**<!-- demo.json:results.finetuned.ndcg@10 --> nDCG@10
    keeps 98.0%<!-- deploy_sweep_scifact.json:bar.retention *100 --> of it

- The file is a name under ``benchmarks/results/`` (or a path from the repository root).
- The key is a path of segments joined by ``.``: a dict key (``ndcg@10``), ``[2]`` (a list index),
  ``[name=dense]`` (the list item whose ``name`` is ``dense``) or ``["a.b"]`` (a key with dots or brackets).
- `` *100`` after the key scales the file's value (fractions quoted as percent; `` *-100`` also flips a difference
  the file records the other way round; `` *0.001`` quotes milliseconds as seconds).
- Between the number and the tag only ``*`` (bold), ``%`` and ``×`` may stand. Tags in code (fenced blocks and
  `` `spans` ``) are examples, not claims.

Rounding: the text's precision rules. A number written with d decimals matches when the file's value, rounded half
up to d decimals, equals it: 70.65 matches 70.649 and 70.65, not 70.66; 264 matches 263.5 to 264.49. A ``+`` sign
and thousands commas in the text are kept by ``--fix``; ``−`` (U+2212) counts as a minus sign.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results")
DOCUMENTS = ("README.md", "docs/*.md")

TAG = re.compile(
    r"(?P<number>[+\-−]?\d[\d,]*(?:\.\d+)?)(?P<between>[*%×]*)"
    r"<!--\s*(?P<file>[\w./-]+\.json):(?P<key>[^>]+?)(?:\s+\*(?P<scale>-?\d+(?:\.\d+)?))?\s*-->")
CODE_SPAN = re.compile(r"`[^`]*`")
SEGMENT = re.compile(r'\["(?P<quoted>[^"]+)"\]|\[(?P<field>\w+)=(?P<value>[^\]]+)\]|\[(?P<index>-?\d+)\]'
                     r"|(?P<key>[^.\[]+)")


@dataclass
class Claim:
    """One tagged number in a document."""

    document: Path  # relative to the repository root
    line: int
    text: str  # the number as written
    file: str
    key: str
    scale: str  # "1" unless the tag says otherwise
    start: int  # the number's span in its line
    end: int

    @property
    def source(self) -> str:
        return f"{self.file}:{self.key}" + (f" *{self.scale}" if self.scale != "1" else "")


def find_claims(document: Path, root: Path = ROOT) -> list[Claim]:
    """Every tagged number of ``document`` (a path under ``root``), in order."""
    claims = []
    fenced = False
    for number, line in enumerate((root / document).read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        # an example of the scheme in `code` is not a claim: blank code spans, keeping the positions
        visible = CODE_SPAN.sub(lambda span: " " * len(span.group(0)), line)
        for found in TAG.finditer(visible):
            claims.append(Claim(document, number, found["number"], found["file"], found["key"],
                                found["scale"] or "1", found.start("number"), found.end("number")))
    return claims


def result_path(file: str, root: Path = ROOT) -> Path:
    return root / (file if "/" in file else RESULTS / file)


def lookup(data: Any, key: str) -> Any:
    """The value at a dotted key path (see the module docstring); KeyError names the segment that is missing."""
    value, walked = data, []
    position = 0
    while position < len(key):
        if key[position] == ".":
            position += 1
        found = SEGMENT.match(key, position)
        if not found:
            raise KeyError(f"cannot parse {key[position:]!r}")
        position = found.end()
        here = ".".join(walked) or "the top level"
        if found["quoted"] is not None or found["key"] is not None:
            name = found["quoted"] if found["quoted"] is not None else found["key"]
            if not isinstance(value, dict) or name not in value:
                known = ", ".join(list(value)[:12]) if isinstance(value, dict) else type(value).__name__
                raise KeyError(f"no key {name!r} under {here} (there: {known})")
            value = value[name]
        elif found["index"] is not None:
            if not isinstance(value, list) or not -len(value) <= int(found["index"]) < len(value):
                raise KeyError(f"no item [{found['index']}] under {here}")
            value = value[int(found["index"])]
        else:
            matches = [item for item in value if isinstance(item, dict)
                       and str(item.get(found["field"])) == found["value"]] if isinstance(value, list) else []
            if len(matches) != 1:
                raise KeyError(f"{len(matches)} items with {found['field']} = {found['value']!r} under {here}")
            value = matches[0]
        walked.append(found.group(0))
    return value


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _parse(text: str) -> Decimal:
    return Decimal(text.replace(",", "").replace("−", "-"))


def rounded(value: Decimal, decimals: int) -> Decimal:
    """The file's value (from its shortest decimal form) at the text's precision, rounded half up."""
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def written(value: Decimal, like: str) -> str:
    """``value`` written the way ``like`` is: its sign style, thousands commas and decimals."""
    magnitude = f"{abs(value):,.{_decimals(like)}f}" if "," in like else f"{abs(value):.{_decimals(like)}f}"
    if value < 0:
        return ("−" if "−" in like else "-") + magnitude
    return ("+" if like.startswith("+") else "") + magnitude


def check(claim: Claim, root: Path = ROOT, cache: dict | None = None) -> tuple[str | None, Decimal | None]:
    """(problem, the file's value at the text's precision); the problem is None when the text agrees."""
    cache = {} if cache is None else cache
    path = result_path(claim.file, root)
    try:
        if path not in cache:
            cache[path] = json.loads(path.read_text())
        value = lookup(cache[path], claim.key)
    except FileNotFoundError:
        return f"{claim.text} is tagged with {claim.file}, which does not exist ({path.relative_to(root)})", None
    except json.JSONDecodeError as error:
        return f"{path.relative_to(root)} is not valid JSON ({error})", None
    except KeyError as error:
        return f"{claim.text}: {claim.file} key {claim.key}: {error.args[0]}", None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{claim.text}: {claim.file} key {claim.key} is {value!r}, not a number", None
    scaled = Decimal(repr(float(value))) * Decimal(claim.scale)
    expected = rounded(scaled, _decimals(claim.text))
    if expected != _parse(claim.text):
        shown = f"{value} *{claim.scale} = {scaled.normalize():f}" if claim.scale != "1" else f"{value}"
        return f"{claim.text} but {claim.file} key {claim.key} = {shown}", expected
    return None, expected


def documents(root: Path = ROOT) -> list[Path]:
    return [p.relative_to(root) for pattern in DOCUMENTS for p in sorted(root.glob(pattern))]


def mismatches(root: Path = ROOT) -> list[str]:
    """``DOCUMENT:LINE: problem`` for every tagged number that disagrees with its file (empty: all agree)."""
    cache: dict = {}
    problems = []
    for document in documents(root):
        for claim in find_claims(document, root):
            problem, _ = check(claim, root, cache)
            if problem:
                problems.append(f"{claim.document}:{claim.line}: {problem}")
    return problems


def fix(root: Path = ROOT) -> list[str]:
    """Rewrite every tagged number whose file says otherwise; return ``DOCUMENT:LINE: old -> new (source)``."""
    cache: dict = {}
    changes: list[tuple[Claim, str]] = []
    for document in documents(root):
        claims = find_claims(document, root)
        lines = (root / document).read_text().splitlines(keepends=True)
        for claim in reversed(claims):  # right to left: earlier spans on a line stay valid
            problem, expected = check(claim, root, cache)
            if problem and expected is not None:
                new = written(expected, claim.text)
                line = lines[claim.line - 1]
                lines[claim.line - 1] = line[:claim.start] + new + line[claim.end:]
                changes.append((claim, f"{document}:{claim.line}: {claim.text} -> {new} ({claim.source})"))
        if any(claim.document == document for claim, _ in changes):
            (root / document).write_text("".join(lines))
    return [change for claim, change in sorted(changes, key=lambda c: (str(c[0].document), c[0].line, c[0].start))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite tagged numbers from their result files")
    parser.add_argument("--list", action="store_true", help="print every tag and the file's value")
    args = parser.parse_args(argv)
    if args.list:
        cache: dict = {}
        for document in documents():
            for claim in find_claims(document):
                problem, expected = check(claim, cache=cache)
                print(f"{claim.document}:{claim.line}: {claim.text} <- {claim.source}"
                      + (f"   MISMATCH: {problem}" if problem else ""))
        return 0
    if args.fix:
        for change in fix():
            print(change)
    problems = mismatches()
    for problem in problems:
        print(problem)
    if not problems:
        count = sum(len(find_claims(d)) for d in documents())
        print(f"{count} tagged numbers in {len(documents())} documents agree with their result files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
