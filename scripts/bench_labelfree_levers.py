"""Levers beyond the dev screen for a label-free student that adds to BM25 (issue 32), read on every SciFact train
query.

Label-free training reads no labelled query, so all 809 SciFact *train* queries are unseen by every student here:
the dev half (404, ``data.dev_fraction=0.5``, seeded) that the variants of ``scifact_labelfree_dev.json`` were chosen
on, and the other half (405) that no choice has read. The other half says how much of a dev gain was the pick of
the best of many variants on 404 queries. Rows (each a query encoder against data_prep's base-model index):

- ``default``: the default recipe's student (``configs/scifact_labelfree.yaml``, eval on dev so test is not read);
- ``wise_a<alpha>``: its query encoder's weights interpolated with the base model's, ``(1 - a) base + a student``
  (WiSE-FT, Wortsman et al. 2022), a=1 being the student;
- ``round2``: the training table relabelled by the student's own hybrid (its queries against the base index, fused
  with BM25 at the teacher's weight: a better teacher on dev), and a student trained from the base model on it;
- ``graph_teacher``: the table relabelled by the teacher's fused scores smoothed over each candidate's ``m`` nearest
  passages in the base index, ``s(d) + g * mean(s(neighbours))`` (the cluster hypothesis; a neighbour outside the
  candidates gets the query's lowest fused score), ``m`` and ``g`` the teacher's best on the dev half
  (``teacher_sweep``), and a student trained from the base model on it.

Each row: nDCG@10 of the student's queries alone, of student + BM25 and base + BM25 (the teacher's fusion, the
teacher's weight), and the paired difference (student + BM25 minus base + BM25, ``diff``) with its 95% interval and
randomization p, on the dev half, the other half and all 809.

    python scripts/bench_labelfree_levers.py

Writes ``benchmarks/results/scifact_labelfree_levers.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_scifact_labelfree import base_index_and_teacher, labelled_queries, query_side_scores  # noqa: E402
from benchlib import bench_command, run_recipe, write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.cli import setup_logging  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "scifact_labelfree.yaml"
ALPHAS = (0.25, 0.5, 0.75)
GRAPH_NEIGHBOURS = (1, 2, 3, 5, 10)  # teacher_sweep: m
GRAPH_WEIGHTS = (0.1, 0.2, 0.4, 0.7, 1.0)  # teacher_sweep: g


def recipe(run_dir: Path, stages: tuple[str, ...]):
    """The default recipe's ``stages`` in ``run_dir``, evaluation split dev (test is not read), no wandb."""
    cfg, _, _, wall = run_recipe(str(CONFIG), [f"run_dir={run_dir}", "eval.split=dev", "tracking.report_to=none"],
                                 stages=stages, read_results=False)
    return cfg, wall


def student_of(run_dir: Path) -> str:
    return json.loads((run_dir / "train" / "manifest.json").read_text())["outputs"]["model"]


def interpolate(student: str, alpha: float, out: Path) -> str:
    """The student with its query route's weights at ``(1 - alpha) * base + alpha * student``; the document route
    (the base model, ``train.document_side: base``) is the base the query route started from."""
    from embtune.retrieval.encoder import load_encoder

    model, _ = load_encoder(student, 0)
    state = model.state_dict()
    mixed = {}
    for name, value in state.items():
        if ".sub_modules.query." in name and value.is_floating_point():
            base = state[name.replace(".sub_modules.query.", ".sub_modules.document.")]
            value = (1 - alpha) * base + alpha * value
        mixed[name] = value
    model.load_state_dict(mixed)
    model.save(str(out))
    return str(out)


def neighbours(doc_emb: np.ndarray, m: int) -> np.ndarray:
    """(n_docs, m) rows of each passage's ``m`` nearest other passages in the base index (cosine)."""
    sims = doc_emb @ doc_emb.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :m]


def smooth(fused: dict, doc_ids: list[str], nbrs: np.ndarray, g: float) -> dict:
    """Each candidate's fused score plus ``g`` times the mean fused score of its neighbours (the query's lowest
    score for a neighbour outside its candidates)."""
    position = {d: i for i, d in enumerate(doc_ids)}
    out = {}
    for q, docs in fused.items():
        low = min(docs.values())
        out[q] = {d: s + g * float(np.mean([docs.get(doc_ids[j], low) for j in nbrs[position[d]]]))
                  for d, s in docs.items()}
    return out


def dev_teacher(cfg):
    """The dev half's base index and teacher runs (``base_index_and_teacher``), the teacher's fused run (query ids
    ``"0".."n-1"``), and ``ndcg(run)``: nDCG@10 in percent of such a run on the dev half's qrels."""
    from embtune.eval import score
    from embtune.retrieval.fusion import weighted_fuse

    query_ids, texts, qrels = labelled_queries(cfg, "dev")
    setup = base_index_and_teacher(cfg, texts)
    mapping = {str(i): q for i, q in enumerate(query_ids)}

    def ndcg(run: dict) -> float:
        return round(100 * score(qrels, {mapping[i]: d for i, d in run.items()}, "t").metrics["ndcg@10"], 2)

    return setup, texts, weighted_fuse(setup["dense"], setup["sparse"], setup["weight"], 100), ndcg


