"""eval's deploy choice: what to ship, chosen on evidence that is never the split being reported.

- labelled dev queries (``data.dev_fraction``): nDCG@10 of every deploy row on dev (:func:`dev_rows`);
- label-free: MRR@10 on data_prep's inverse-cloze probe (:func:`probe_rows`);
- neither: the fine-tuned model alone, and the log says so.

Both kinds of evidence compare the same rows (:data:`DEPLOY_ORDER`) the same way (:func:`compare_rows`: BM25, each
model alone, and each model fused with BM25 at the weight that scores best, ties to the denser), and the row is
chosen by :func:`choose_on_evidence`. eval's ``recommended`` (``results.json``) is :func:`recommendation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embtune.compute.corpus import bm25_index
from embtune.compute.encoding import encode_corpus
from embtune.dataio import load_qrels, load_queries
from embtune.eval.evaluator import Queries, encode_queries, evaluate
from embtune.eval.inputs import eval_inputs, load_encoder, upstream
from embtune.retrieval.encoder import cache_key, encode
from embtune.retrieval.probe import lexical_check
from embtune.retrieval.spec import BM25Index, DenseSpec, FusionSpec, Retriever, RetrieverSpec, replace_rows

# Dense weights of the weighted fusion tried on the dev split (0 = BM25 alone ... 1 = dense alone).
DEV_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Rows the deploy choice compares, simplest first: on a tie the earlier one ships.
DEPLOY_ORDER = ("base", "bm25", "base+bm25_weighted", "finetuned", "finetuned+bm25_weighted")


def hybrid_spec(dense: RetrieverSpec, cfg, method: str, dense_weight: float | None = None) -> RetrieverSpec:
    """A model's dense spec fused with the ``bm25`` section by ``method``, with eval's fusion settings
    (``dense_weight``: the weighted fusion's, ``eval.hybrid_weight`` when None)."""
    weight = cfg.eval.hybrid_weight if dense_weight is None else dense_weight
    return dense.replace(bm25=cfg.bm25, fusion=FusionSpec(method=method, dense_weight=weight,
                                                          rrf_k=cfg.eval.rrf_k, depth=cfg.eval.hybrid_depth))


def chosen_weight(deploy: dict[str, Any], model: str, cfg) -> float:
    """The weighted fusion's dense weight for ``model``'s hybrid row: chosen on dev (per model), by the probe, or
    ``eval.hybrid_weight`` (``deploy["weight_from"]`` says which)."""
    weight = deploy.get("dense_weight", cfg.eval.hybrid_weight)
    return weight.get(model, cfg.eval.hybrid_weight) if isinstance(weight, dict) else weight


def labelfree_evidence(cfg) -> dict[str, Any] | None:
    """data_prep's label-free evidence: ``{"probe", "decision", "dense_weight", "manifest"}``; None otherwise."""
    manifest_path = Path(cfg.run_dir) / "data_prep" / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    probe_file = manifest["outputs"].get("probe_set")
    if not probe_file or "decision" not in manifest:
        return None
    from embtune.retrieval.probe import ClozeProbe

    return {"probe": ClozeProbe.load(probe_file), "decision": manifest["decision"],
            "dense_weight": manifest["teacher"]["dense_weight"]}


def compare_rows(cfg, models: dict[str, str], doc_ids: list[str], doc_texts: list[str], bm25: BM25Index,
                 queries: Queries, weights: tuple[float, ...], embed: Callable[[str, Any], tuple[Any, Any]],
                 measure: Callable[[Retriever, Queries, RetrieverSpec], float],
                 check: Callable[[Retriever, Queries, RetrieverSpec], float] | None = None
                 ) -> tuple[dict[str, float], dict[str, RetrieverSpec], dict[str, float], dict[str, float]]:
    """Every deploy row's score (higher is better): BM25, each of base and finetuned alone, and each fused with BM25
    at its best of ``weights`` (ties go to the denser).

    Args:
        doc_texts: the corpus as searched (the probe's: its passages with their query cut out).
        queries: the queries' ids and texts (``embed`` gives each model's embeddings of them).
        embed: ``embed(name, encoder) -> (corpus embeddings, query embeddings)`` of one model.
        measure: ``measure(retriever, queries, spec)``, one row's score (nDCG@10 on dev, MRR@10 on the probe).
        check: a second score that a fused weight must raise over the model alone to be chosen (the probe's
            lexical check, :func:`embtune.retrieval.probe.lexical_check`); the model alone (weight 1) is then a
            candidate too. None: every weight is a candidate.

    Returns (score by row, spec by row, each model's fusion weight, each row's ``check`` score when given)."""
    specs: dict[str, RetrieverSpec] = {"bm25": RetrieverSpec(dense=None, bm25=cfg.bm25)}
    bm25_retriever = Retriever(specs["bm25"], doc_ids, doc_texts, bm25=bm25)
    scores = {"bm25": measure(bm25_retriever, queries, specs["bm25"])}
    checked = {"bm25": check(bm25_retriever, queries, specs["bm25"])} if check else {}
    chosen: dict[str, float] = {}
    for name in ("base", "finetuned"):
        if name not in models:
            continue
        doc_emb, query_emb = embed(name, load_encoder(models[name], cfg, calibration_texts=doc_texts))
        encoded = Queries(queries.ids, queries.texts, query_emb)
        specs[name] = RetrieverSpec(dense=DenseSpec(model=models[name], dim=doc_emb.shape[1]))
        retriever = Retriever(specs[name], doc_ids, doc_texts, doc_emb, bm25=bm25)
        scores[name] = measure(retriever, encoded, specs[name])
        by_weight = {w: measure(retriever, encoded, hybrid_spec(specs[name], cfg, "weighted", w)) for w in weights}
        candidates = list(by_weight)
        if check:
            checked[name] = check(retriever, encoded, specs[name])
            by_check = {w: check(retriever, encoded, hybrid_spec(specs[name], cfg, "weighted", w)) for w in weights}
            by_weight.setdefault(1.0, scores[name])
            by_check.setdefault(1.0, checked[name])
            # only the weights that beat the model alone on the check's queries too (and the model alone)
            candidates = [w for w in by_weight if w >= 1 or by_check[w] > checked[name]]
        chosen[name] = max(candidates, key=lambda w: (by_weight[w], w))
        fused = f"{name}+bm25_weighted"
        specs[fused] = hybrid_spec(specs[name], cfg, "weighted", chosen[name])
        scores[fused] = by_weight[chosen[name]]
        if check:
            checked[fused] = by_check[chosen[name]]
    return scores, specs, chosen, checked


def probe_rows(cfg, models: dict[str, str], doc_ids: list[str], doc_texts: list[str], evidence: dict[str, Any]
               ) -> tuple[dict[str, float], dict[str, RetrieverSpec], dict[str, float], dict[str, Any]]:
    """MRR@10 on data_prep's inverse-cloze probe (no labels) of every row the deploy choice compares: each model
    dense, BM25, and each model fused with BM25 at its best weight on the probe (``labelfree.probe_weights``; the
    student's best weight need not be the base model's). The corpus is searched with the probe passages cut (their
    text without the query), through the core ``Retriever`` and its fusion, queries by role.

    A fusion weight is chosen among those passing the probe's lexical check against the model alone
    (``embtune.retrieval.probe``: beat it on the probe queries sharing the fewest terms with their passage too).

    Returns (MRR@10 by row, spec by row, each model's fusion weight, ``{"queries", "mrr@10"}`` of every row on the
    least lexical probe queries)."""
    probe = evidence["probe"]
    texts = probe.corpus_texts(doc_ids, doc_texts)
    position = {d: i for i, d in enumerate(doc_ids)}
    cut_rows = [position[d] for d in probe.cut_texts if d in position]
    cut_texts = [texts[i] for i in cut_rows]

    def embed(name: str, model) -> tuple[Any, Any]:
        key = cache_key(models[name], model.max_seq_length, role="document")
        doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                                role="document")  # (n_docs, dim) or a ShardSet; the cached full corpus
        if cut_rows:
            # cached like the corpus: the probe's passages are the same for every model whose document side is
            # the base model's (a label-free student's), so a rerun encodes them once
            doc_emb = replace_rows(doc_emb, cut_rows, encode(model, cut_texts, cfg.eval.batch_size, cache_key=key,
                                                             desc=f"{name} probe passages", role="document"))
        return doc_emb, encode(model, probe.queries, cfg.eval.batch_size, desc=f"{name} probe queries", role="query")

    bm25 = BM25Index(texts, cfg.bm25)
    low = probe.least_lexical(bm25.tokenizer)  # the lexical check's queries (embtune.retrieval.probe)

    def measure(retriever: Retriever, queries: Queries, spec: RetrieverSpec) -> float:
        return probe.mrr(retriever.search(queries.texts, queries.emb, 10, queries.ids, spec=spec))

    def check(retriever: Retriever, queries: Queries, spec: RetrieverSpec) -> float:
        return probe.mrr(retriever.search(queries.texts, queries.emb, 10, queries.ids, spec=spec), only=low)

    queries = Queries(ids=probe.query_ids(), texts=list(probe.queries))
    mrr, specs, weights, low_mrr = compare_rows(cfg, models, doc_ids, texts, bm25, queries,
                                                tuple(cfg.labelfree.probe_weights), embed, measure, check)
    return mrr, specs, weights, {"queries": len(low), "mrr@10": low_mrr}


