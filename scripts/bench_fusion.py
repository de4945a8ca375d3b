"""Which fusion of dense and BM25 scores is best: the normalizations of ``embtune.retrieval.fusion`` compared on dev.

    python scripts/bench_fusion.py                 # dev only (the choice)
    python scripts/bench_fusion.py --read-test     # then SciFact test, read once, at the weights dev chose

For each corpus (SciFact; the pydoc demo corpus) the dev queries are carved from the TRAIN queries with
``embtune.dataio.split_dev`` (``--dev-fraction``, seed ``--seed``: the split data_prep's ``data.dev_fraction``
carves); test is never read for the choice. The members are the base model (``minilm``) and BM25 with the ``bm25``
section's defaults, each searched to ``--depth`` by the core's ``DenseIndex`` / ``BM25Index`` (what the
``Retriever`` runs, through ``Retriever.member_runs``). Each normalization is scored over a grid of dense weights:

- ``topk_minmax`` (the formula before this comparison), ``topk_zscore``: each run's own top ``depth``;
- ``corpus_minmax``, ``corpus_zscore``: the query's scores over the whole corpus (full score vectors);
- each of those four as the core fuses (a candidate missing from one run gets that run's lowest normalized score)
  and ``_exact_missing`` (it gets that retriever's exact score instead);
- ``rrf`` (k 60) with the dense weight multiplying the dense run's ``1 / (k + rank)``.

Per corpus and normalization: nDCG@10 on dev at every weight, the weight with the best dev nDCG@10, and a
two-fold figure (the weight chosen on one half of dev, scored on the other half, both ways, averaged) that says
how well a dev-chosen weight carries to unseen queries. The normalization kept is the one with the best mean of
the two-fold figure over the corpora. Writes ``benchmarks/results/fusion.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import bench_command  # noqa: E402

from embtune.dataio import document_text, load_beir, split_dev  # noqa: E402
from embtune.eval import encode_queries, score  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.retrieval.bm25 import BM25Config  # noqa: E402
from embtune.retrieval.encoder import encode, load_encoder  # noqa: E402
from embtune.retrieval.fusion import NORMALIZATIONS, rrf_fuse, weighted_fuse  # noqa: E402
from embtune.retrieval.spec import DenseSpec, FusionSpec, Retriever, RetrieverSpec  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "fusion.json"
SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
GRID = [round(0.05 * i, 2) for i in range(21)]


class Members:
    """Dense and BM25 over one corpus through the core's ``Retriever.member_runs`` (top-``depth`` runs carrying
    whole-corpus statistics), plus the runs completed with exact scores for the ``_exact_missing`` variants."""

    def __init__(self, model, key: str, doc_ids: list[str], doc_texts: list[str], depth: int) -> None:
        self.model, self.doc_ids, self.depth = model, doc_ids, depth
        doc_emb = encode(model, doc_texts, 64, cache_key=key, desc="corpus", role="document")  # (n_docs, dim)
        spec = RetrieverSpec(dense=DenseSpec(dim=int(doc_emb.shape[1])), bm25=BM25Config(),
                             fusion=FusionSpec(method="weighted", depth=depth))
        self.retriever = Retriever(spec, doc_ids, doc_texts, doc_emb)
        self.row = {d: i for i, d in enumerate(doc_ids)}

    def runs(self, query_ids: list[str], query_texts: list[str]) -> dict:
        query_emb = encode_queries(self.model, query_texts)  # (n_queries, dim), one per batch as eval encodes
        dense, sparse = self.retriever.member_runs(query_texts, query_emb, self.depth, query_ids)
        dense_index = self.retriever._dense_index(self.retriever.spec.dense)
        bm25_index = self.retriever._bm25_index(self.retriever.spec.bm25)
        completed = {"dense": {}, "sparse": {}}
        for i, (qid, text) in enumerate(zip(query_ids, query_texts)):
            full = {"dense": dense_index.all_scores(query_emb[i]), "sparse": bm25_index.all_scores(text)}
            union = set(dense[qid]) | set(sparse[qid])
            for name, run in (("dense", dense), ("sparse", sparse)):
                # The run's own scores stay; candidates only the other run brought get their exact score.
                completed[name][qid] = {**{d: float(full[name][self.row[d]]) for d in union}, **run[qid]}
        stats = {"dense": dense.stats, "sparse": sparse.stats}
        return {"dense": dense, "sparse": sparse, "stats": stats, "completed": completed}


def variants() -> list[str]:
    out = []
    for normalization in NORMALIZATIONS:
        out += [normalization, f"{normalization}_exact_missing"]
    return out + ["rrf"]


def fused_run(runs: dict, variant: str, weight: float, depth: int) -> dict:
    if variant == "rrf":
        return rrf_fuse([runs["dense"], runs["sparse"]], k=60, depth=depth, weights=[weight, 1.0 - weight])
    normalization = variant.removesuffix("_exact_missing")
    source = (runs["completed"]["dense"], runs["completed"]["sparse"]) if variant.endswith("_exact_missing") else (
        runs["dense"], runs["sparse"])
    return weighted_fuse(*source, dense_weight=weight, depth=depth, normalization=normalization,
                         stats=runs["stats"])


def per_query_ndcg(qrels: dict, run: dict) -> dict[str, float]:
    per_query = score(qrels, run).per_query
    return {q: v["ndcg@10"] for q, v in per_query.items()}


def grid_scores(qrels: dict, runs: dict, depth: int) -> dict[str, dict[float, dict[str, float]]]:
    """variant -> weight -> per-query nDCG@10."""
    return {v: {w: per_query_ndcg(qrels, fused_run(runs, v, w, depth)) for w in GRID} for v in variants()}


def best_weight(per_weight: dict[float, dict[str, float]], queries: list[str]) -> float:
    # Ties go to the denser weight, as the label-free probe breaks them.
    return max(per_weight, key=lambda w: (np.mean([per_weight[w][q] for q in queries]), w))


def summarize(scores: dict, query_ids: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shuffled = list(rng.permutation(sorted(query_ids)))
    folds = [shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2:]]
    out = {}
    for variant, per_weight in scores.items():
        grid = {f"{w:g}": round(100 * float(np.mean(list(per_weight[w].values()))), 2) for w in GRID}
        chosen = best_weight(per_weight, query_ids)
        two_fold = []
        for fit, held in (folds, folds[::-1]):
            w = best_weight(per_weight, fit)
            two_fold.append(float(np.mean([per_weight[w][q] for q in held])))
        out[variant] = {"ndcg@10_by_dense_weight": grid, "chosen_weight": chosen, "ndcg@10": grid[f"{chosen:g}"],
                        "two_fold_ndcg@10": round(100 * float(np.mean(two_fold)), 2),
                        "two_fold_weights": [best_weight(per_weight, f) for f in folds]}
    return out


def corpus_data(name: str, workdir: Path):
    """(BEIR folder, note): SciFact from the shared data, pydoc built here (stdlib docstrings)."""
    if name == "scifact":
        return SCIFACT, "BEIR SciFact (../shared/data/beir/scifact)"
    from embtune.data_prep.pydoc_corpus import build_pydoc_beir

    return build_pydoc_beir(workdir / "pydoc"), "pydoc demo corpus (data_prep.pydoc_corpus.build_pydoc_beir defaults)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", nargs="+", default=["scifact", "pydoc"])
    parser.add_argument("--dev-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--read-test", action="store_true",
                        help="after the dev choice is recorded: score SciFact test at each variant's dev weight")
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))
    start = time.time()
    model, key = load_encoder(args.model)
    if args.read_test:
        result = json.loads(RESULT.read_text())
        data = load_beir(SCIFACT, "test")
        doc_ids = list(data.corpus)
        members = Members(model, key, doc_ids, [document_text(data.corpus[d]) for d in doc_ids], args.depth)
        query_ids = sorted(data.qrels)
        runs = members.runs(query_ids, [data.queries[q] for q in query_ids])
        chosen = result["corpora"]["scifact"]["variants"]
        result["scifact_test_read_after_choice"] = {
            "note": "read once after the choice was recorded; each variant at the dense weight SciFact dev chose",
            "queries": len(query_ids),
            **{v: {"dense_weight": chosen[v]["chosen_weight"],
                   "ndcg@10": round(100 * float(np.mean(list(per_query_ndcg(
                       data.qrels, fused_run(runs, v, chosen[v]["chosen_weight"], args.depth)).values()))), 2)}
               for v in variants()},
            **provenance.record()}
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["scifact_test_read_after_choice"], indent=2))
        return 0

    result = {"benchmark": "fusion", "description": __doc__.split("\n")[0], "model": args.model,
              "bm25": "bm25 section defaults (embtune.retrieval.bm25.BM25Config())", "depth": args.depth,
              "dev": f"train qrels split by embtune.dataio.split_dev(fraction={args.dev_fraction}, seed={args.seed})",
              "weights": GRID, "corpora": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.corpora:
            folder, note = corpus_data(name, Path(tmp))
            data = load_beir(folder, "train")
            _, dev = split_dev(data.qrels, args.dev_fraction, args.seed)
            doc_ids = list(data.corpus)
            t0 = time.time()
            members = Members(model, key, doc_ids, [document_text(data.corpus[d]) for d in doc_ids], args.depth)
            query_ids = sorted(dev)
            runs = members.runs(query_ids, [data.queries[q] for q in query_ids])
            summary = summarize(grid_scores(dev, runs, args.depth), query_ids, args.seed)
            result["corpora"][name] = {"dataset": note, "documents": len(doc_ids), "dev_queries": len(query_ids),
                                       "variants": summary, "seconds": round(time.time() - t0, 1)}
            print(name, {v: (s["chosen_weight"], s["ndcg@10"], s["two_fold_ndcg@10"]) for v, s in summary.items()},
                  flush=True)
    mean_two_fold = {v: round(float(np.mean([c["variants"][v]["two_fold_ndcg@10"]
                                             for c in result["corpora"].values()])), 2) for v in variants()}
    best = max(mean_two_fold, key=mean_two_fold.get)
    result["mean_two_fold_ndcg@10"] = mean_two_fold
    result["best"] = best
    result.update({"wall_seconds": round(time.time() - start, 1), **provenance.record(),
                   "note": "timings on a shared 2-core machine; the comparison is nDCG, not time"})
    if RESULT.is_file():  # an earlier run's headline, kept beside the new one
        earlier = json.loads(RESULT.read_text())
        result["other_runs"] = [*earlier.pop("other_runs", []),
                                {k: earlier.get(k) for k in ("best", "mean_two_fold_ndcg@10", "command", "versions")}]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print("best:", best, mean_two_fold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
