"""Check the layering with import-linter on the package tree as it installs.

The stages keep their top-level folders in the checkout (``train/``, ...) but install as ``embtune.train``, ...
(``[tool.setuptools] package-dir`` in pyproject.toml). import-linter (through grimp) finds a package's modules by
walking its folder, so on the checkout it would see ``embtune/`` without the stages mapped into it. This script
lays the tree out as a wheel would (a copy under ``build/layers/``, from the same ``package-dir`` table) and runs
``lint-imports`` there, so the contracts, written by package, cover every file in every folder.

    python scripts/lint_layers.py            # exit 0 when every contract is kept
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{package: folder}`` from ``[tool.setuptools] package-dir``, the top package first."""
    table = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return dict(sorted(table.items(), key=lambda item: item[0].count(".")))


def lay_out(out: Path, root: Path = ROOT) -> Path:
    """Copy the Python sources into ``out`` in their installed layout; return ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    for package, folder in package_dirs(root / "pyproject.toml").items():
        target = out.joinpath(*package.split("."))
        if target.exists():
            raise SystemExit(f"lint_layers: {folder}/ would land on {target}, which another folder already fills")
        shutil.copytree(root / folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def lint(tree: Path, capture: bool = False) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts over a laid-out ``tree``."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    # lint-imports puts its working directory first on sys.path: run it in the laid-out tree.
    return subprocess.run([str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=tree,
                          capture_output=capture, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT / "build" / "layers", help="where to lay the tree out")
    args = parser.parse_args(argv)
    return lint(lay_out(args.tree)).returncode


if __name__ == "__main__":
    sys.exit(main())