def dev_rows(cfg, models: dict[str, str], doc_ids: list[str], doc_texts: list[str],
             bm25: BM25Index | None) -> dict[str, Any] | None:
    """nDCG@10 (percent) on data_prep's dev split of every deploy row, each model's fusion weight chosen there (from
    :data:`DEV_WEIGHTS`); None without a dev split or when eval reports the dev split itself."""
    data_out = upstream(cfg, "data_prep")
    if cfg.eval.split == "dev" or "dev_qrels" not in data_out:
        return None
    folder = Path(eval_inputs(cfg)["corpus"]).parent
    corpus = doc_ids if getattr(doc_ids, "unique", False) else set(doc_ids)  # ids on disk: looked up, not copied
    queries = load_queries(folder / "queries.jsonl", cfg.data.on_error)
    qrels = load_qrels(data_out["dev_qrels"], corpus, queries, cfg.data.on_error)
    dev = Queries(ids=sorted(qrels), texts=[queries[q] for q in sorted(qrels)])

    def embed(name: str, model) -> tuple[Any, Any]:
        key = cache_key(models[name], model.max_seq_length, role="document")
        doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                                role="document")
        return doc_emb, encode_queries(model, dev.texts, cfg.eval.batch_size)

    def measure(retriever: Retriever, queries: Queries, spec: RetrieverSpec) -> float:
        return evaluate(retriever, queries, qrels, spec=spec, k=cfg.eval.top_k,
                        ignore_identical_ids=cfg.eval.ignore_identical_ids).percent()["ndcg@10"]

    scores, specs, weights, _ = compare_rows(cfg, models, doc_ids, doc_texts,
                                             bm25 or bm25_index(doc_texts, cfg.bm25), dev, DEV_WEIGHTS, embed, measure)
    return {"ndcg@10": scores, "specs": specs, "dense_weight": weights, "num_queries": len(dev.ids)}


