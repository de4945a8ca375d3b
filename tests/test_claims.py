"""The published numbers are the measured ones: every tagged number in README.md and docs/*.md equals its result file.

Tagging scheme and rounding rules: scripts/check_claims.py. ``python scripts/check_claims.py --fix`` rewrites the
text after a benchmark is rerun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from check_claims import documents, find_claims, fix, lookup, main, mismatches  # noqa: E402


def test_readme_and_docs_agree_with_the_result_files():
    problems = mismatches()
    assert not problems, "numbers in the text differ from their result files " \
                         "(python scripts/check_claims.py --fix rewrites them):\n" + "\n".join(problems)


def test_the_headline_numbers_are_tagged():
    """The check is only as good as its tags: the README's headline figures must carry them."""
    readme = find_claims(Path("README.md"))
    assert len(readme) >= 40
    tagged_files = {claim.file for claim in readme}
    assert {"demo.json", "scifact_supervised.json", "scifact_labelfree.json", "labelfree_corpora.json",
            "serve_parity.json", "encode_speed.json"} <= tagged_files


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "demo.json").write_text(json.dumps({
        "results": {"finetuned": {"ndcg@10": 70.81}, "base": {"ndcg@10": 64.875}},
        "specs": [{"name": "dense", "mismatched_queries": 0}, {"name": "hybrid", "mismatched_queries": 3}],
        "share": 0.9804, "docs": 1372.0, "delta": -0.0812, "weights": {"dense 0.7": 73.11}}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "fine-tuned **70.81**<!-- demo.json:results.finetuned.ndcg@10 --> against 64.88<!-- "
        "demo.json:results.base.ndcg@10 -->\n"
        "| hybrid | 3<!-- demo.json:specs[name=hybrid].mismatched_queries --> | 98.0%<!-- demo.json:share *100 --> |\n"
        "on 1,372<!-- demo.json:docs --> pairs, −8.12<!-- demo.json:delta *100 -->, "
        '73.11<!-- demo.json:weights["dense 0.7"] --> untagged 12.34\n')
    (tmp_path / "docs" / "x.md").write_text(
        "dense: 0<!-- demo.json:specs[0].mismatched_queries --> differ\n"
        "an example, not a claim: `1.00<!-- demo.json:share -->`\n"
        "```\n2.00<!-- demo.json:share -->\n```\n")
    return tmp_path


def test_agreeing_text_passes_at_its_own_precision(tree: Path):
    """64.875 is written 64.88 (half up), a fraction tagged *100 as percent, a list item picked by name; tags in
    code spans and fenced blocks are examples, not claims."""
    assert mismatches(tree) == []
    assert [c.text for d in documents(tree) for c in find_claims(d, tree)] == [
        "70.81", "64.88", "3", "98.0", "1,372", "−8.12", "73.11", "0"]


@pytest.mark.parametrize("old, new, message", [
    ("**70.81**", "**70.65**", "README.md:1: 70.65 but demo.json key results.finetuned.ndcg@10 = 70.81"),
    ("64.88<!--", "64.87<!--", "README.md:1: 64.87 but demo.json key results.base.ndcg@10 = 64.875"),
    ("98.0%", "98.1%", "README.md:2: 98.1 but demo.json key share = 0.9804 *100 = 98.04"),
    ("demo.json:docs", "demo.json:doc", "README.md:3: 1,372: demo.json key doc: no key 'doc' under the top level"),
    ("demo.json:docs", "gone.json:docs", "README.md:3: 1,372 is tagged with gone.json, which does not exist"),
])
def test_a_number_changed_by_hand_fails(tree: Path, old: str, new: str, message: str):
    readme = tree / "README.md"
    readme.write_text(readme.read_text().replace(old, new, 1))
    problems = mismatches(tree)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_fix_rewrites_the_text_from_the_files(tree: Path):
    readme = tree / "README.md"
    original = readme.read_text()
    readme.write_text(original.replace("**70.81**", "**70.65**").replace("1,372<", "1,300<")
                      .replace("−8.12", "−8.00"))
    changes = fix(tree)
    assert changes == ["README.md:1: 70.65 -> 70.81 (demo.json:results.finetuned.ndcg@10)",
                       "README.md:3: 1,300 -> 1,372 (demo.json:docs)",
                       "README.md:3: −8.00 -> −8.12 (demo.json:delta *100)"]
    assert readme.read_text() == original and mismatches(tree) == []


def test_lookup_names_what_is_missing():
    data = {"specs": [{"name": "a", "v": 1}], "x": {"y.z": 2}}
    assert lookup(data, '["x"]["y.z"]') == 2 and lookup(data, "specs[name=a].v") == 1
    with pytest.raises(KeyError, match="0 items with name = 'b' under specs"):
        lookup(data, "specs[name=b].v")


def test_cli_prints_mismatches_and_fails(tmp_path: Path, capsys, monkeypatch):
    """The CLI on the real tree: exit 0 and a count when everything agrees."""
    assert main([]) == 0
    assert "agree with their result files" in capsys.readouterr().out
