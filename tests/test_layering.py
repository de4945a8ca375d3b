"""The layout keeps its layers: the contracts catch a misplaced import, nothing generic is installed, every package
folder is installed, and no module is imported by a string the linter cannot see."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from lint_layers import lay_out, package_dirs  # noqa: E402
from lint_layers import lint as run_lint  # noqa: E402

STAGES = ("data_prep", "train", "eval", "serve")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return run_lint(tree, capture=True)


def test_the_tree_as_installed_keeps_every_contract(tmp_path):
    done = lint(lay_out(tmp_path / "tree"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" not in done.stdout.split("Contracts:")[-1].split(",")[0]


@pytest.mark.parametrize("folder, line, contract", [
    # a new core file, named nowhere in the contracts, that reaches up into a stage
    ("embtune/retrieval/_misplaced.py", "from embtune.train import recipe\n", "embtune.train is imported only"),
    # a new core file that reaches the wiring
    ("embtune/_misplaced.py", "import embtune.pipeline.report\n", "The wiring (embtune.pipeline)"),
    # a stage that imports another stage
    ("serve/_misplaced.py", "from embtune.eval.metrics import evaluate\n", "embtune.eval is imported only"),
    # a stage that imports the wiring
    ("data_prep/_misplaced.py", "from embtune.pipeline import run\n", "The wiring (embtune.pipeline)"),
])
def test_a_misplaced_import_is_caught(tmp_path, folder, line, contract):
    tree = lay_out(tmp_path / "tree")
    package, _, rest = folder.partition("/")
    installed = {v: k for k, v in package_dirs().items()}[package].replace(".", "/")
    (tree / installed / rest).write_text(f'"""A module in the wrong layer."""\n\n{line}')
    done = lint(tree)
    assert done.returncode != 0
    broken = [block for block in done.stdout.split("\n\n") if contract in block and "BROKEN" in block]
    assert broken, done.stdout
    assert "_misplaced" in done.stdout


def test_every_package_folder_is_installed():
    mapped = package_dirs()
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for package, folder in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in listed, f"{init.parent} holds a package ({name}) that pyproject.toml does not install"


def test_installed_under_the_projects_name_only(tmp_path):
    """Outside the checkout the stages import as embtune.<stage> and not under their generic folder names."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, sys\n"
            f"generic = [n for n in {STAGES + ('pipeline',)!r} if importlib.util.find_spec(n)]\n"
            f"ours = [n for n in {tuple('embtune.' + s for s in STAGES + ('pipeline',))!r} "
            "if importlib.util.find_spec(n) is None]\n"
            "print(generic, ours); sys.exit(1 if generic or ours else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_imported_by_a_string():
    """importlib.import_module / __import__ with a computed name hides an edge from the contracts."""
    offenders = []
    for folder in package_dirs().values():
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    if name in ("import_module", "__import__"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"modules imported by string: {offenders}"


def test_entry_points_resolve():
    for name in ("embtune.pipeline.__main__", "embtune.data_prep.__main__", "embtune.train.__main__",
                 "embtune.eval.__main__", "embtune.serve.__main__"):
        assert importlib.util.find_spec(name) is not None, name