def teacher_sweep(cfg) -> dict:
    """nDCG@10 on the dev half of the teacher (base + BM25 fused) with its scores smoothed over ``m`` neighbours at
    weight ``g``, for every ``m`` of ``GRAPH_NEIGHBOURS`` and ``g`` of ``GRAPH_WEIGHTS``: where ``graph_teacher``
    takes its ``m`` and ``g``."""
    setup, _, fused, ndcg = dev_teacher(cfg)
    out = {"teacher": ndcg(fused), "smoothed": {}}
    for m in GRAPH_NEIGHBOURS:
        nbrs = neighbours(setup["doc_emb"], m)
        for g in GRAPH_WEIGHTS:
            out["smoothed"][f"m{m}_g{g}"] = ndcg(smooth(fused, setup["doc_ids"], nbrs, g))
    out["best"] = max(out["smoothed"], key=out["smoothed"].get)
    return out


def prf_sweep(cfg) -> dict:
    """A pseudo-relevance-feedback teacher on the dev half (no training): each query's base embedding moved toward
    the mean of its top ``k`` passages (by the fused teacher or the dense model alone), ``q + beta * mean``
    (Rocchio), normalized; nDCG@10 of that dense run alone and fused with BM25 at the teacher's weight."""
    from embtune.retrieval.fusion import ranked, weighted_fuse

    setup, texts, fused, ndcg = dev_teacher(cfg)
    doc_emb, weight = setup["doc_emb"], setup["weight"]
    position = {d: i for i, d in enumerate(setup["doc_ids"])}
    out = {"teacher": ndcg(fused), "dense": ndcg(setup["dense"]), "feedback": {}}
    for source, runs in (("fused", fused), ("dense", setup["dense"])):
        for k in (1, 3, 5, 10):
            centroid = np.stack([doc_emb[[position[d] for d in ranked(runs[str(i)], k)]].mean(0)
                                 for i in range(len(texts))])
            for beta in (0.3, 0.6, 1.0):
                moved = setup["query_emb"] + beta * centroid
                moved = (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)
                dense, sparse = setup["hybrid"].member_runs(texts, moved, 100)
                out["feedback"][f"{source}_k{k}_b{beta}"] = {"dense": ndcg(dense),
                                                             "fused": ndcg(weighted_fuse(dense, sparse, weight, 100))}
    return out


def relabel(src: Path, dst: Path, dense_model: str, graph: tuple[int, float] | None = None) -> dict:
    """``src``'s data_prep with its training table's candidates and labels recomputed by another teacher: the
    fusion of ``dense_model``'s queries (against the same base index) with BM25 at the same weight, optionally
    smoothed over neighbours (``graph = (m, g)``). The pseudo-queries, their cut positives and the base model's
    statistics stay; the candidates are the new teacher's top ``labelfree.depth`` less the source passage."""
    from datasets import Dataset, load_from_disk

    from embtune.data_prep.labelfree import FusedTeacher, bm25_zscores
    from embtune.retrieval.bm25 import resolve_language
    from embtune.retrieval.encoder import encode, load_encoder
    from embtune.retrieval.fusion import ranked, weighted_fuse
    from embtune.schema import load_config

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "data_prep", dst / "data_prep", symlinks=True)
    manifest = dst / "data_prep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(str(src), str(dst)))
    cfg = load_config(str(CONFIG), [f"run_dir={dst}", "eval.split=dev"])
    folder = dst / "data_prep" / "labelfree"
    doc_emb = np.load(folder / "corpus_embeddings.npy")
    doc_ids = json.loads((folder / "doc_ids.json").read_text())
    doc_texts = json.loads((folder / "doc_texts.json").read_text())
    weight = json.loads((folder / "report.json").read_text())["teacher"]["dense_weight"]
    bm25 = dataclasses.replace(cfg.bm25, language=resolve_language(cfg.bm25, doc_texts))
    model, _ = load_encoder(dense_model, 0)
    teacher = FusedTeacher(doc_ids, doc_texts, doc_emb, model, bm25, cfg.mining.batch_size)
    table = load_from_disk(str(src / "data_prep" / "train_table"))
    rows = table.to_list()
    texts = [r["query"] for r in rows]
    dense, sparse, _ = teacher.runs(texts, 100)
    fused = weighted_fuse(dense, sparse, weight, 100)
    if graph:
        fused = smooth(fused, doc_ids, neighbours(doc_emb, graph[0]), graph[1])
    base, _ = load_encoder(cfg.train.base_model, 0)
    base_emb = encode(base, texts, cfg.mining.batch_size, role="query")  # base_scores: the base student's cosines
    position = {d: i for i, d in enumerate(doc_ids)}
    changed = 0
    for i, row in enumerate(rows):
        top = [d for d in ranked(fused[str(i)], None) if d != row["source_id"]][: cfg.labelfree.depth]
        candidates = [position[d] for d in top]
        changed += candidates != row["candidates"]
        row.update(candidates=candidates, teacher_scores=FusedTeacher.labels(fused[str(i)], top),
                   base_scores=[round(float(s), 6) for s in doc_emb[candidates] @ base_emb[i]],
                   bm25_z=bm25_zscores(teacher.bm25, row["query"], candidates)[0])  # as data_prep writes it
    shutil.rmtree(dst / "data_prep" / "train_table")
    Dataset.from_list(rows, features=table.features).save_to_disk(str(dst / "data_prep" / "train_table"))
    return {"rows": len(rows), "candidate_lists_changed": changed, "teacher_dense": dense_model,
            "dense_weight": weight, "graph": list(graph) if graph else None}


