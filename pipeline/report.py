"""The run report: ``<run_dir>/report/index.html``, one page that ties a run's config, data, training and results.

    python -m embtune.pipeline.report RUN_DIR            # (re)build it from the stage outputs
    python -m embtune.pipeline.report RUN_DIR --check    # and check that every image and link on it resolves

``embtune.pipeline`` builds it at the end of every run. It reads only files the stages wrote, so it works on any run
directory, also one where some stages never ran (the page says which):

==============================  ==============================================================================
``<stage>/manifest.json``       each stage's config, inputs, outputs and wall time; train's ``log_history``
                                (the trainer's logged loss, learning rate and dev metrics per step)
``data_prep/report.json``       counts: train/dev queries, rows, loader skips, mining drops per guard, synthesis
``eval/results.json``           metrics per model and Matryoshka dim, per-query nDCG@10, significance
``eval/sweep.json``, ``.png``   the deployment sweep, when ``eval.sweep.enabled``
``config.yaml``                 the resolved recipe (written by ``embtune.pipeline``)
==============================  ==============================================================================

The page is self-contained on disk: PNGs (matplotlib, Agg) beside it and relative links into the run directory,
so the folder opens from a file manager or ``file://`` with no server. :func:`check_report` verifies that every
local ``<img src>`` and ``<a href>`` exists and that each PNG decodes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from embtune.cli import exit_code
from embtune.config import InputError
from embtune.retrieval.metrics import METRICS

logger = logging.getLogger(__name__)

STAGES = ("data_prep", "train", "eval", "export")
REPORT_DIR = "report"
CONFIG_FILE = "config.yaml"
DPI = 90
CLEANING_TOTALS = ("documents", "lines", "kept")  # synthesis cleaning counts that are not drops


@dataclass
class RunFiles:
    """What a run directory holds, read once; a missing file is ``None`` (or empty), never an error."""

    run_dir: Path
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    data_report: dict[str, Any] | None = None
    sweep_rows: list[dict[str, Any]] | None = None
    problems: list[str] = field(default_factory=list)  # unreadable files, shown on the page

    def read_json(self, path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.problems.append(f"{path.relative_to(self.run_dir)} is not valid JSON ({err})")
            return None

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunFiles":
        run = cls(Path(run_dir))
        for stage in STAGES:
            manifest = run.read_json(run.run_dir / stage / "manifest.json")
            if manifest is not None:
                run.manifests[stage] = manifest
        run.results = run.read_json(run.output("eval", "results", "eval/results.json"))
        run.data_report = run.read_json(run.output("data_prep", "report", "data_prep/report.json"))
        sweep = run.read_json(run.output("eval", "sweep", "eval/sweep.json"))
        run.sweep_rows = sweep.get("rows") if isinstance(sweep, dict) else None
        return run

    def output(self, stage: str, key: str, default: str) -> Path:
        """Where the stage writes an output in this run directory, else the (absolute) path its manifest names.

        The run directory comes first: manifests record absolute paths, and a copied or moved run directory should
        link its own files, not the original's.
        """
        local = self.run_dir / default
        named = self.manifests.get(stage, {}).get("outputs", {}).get(key)
        return local if local.exists() or not named else Path(named)


# --------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; also what a CI machine or a headless server has
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path.name


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> str | None:
    """Training loss per step (and the dev metrics the trainer logged, when ``train.eval_steps`` was set)."""
    steps = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    dev = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("ndcg@10") and isinstance(value, (int, float)):
                dev.setdefault(key[len("eval_"):], []).append((entry["step"], value))
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=DPI)
    ax.plot(*zip(*steps), marker="o" if len(steps) < 40 else None, ms=3, lw=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, lw=0.3)
    if dev:
        right = ax.twinx()
        for name, points in dev.items():
            right.plot(*zip(*points), color="tab:green", marker="s", ms=3, lw=1, label=name)
        right.set_ylabel("dev nDCG@10")
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(f"Training loss ({len(steps)} logged steps)", fontsize=10)
    return _save(fig, path)


def dense_and_flat_rows(results: dict[str, Any]) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """nDCG@10 per Matryoshka dim for models that have dims; one number for the rows that do not (BM25, hybrids)."""
    dense, flat = {}, {}
    for name, metrics in results.items():
        dims = metrics.get("dims") or {}
        if dims:
            dense[name] = {int(d): v["ndcg@10"] for d, v in dims.items()}
        elif "ndcg@10" in metrics:
            flat[name] = metrics["ndcg@10"]
    return dense, flat


def plot_dims(results: dict[str, Any], path: Path) -> str | None:
    """nDCG@10 against Matryoshka dim for each dense model; BM25 and the hybrids (one ranking each) as lines."""
    dense, flat = dense_and_flat_rows(results)
    if not dense and not flat:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=DPI)
    all_dims = sorted({d for dims in dense.values() for d in dims})
    for name, dims in dense.items():
        xs = sorted(dims)
        ax.plot(xs, [100 * dims[d] for d in xs], marker="o", lw=1.5, label=name)
    styles = iter(["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))] * 4)
    for name, value in flat.items():
        ax.axhline(100 * value, color="grey" if name == "bm25" else None, ls=next(styles), lw=1.1,
                   label=f"{name} (no dims)")
    if all_dims:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.minorticks_off()
    ax.set_xlabel("embedding dimension (Matryoshka truncation)")
    ax.set_ylabel("nDCG@10 (%)")
    ax.grid(True, lw=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("nDCG@10 per dimension", fontsize=10)
    return _save(fig, path)


def per_query_differences(per_query: dict[str, Any], a: str, b: str, metric: str = "ndcg@10") -> list[float]:
    """``a - b`` per query both rows scored (the same pairing eval's significance test uses)."""
    qa, qb = per_query.get(a, {}), per_query.get(b, {})
    return [qa[q][metric] - qb[q][metric] for q in sorted(set(qa) & set(qb))]


def comparison_pairs(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The pairs to draw: eval's significance pairs (``"a vs b"``), else fine-tuned vs base when both exist."""
    pairs = [tuple(key.split(" vs ", 1)) for key in (results.get("significance") or {}) if " vs " in key]
    if not pairs and {"finetuned", "base"} <= set(results.get("per_query", {})):
        pairs = [("finetuned", "base")]
    return pairs[:4]


def plot_differences(per_query: dict[str, Any], pairs: list[tuple[str, str]], path: Path) -> str | None:
    """Histogram of per-query nDCG@10 differences for each pair: wins right of zero, losses left; ties counted."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    panels = [(a, b, per_query_differences(per_query, a, b)) for a, b in pairs]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    plt = _pyplot()
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.4 * nrows), dpi=DPI, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    bins = np.linspace(-100, 100, 41)  # nDCG@10 differences lie in [-100, 100] points; 5-point bins
    for ax, (a, b, diffs) in zip(axes.flat, panels):
        diffs = 100 * np.asarray(diffs)
        wins, losses = diffs[diffs > 1e-7], diffs[diffs < -1e-7]
        ties = len(diffs) - len(wins) - len(losses)
        ax.hist(wins, bins=bins, color="tab:green", label=f"{a} better: {len(wins)}")
        ax.hist(losses, bins=bins, color="tab:red", label=f"{b} better: {len(losses)}")
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(diffs.mean(), color="tab:blue", ls="--", lw=1, label=f"mean {diffs.mean():+.2f} points")
        ax.set_title(f"{a} - {b}\n{len(diffs)} queries, {ties} ties (not drawn)", fontsize=9)
        ax.set_xlabel("per-query nDCG@10 difference (points)")
        ax.set_ylabel("queries")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(True, lw=0.3)
    return _save(fig, path)


def data_counts(report: dict[str, Any], manifest: dict[str, Any] | None) -> tuple[list[tuple[str, Any]],
                                                                                   list[tuple[str, str, int]]]:
    """(counts table, drops as (step, reason, count)) from data_prep's report.json."""
    mining = report.get("mining") or {}
    config = (manifest or {}).get("config", {})
    negatives = (config.get("mining") or {}).get("num_negatives")
    if (config.get("mining") or {}).get("method") == "none":
        negatives = 0
    counts: list[tuple[str, Any]] = [
        ("training queries", report.get("train_queries")),
        ("dev queries (carved from train)", report.get("dev_queries")),
        ("training rows", report.get("rows")),
        ("hard negatives per row", negatives),
        ("hard negatives in total", report["rows"] * negatives if negatives is not None and "rows" in report
         else None),
        ("mining: window candidates", mining.get("candidates")),
        ("mining: rows filled with random negatives", mining.get("pairs_filled_with_random")),
        ("mining: queries dropped (too few negatives)", mining.get("queries_dropped")),
    ]
    drops = [("load", reason, n) for reason, n in ((report.get("load") or {}).get("skipped") or {}).items()]
    drops += [("mining", guard, n) for guard, n in (mining.get("dropped") or {}).items()]
    synthesis = report.get("synthesis")
    if synthesis:
        cleaning = synthesis.get("cleaning") or {}
        round_trip = synthesis.get("round_trip") or {}
        counts += [("synthesis: passages to choose from", synthesis.get("passages")),
                   ("synthesis: passages sent to the LLM", cleaning.get("documents", synthesis.get("documents"))),
                   ("synthesis: answer lines", cleaning.get("lines")),
                   ("synthesis: queries after cleaning", cleaning.get("kept")),
                   ("synthesis: queries after the round trip", synthesis.get("queries"))]
        # The other cleaning counts are totals, not drops (see data_prep/synthesize.py: clean_queries).
        drops += [("synthesis", reason, n) for reason, n in cleaning.items()
                  if reason not in CLEANING_TOTALS and isinstance(n, int)]
        if "dropped" in round_trip:
            drops.append(("round trip", f"not in {round_trip.get('mode')} top {round_trip.get('k')}",
                          round_trip["dropped"]))
    return [(k, v) for k, v in counts if v is not None], drops


def plot_drops(drops: list[tuple[str, str, int]], path: Path) -> str | None:
    """One horizontal bar per (step, guard) that dropped something: the loader, synthesis and mining guards."""
    drops = [d for d in drops if d[2]]
    if not drops:
        return None
    plt = _pyplot()
    steps = list(dict.fromkeys(step for step, _, _ in drops))
    colours = dict(zip(steps, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(drops)), dpi=DPI)
    labels = [f"{step}: {reason}" for step, reason, _ in drops]
    bars = ax.barh(range(len(drops)), [n for _, _, n in drops], color=[colours[s] for s, _, _ in drops])
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(range(len(drops)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("dropped (candidates, queries or documents)")
    ax.set_title("What each guard dropped", fontsize=10)
    ax.margins(x=0.12)
    ax.grid(True, axis="x", lw=0.3)
    return _save(fig, path)


def pareto_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, the sweep rows no cheaper row beats on nDCG@10 (cheapest first)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        best = -1.0
        for row in sorted((r for r in rows if r["model"] == model),
                          key=lambda r: (r["bytes_per_vector"], -r["ndcg@10"])):
            if row["ndcg@10"] > best:
                out.append(row)
                best = row["ndcg@10"]
    return out


# --------------------------------------------------------------------------------------------------- the page
def _rel(path: str | Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()


def _files(run: RunFiles, out: Path) -> list[dict[str, Any]]:
    """The links of the Files section: (label, relative href) for each file that exists, else a note."""
    candidates = [("resolved config", run.run_dir / CONFIG_FILE)]
    candidates += [(f"{stage} manifest", run.run_dir / stage / "manifest.json") for stage in STAGES]
    candidates.append(("bundle manifest", run.output("export", "bundle", "bundle") / "manifest.json"))
    candidates += [("eval results (per model, per query)", run.output("eval", "results", "eval/results.json")),
                   ("eval table", run.output("eval", "table", "eval/table.txt")),
                   ("data_prep report", run.output("data_prep", "report", "data_prep/report.json")),
                   ("mining report (per query)",
                    run.output("data_prep", "mining_report", "data_prep/mining_report.json")),
                   ("deployment sweep (JSON)", run.output("eval", "sweep", "eval/sweep.json")),
                   ("deployment sweep (table)", run.output("eval", "sweep_table", "eval/sweep.txt"))]
    return [{"label": label, "href": _rel(path, out) if path.exists() else None, "name": path.name}
            for label, path in candidates]


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("embtune.pipeline", "templates"),
                      autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.2f}"
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else ("" if v is None else str(v))
    return env


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/index.html`` and its PNGs from the stage outputs; returns the page's path."""
    run = RunFiles.load(run_dir)
    out = run.run_dir / REPORT_DIR
    if out.exists():
        shutil.rmtree(out)  # no stale PNG of an earlier build may outlive the section it belonged to
    out.mkdir(parents=True)
    figures: dict[str, str | None] = {}

    train = run.manifests.get("train")
    log_history = (train or {}).get("log_history") or []
    figures["loss"] = plot_loss(log_history, out / "loss.png")
    final = next((e for e in reversed(log_history) if "train_loss" in e), {})
    train_config = (train or {}).get("config", {}).get("train", (train or {}).get("config", {}))
    training = None
    if train:
        training = {"base_model": train_config.get("base_model"), "loss": train_config.get("loss"),
                    "matryoshka_dims": train_config.get("matryoshka_dims"), "epochs": train_config.get("epochs"),
                    "learning_rate": train_config.get("learning_rate"),
                    "batch_size": train.get("global_batch_size") or train_config.get("batch_size"),
                    "world_size": train.get("world_size"), "steps": final.get("step"),
                    "train_loss": final.get("train_loss"), "runtime_s": final.get("train_runtime")}

    results = run.results or {}
    rows = results.get("results") or {}
    figures["dims"] = plot_dims(rows, out / "dims.png")
    pairs = comparison_pairs(results)
    figures["differences"] = plot_differences(results.get("per_query") or {}, pairs, out / "per_query_diff.png")
    dense, _ = dense_and_flat_rows(rows)
    dim_table = {"dims": sorted({d for dims in dense.values() for d in dims}, reverse=True), "rows": dense}

    counts, drops = data_counts(run.data_report, run.manifests.get("data_prep")) if run.data_report else ([], [])
    figures["drops"] = plot_drops(drops, out / "drops.png")

    sweep_png = run.output("eval", "sweep_plot", "eval/sweep.png")
    figures["sweep"] = None
    if run.sweep_rows is not None and sweep_png.is_file():
        # eval draws the sweep (eval/sweep.py owns that plot); the report keeps its own copy beside the page.
        shutil.copyfile(sweep_png, out / "sweep.png")
        figures["sweep"] = "sweep.png"

    stages = []
    for stage in STAGES:
        manifest = run.manifests.get(stage)
        stages.append({"name": stage, "ran": manifest is not None,
                       "wall_seconds": (manifest or {}).get("wall_seconds"),
                       "finished_at": (manifest or {}).get("finished_at"),
                       "fingerprint": (manifest or {}).get("fingerprint"),
                       "href": _rel(run.run_dir / stage / "manifest.json", out) if manifest else None})

    html = _environment().get_template("report.html.j2").render(
        run_name=run.run_dir.resolve().name, run_dir=str(run.run_dir.resolve()),
        built_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"), stages=stages, problems=run.problems,
        figures=figures, training=training, log_history_steps=sum(1 for e in log_history if "loss" in e),
        results=results if run.results is not None else None, metrics=METRICS, rows=rows, dim_table=dim_table,
        significance=results.get("significance") or {}, counts=counts, drops=drops,
        data_report=run.data_report, sweep_rows=pareto_rows(run.sweep_rows) if run.sweep_rows else None,
        sweep_total=len(run.sweep_rows or []), files=_files(run, out),
        config_href=_rel(run.run_dir / CONFIG_FILE, out) if (run.run_dir / CONFIG_FILE).is_file() else None,
    )
    page = out / "index.html"
    page.write_text(html, encoding="utf-8")
    logger.info("run report: %s", page)
    return page


def write_config(cfg, run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """The resolved recipe as ``<run_dir>/config.yaml`` (what the report links as the run's config)."""
    import shlex

    import yaml

    from embtune.config import to_dict

    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved from {cfg.source or '<defaults>'}"
    header += f" with overrides: {shlex.join(overrides)}\n" if overrides else " (no overrides)\n"
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------- the check
class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []  # (tag, url)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {"img": "src", "a": "href", "link": "href", "script": "src"}.get(tag)
        for name, value in attrs:
            if name == attr and value:
                self.refs.append((tag, value))


def check_report(page: str | Path) -> list[str]:
    """Problems with a report page: local images and links that do not exist, PNGs that do not decode.

    Remote URLs (``http(s)://``, ``mailto:``) and in-page anchors (``#...``) are not checked; a report links none
    but anchors. Returns an empty list when the page is whole.
    """
    import matplotlib.image as mpimg

    page = Path(page)
    if not page.is_file():
        return [f"{page} does not exist"]
    parser = _References()
    parser.feed(page.read_text(encoding="utf-8"))
    problems = []
    for tag, url in parser.refs:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "mailto") or url.startswith("#"):
            continue
        if parsed.scheme not in ("", "file"):
            problems.append(f"<{tag}> {url}: unexpected scheme {parsed.scheme!r}")
            continue
        target = Path(unquote(parsed.path))
        target = target if target.is_absolute() else page.parent / target
        if not target.exists():
            problems.append(f"<{tag}> {url}: {target} does not exist")
            continue
        if tag == "img" or target.suffix.lower() == ".png":
            try:
                image = mpimg.imread(target)
            except Exception as err:  # PIL raises several error types for a truncated or non-PNG file
                problems.append(f"<{tag}> {url}: {target} does not decode as an image ({err})")
                continue
            if image.ndim < 2 or min(image.shape[:2]) < 1:
                problems.append(f"<{tag}> {url}: {target} has no pixels")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embtune.pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a pipeline run directory (run_dir in the recipe)")
    parser.add_argument("--check", action="store_true", help="then check the page's images and links (exit 1 if not)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    problems: list[str] = []

    def work() -> None:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise InputError(f"run directory {run_dir} does not exist (give the run_dir of a pipeline run)")
        if not any((run_dir / stage / "manifest.json").is_file() for stage in ("data_prep", "train", "eval", "export")):
            raise InputError(f"{run_dir} holds no stage manifest (data_prep/, train/, eval/ or export/"
                             "manifest.json): run `python -m embtune.pipeline CONFIG` there first")
        page = build_report(run_dir)
        print(f"report: {page}")
        if args.check:
            problems.extend(check_report(page))
            for problem in problems:
                print(f"broken: {problem}", file=sys.stderr)

    code = exit_code(work, debug=args.debug)
    return code or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
