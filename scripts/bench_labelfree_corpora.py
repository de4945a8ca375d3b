"""Label-free on corpora nobody tuned on, in several languages and scripts: does it ever lose?

    apt-get update -o Acquire::Languages=en && apt-get install -y man-db manpages-zh manpages-ru manpages-de manpages-fr
    nice python scripts/bench_labelfree_corpora.py [--corpora pydoc,man-zh_CN,man-ru,man-de,man-fr,debian-packages]

Each corpus is a BEIR folder with judged queries: the pydoc demo corpus (docstring summary lines), Debian's
translated manual pages (scripts/manpages_corpus.py: a page per command, its NAME line's description the query) and
Debian's package descriptions, an entity search (scripts/debian_packages_corpus.py: a record per package titled by
its name, keyword queries from its synopsis).
The whole pipeline (configs/scifact_labelfree.yaml: data_prep, train, eval, export) runs on ``corpus.jsonl`` alone,
with no query, and decides what to ship (data_prep's tokenizer fit and probe, eval's probe after training); the
judged queries are read afterwards, by this script (scripts/labelfree_measure.py). Writes
``benchmarks/results/labelfree_corpora.json``::

    {"corpora": [{"name", "language", "passages", "pseudo_queries", "probe", "decision", "reason", "base", "bm25",
                  "student", "shipped", ...}, ...], "targets": {...}, "machine", "versions", "command"}

nDCG@10 in percent on each corpus's judged queries; ``student`` is null where no student was trained. Each entry
and the file record the commit, whether the tree was clean and the load average; a file written at another commit
is kept whole under ``other_runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import bench_command, run_recipe  # noqa: E402  (scripts/benchlib.py)
from debian_packages_corpus import build as build_debian_packages  # noqa: E402  (scripts/debian_packages_corpus.py)
from labelfree_measure import measure_run  # noqa: E402  (scripts/labelfree_measure.py)
from manpages_corpus import build as build_manpages  # noqa: E402  (scripts/manpages_corpus.py)

from embtune.cli import setup_logging  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LANGUAGES = {"pydoc": "English", "man-zh_CN": "Chinese", "man-ja": "Japanese", "man-ru": "Russian",
             "man-de": "German", "man-fr": "French", "debian-packages": "English"}


def judged_folder(name: str, root: Path, max_pages: int) -> tuple[Path, Path, str]:
    """(folder with judged queries, folder with corpus.jsonl alone, the judged split) of one corpus."""
    folder = root / name / "beir"
    corpus_only = folder / "corpus_only"
    if name == "pydoc":
        from embtune.data_prep.pydoc_corpus import build_pydoc_beir

        if not (folder / "corpus.jsonl").is_file():
            build_pydoc_beir(folder)
        corpus_only.mkdir(parents=True, exist_ok=True)
        if not (corpus_only / "corpus.jsonl").is_file():
            (corpus_only / "corpus.jsonl").write_text((folder / "corpus.jsonl").read_text())
        return folder, corpus_only, "test"
    if name == "debian-packages":
        if not (corpus_only / "corpus.jsonl").is_file():
            build_debian_packages(folder)
        return folder, corpus_only, "test"
    if not (corpus_only / "corpus.jsonl").is_file():
        build_manpages(name.removeprefix("man-"), folder, max_pages)
    return folder, corpus_only, "test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="pydoc,man-zh_CN,man-ru,man-de,man-fr,debian-packages")
    parser.add_argument("--config", default=str(ROOT / "configs" / "scifact_labelfree.yaml"))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "labelfree_corpora"))
    parser.add_argument("--max-pages", type=int, default=300, help="manual pages per language (seeded sample)")
    parser.add_argument("--documents", type=int, default=300, help="labelfree.documents: passages cut into queries")
    parser.add_argument("--out", default=str(RESULTS / "labelfree_corpora.json"))
    parser.add_argument("--keep-other-commits", action="store_true",
                        help="keep the file's entries for corpora not run now, though another commit ran them (each "
                             "entry records its own commit); by default a run at a new commit starts afresh")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))
    setup_logging()
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    state = {k: provenance.git.get(k) for k in ("commit", "tree_clean")}  # each corpus records them
    other_runs = previous.get("other_runs", [])
    if previous and previous.get("commit") != state["commit"] and not args.keep_other_commits:
        # a run at another commit: kept whole under other_runs, and this run starts the file's corpora afresh
        other_runs = [*other_runs, {k: v for k, v in previous.items() if k != "other_runs"}]
        previous = {}
    entries = {e["name"]: e for e in previous.get("corpora", [])}
    for name in args.corpora.split(","):
        folder, corpus_only, split = judged_folder(name, Path(args.run_root), args.max_pages)
        run_dir = Path(args.run_root) / name / "run"
        overrides = [f"run_dir={run_dir}", f"data.path={corpus_only}", "data.dev_fraction=0", "eval.split=test",
                     f"labelfree.documents={args.documents}", "tracking.report_to=none", *args.overrides]
        start = time.time()
        cfg, _, report, wall = run_recipe(args.config, overrides, stages=("data_prep", "train", "eval", "export"),
                                          read_results=False)
        measured = measure_run(cfg, run_dir, folder, split)
        lf = report["labelfree"]
        rows = measured["rows"]
        probe = lf["teacher_choice"]
        entries[name] = {
            "name": name, "language": LANGUAGES.get(name, name),
            "detected": {k: lf["language"].get(k) for k in ("language", "script", "bm25_language", "why")},
            "passages": lf["documents_in_corpus"], "pseudo_queries": lf["queries"],
            "probe": {k: probe.get(k) for k in ("queries", "dense_alone", "bm25_alone", "choice", "choice_mrr")},
            "tokenizer_fit": {k: lf["tokenizer_fit"].get(k) for k in ("unknown_share", "single_letter_share",
                                                                      "reads")},
            "decision": lf["decision"]["decision"], "reason": lf["decision"]["reason"],
            "base": rows.get("base"), "bm25": rows.get("bm25"), "student": rows.get("finetuned"),
            "base+bm25": rows.get("base+bm25_weighted"), "student+bm25": rows.get("finetuned+bm25_weighted"),
            "shipped": measured["shipped"]["ndcg@10"], "shipped_row": measured["shipped"]["row"],
            "chosen_by": measured["shipped"]["chosen_by"], "why": measured["shipped"]["why"],
            "post_training_probe_mrr@10": measured["shipped"]["evidence"],
            "judged_queries": measured["num_queries"], "dense_weight": measured["dense_weight"],
            "wall_seconds": {**wall, "total": round(time.time() - start, 1)}, "overrides": overrides,
            "probe_lexical_check": probe.get("lexical_check"), "deploy_lexical_check": measured["shipped"][
                "lexical_check"], **state, "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        e = entries[name]
        best_member = max(v for v in (e["base"], e["bm25"]) if v is not None)
        e["shipped_minus_best_member"] = round(e["shipped"] - best_member, 2)
        e["student_shipped_below_base"] = bool(e["shipped_row"].startswith("finetuned") and e["student"] is not None
                                               and e["base"] is not None and e["student"] < e["base"])
        print(json.dumps({k: e[k] for k in ("name", "decision", "base", "bm25", "student", "shipped",
                                             "shipped_row")}, ensure_ascii=False), flush=True)
        corpora = list(entries.values())
        out = {"benchmark": "labelfree_corpora",
               "description": "the label-free pipeline on corpora in several languages and scripts, each seen as "
                              "corpus.jsonl alone; nDCG@10 (percent) on the corpus's judged queries, read after the "
                              "pipeline decided; each entry's load_average says whether other jobs shared the cores",
               "corpora": corpora,
               "targets": {"shipped_never_more_than_0.5_below_best_of_base_and_bm25":
                           all(c["shipped_minus_best_member"] >= -0.5 for c in corpora),
                           "no_student_below_base_shipped": not any(c["student_shipped_below_base"]
                                                                    for c in corpora),
                           # issue 32: where a student is trained, it does not make the hybrid worse
                           "student+bm25_never_more_than_0.5_below_base+bm25": all(
                               c["student+bm25"] >= c["base+bm25"] - 0.5 for c in corpora
                               if c["student+bm25"] is not None and c["base+bm25"] is not None)},
               "commands": sorted({*previous.get("commands", []), bench_command(sys.argv)}),
               **provenance.record(), "other_runs": other_runs}
        out_path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