def choose_on_evidence(scores: dict[str, float], min_student_gain: float) -> tuple[str, str]:
    """The row to ship from ``scores`` (higher is better) over :data:`DEPLOY_ORDER`'s rows, and why: the best; a
    student row only when it beats the same row on the base model by ``min_student_gain``; ties to the simpler."""
    eligible = []
    for row in DEPLOY_ORDER:
        if row not in scores:
            continue
        counterpart = row.replace("finetuned", "base")
        if row.startswith("finetuned") and counterpart in scores and \
                scores[row] < scores[counterpart] + min_student_gain:
            continue
        eligible.append(row)
    best = max(eligible, key=lambda row: (scores[row], -DEPLOY_ORDER.index(row)))
    students = [r for r in scores if r.startswith("finetuned") and r not in eligible]
    note = (f"; student rows {students} do not beat the base model's by {min_student_gain:g}" if students else "")
    return best, note


def lexically_checked(mrr: dict[str, float], least_lexical: dict[str, Any]) -> dict[str, float]:
    """The probe's rows that may ship: BM25 alone only when it also beats the base model on the probe's least
    lexical queries (``embtune.retrieval.probe.lexical_check``; the fused rows' weights passed it in
    :func:`probe_rows`), so that verbatim overlap alone never ships BM25 over the dense base."""
    low = least_lexical["mrr@10"]
    if "bm25" in mrr and "base" in low and not lexical_check(low["bm25"], low["base"],
                                                             least_lexical["queries"])["passes"]:
        return {row: score for row, score in mrr.items() if row != "bm25"}
    return mrr