def read(cfg, model: str, dev_ids: set[str]) -> dict:
    """The model's row on all train queries, and on the dev half and the other half of them."""
    from embtune.eval.significance import compare_systems

    scores = query_side_scores(cfg, "train", {"finetuned": model})
    per_query = scores["per_query"]
    out = {}
    for name, keep in (("dev_half", lambda q: q in dev_ids), ("other_half", lambda q: q not in dev_ids),
                       ("all", lambda q: True)):
        part = {k: {q: v for q, v in per_query[k].items() if keep(q)} for k in ("finetuned", "teacher",
                                                                               "finetuned+bm25")}
        test = compare_systems(part["teacher"], part["finetuned+bm25"], "ndcg@10", 10000, seed=42)  # diff: b - a
        out[name] = {"queries": test["n"],
                     "dense": round(100 * float(np.mean([v["ndcg@10"] for v in part["finetuned"].values()])), 2),
                     "student+bm25": round(100 * test["b_mean"], 2), "base+bm25": round(100 * test["a_mean"], 2),
                     "diff": round(100 * test["diff"], 2), "ci95": [round(100 * c, 2) for c in test["ci95"]],
                     "p_value": round(test["p_value"], 4)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench_labelfree" / "levers"))
    parser.add_argument("--more", action="store_true",
                        help="only add the PRF teacher sweep (prf_sweep) and WiSE-FT past the student (a=1.25, 1.5) "
                             "to the result file, under more_checks with this command")
    parser.add_argument("--read", nargs="*", default=[], metavar="NAME=MODEL",
                        help="only read these trained students (e.g. a dev screen's) on the train queries, against "
                             "the default run's index; added to the result file under extra_reads with this command")
    args = parser.parse_args()
    setup_logging()
    provenance = Provenance.start(bench_command(sys.argv))
    root = Path(args.run_root).resolve()
    default_dir = root / "default"
    path = RESULTS / "scifact_labelfree_levers.json"
    start = time.time()
    # the default recipe's run: its index for every read, its student for the rest (trained unless only reading)
    cfg, wall = recipe(default_dir, ("data_prep",) if args.read else ("data_prep", "train"))
    dev_ids = set(labelled_queries(cfg, "dev")[0])
    if args.read:
        out = json.loads(path.read_text())
        for item in args.read:
            name, model = item.split("=", 1)
            out.setdefault("extra_reads", {})[name] = {"model": model, "rows": read(cfg, model, dev_ids),
                                                       **provenance.record()}
            print(name, {k: (v["student+bm25"], v["base+bm25"], v["diff"], v["p_value"])
                         for k, v in out["extra_reads"][name]["rows"].items()}, flush=True)
            path.write_text(json.dumps(out, indent=2))
        return 0
    student = student_of(default_dir)
    if args.more:
        out = json.loads(path.read_text())
        more = {"prf_sweep": prf_sweep(cfg), **provenance.record()}
        for alpha in (1.25, 1.5):
            more[f"wise_a{alpha}"] = read(cfg, interpolate(student, alpha, root / f"wise_a{alpha}"), dev_ids)
        out["more_checks"] = more
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps({k: v for k, v in more.items() if k.startswith(("wise", "prf"))}, indent=1))
        return 0
    models = {"base": cfg.train.base_model, "default": student}
    for alpha in ALPHAS:
        models[f"wise_a{alpha}"] = interpolate(student, alpha, root / f"wise_a{alpha}")
    sweep = teacher_sweep(cfg)
    m, g = sweep["best"].removeprefix("m").split("_g")
    relabels = {"round2": relabel(default_dir, root / "round2", student),
                "graph_teacher": relabel(default_dir, root / "graph_teacher", cfg.train.base_model,
                                         (int(m), float(g)))}
    for name in relabels:
        _, relabels[name]["train_wall_seconds"] = recipe(root / name, ("train",))
        models[name] = student_of(root / name)
    rows = {name: read(cfg, model, dev_ids) for name, model in models.items()}
    out = {"benchmark": "scifact_labelfree_levers", "split": "train (809 queries, none trained on)",
           "description": __doc__.split("\n\n")[1], "rows": rows, "teacher_sweep": sweep, "relabels": relabels,
           "default_wall_seconds": wall, "total_wall_seconds": round(time.time() - start, 1),
           **provenance.record()}
    write_result(path, out)
    for name, row in rows.items():
        print(name, {k: (v["student+bm25"], v["base+bm25"], v["diff"], v["p_value"]) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
