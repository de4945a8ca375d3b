"""Every benchmark result file says which code made it: commit, clean tree, command, machine, load, versions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from embtune.manifest import Provenance, command_line, git_state

ROOT = Path(__file__).resolve().parents[1]
READERS = {"benchlib.py", "check_claims.py"}  # name benchmarks/results/ but write no result file of their own


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "old.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_git_state_commit_and_clean_tree(repo: Path):
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(repo) == {"commit": head, "tree_clean": True, "changed_files": []}


def test_run_outputs_do_not_make_the_tree_unclean(repo: Path):
    (repo / "benchmarks" / "results" / "old.json").write_text('{"rewritten": 1}\n')
    (repo / "benchmarks" / "results" / "new.json").write_text("{}\n")
    assert git_state(repo)["tree_clean"] is True


@pytest.mark.parametrize("change", ["modified", "untracked"])
def test_changed_code_makes_the_tree_unclean(repo: Path, change: str):
    if change == "modified":
        (repo / "code.py").write_text("x = 2\n")
    else:
        (repo / "new_module.py").write_text("y = 1\n")
    state = git_state(repo)
    assert state["tree_clean"] is False
    assert state["changed_files"] == ["code.py" if change == "modified" else "new_module.py"]


def test_outside_a_checkout_nothing_is_claimed(tmp_path: Path):
    assert git_state(tmp_path) == {"commit": None, "tree_clean": None, "changed_files": None}


def test_record_has_every_provenance_key():
    provenance = Provenance.start("python scripts/bench_x.py --flag")
    record = provenance.record(packages=("numpy", "no-such-package-xyz"))
    assert record["command"] == "python scripts/bench_x.py --flag"
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert isinstance(record["tree_clean"], bool)
    assert record["machine"]["cpu_model"] and isinstance(record["machine"]["vector_flags"], list)
    assert len(record["load_average"]["start"]) == 3 and len(record["load_average"]["end"]) == 3
    assert record["versions"]["numpy"] and record["versions"]["no-such-package-xyz"] is None


def test_command_line_names_the_script_relative_to_the_checkout():
    argv = [str(ROOT / "scripts" / "bench_demo.py"), "--cache", "cold", "a b"]
    assert command_line(argv, ROOT) == "python scripts/bench_demo.py --cache cold 'a b'"


def test_every_script_writing_results_records_provenance():
    """A benchmark that writes under benchmarks/results/ takes its provenance from the one helper, not by hand."""
    writers = [p for p in sorted((ROOT / "scripts").glob("*.py"))
               if re.search(r"benchmarks/results|\"benchmarks\" / \"results\"", p.read_text())
               and p.name not in READERS]
    assert len(writers) >= 15
    missing = [p.name for p in writers if "Provenance" not in p.read_text()]
    hand_made = [p.name for p in writers if re.search(r"\"machine\": machine\(\)|\"versions\": versions\(\)",
                                                      p.read_text())]
    assert not missing, f"scripts writing benchmark results without embtune.manifest.Provenance: {missing}"
    assert not hand_made, f"scripts recording machine/versions by hand instead of Provenance.record(): {hand_made}"