def deploy_choice(cfg, models: dict[str, str], doc_ids: list[str], doc_texts: list[str],
                  dev: dict[str, Any] | None) -> dict[str, Any]:
    """What to ship, never read on the reported split: ``{"row", "spec", "chosen_by", "evidence", "why",
    "dense_weight", "weight_from"}``.

    1. labelled dev queries (``data.dev_fraction``) and a reported split that is not dev: the best row on dev, each
       model's fusion weight chosen on dev (:func:`dev_rows`);
    2. otherwise, label-free: the probe (:func:`probe_rows`); a corpus the base model cannot read ships BM25;
    3. otherwise: the fine-tuned model alone (no evidence to choose on), and the log says so.
    """
    min_gain = cfg.labelfree.min_student_gain
    if dev is not None:
        best, note = choose_on_evidence(dev["ndcg@10"], min_gain)
        return {"row": best, "spec": dev["specs"][best].to_dict(), "chosen_by": "dev",
                "evidence": {"metric": "nDCG@10 (percent) on the dev split", **dev["ndcg@10"]},
                "dense_weight": dev["dense_weight"], "weight_from": "dev",
                "why": f"deploy {best} ({dev['specs'][best].describe()}): the best row on the dev split "
                       f"({dev['num_queries']} labelled queries carved from train, never the reported split){note}"}
    evidence = labelfree_evidence(cfg) if cfg.data.queries == "labelfree" else None
    if evidence is not None:
        mrr, specs, weights, least_lexical = probe_rows(cfg, models, doc_ids, doc_texts, evidence)
        decision = evidence["decision"]
        if decision["decision"] == "bm25":
            best, why = "bm25", decision["reason"]
            chosen_by = "tokenizer fit"
        else:
            best, note = choose_on_evidence(lexically_checked(mrr, least_lexical), min_gain)
            chosen_by = "probe"
            why = (f"the best row on the inverse-cloze probe (MRR@10 {mrr[best]}, {len(evidence['probe'])} queries "
                   f"from passages held out of training, no labels){note}")
        return {"row": best, "spec": specs[best].to_dict(), "chosen_by": chosen_by,
                "evidence": {"metric": "MRR@10 on the inverse-cloze probe (percent)", **mrr},
                "dense_weight": weights, "weight_from": "probe", "decision": decision,
                "lexical_check": {"metric": "MRR@10 on the probe queries sharing the fewest terms with their passage",
                                  **least_lexical},
                "why": f"deploy {best} ({specs[best].describe()}): {why}"}
    row = "finetuned" if "finetuned" in models else next(iter(models), "bm25")
    spec = RetrieverSpec(dense=None, bm25=cfg.bm25) if row == "bm25" else RetrieverSpec(
        dense=DenseSpec(model=models[row]))
    return {"row": row, "spec": spec.to_dict(), "chosen_by": "default", "evidence": {},
            "dense_weight": cfg.eval.hybrid_weight, "weight_from": "eval.hybrid_weight",
            "why": f"deploy {row}: no dev split (set data.dev_fraction to carve one from the train queries) and no "
                   "label-free probe, so nothing but the reported split could choose, and it must not"}


def recommendation(deploy: dict[str, Any], results: dict[str, Any], specs: dict[str, RetrieverSpec],
                   split: str) -> dict[str, Any]:
    """eval's ``recommended``: the deploy choice (:func:`deploy_choice`, never read on ``split``), its number on
    ``split`` when that row was measured (reported, not chosen on), and the best row on ``split`` for reference."""
    row = deploy["row"]
    on_split = recommend(results, specs, split)
    out = {**deploy, "split": split, "ndcg@10": results.get(row, {}).get("ndcg@10"), "best_on_split": on_split,
           "best_single": on_split.get("best_single")}
    if out["ndcg@10"] is not None:
        out["why"] += f"; on split '{split}' it scores nDCG@10 {100 * out['ndcg@10']:.2f}"
    return out


def recommend(results: dict[str, Any], specs: dict[str, RetrieverSpec], split: str) -> dict[str, Any]:
    """The best nDCG@10 on ``split`` among the dense, BM25 and hybrid rows (reranked rows are a cost choice, not a
    retriever), first in table order on a tie. A reference only: the deploy choice is :func:`deploy_choice`'s,
    never read on the split being reported.

    Returns ``{"row", "ndcg@10", "spec", "split", "best_single": {"row", "ndcg@10"}, "why"}``; ``{}`` when no such
    row ran.
    """
    rows = [row for row in results if row in specs and specs[row].rerank is None]
    if not rows:
        return {}
    best = max(rows, key=lambda row: results[row]["ndcg@10"])
    single = max((row for row in rows if not specs[row].hybrid), key=lambda row: results[row]["ndcg@10"])
    why = (f"best row on split '{split}': {best} ({specs[best].describe()}), nDCG@10 "
           f"{100 * results[best]['ndcg@10']:.2f}; best single retriever: {single} "
           f"({100 * results[single]['ndcg@10']:.2f})")
    return {"row": best, "ndcg@10": results[best]["ndcg@10"], "spec": specs[best].to_dict(), "split": split,
            "best_single": {"row": single, "ndcg@10": results[single]["ndcg@10"]}, "why": why}
