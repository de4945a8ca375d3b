"""eval stage: base model vs fine-tuned model vs BM25 on a held-out split, at every Matryoshka dim.

Reads the BEIR folder named by data_prep's manifest (or ``data.path`` for BEIR data when data_prep has not run),
encodes the corpus once per model (cached on disk by weights and text hash), searches every row through the
``Retriever`` the server runs (``embtune/retrieval/spec.py``: a FAISS exact inner-product index, FastBM25, fusion),
and scores with pytrec_eval as BEIR/MTEB do (see ``embtune/retrieval/metrics.py``).

Writes ``<run_dir>/eval/results.json``::

    {"split", "num_queries", "num_documents",
     "results": {"base"|"finetuned"|"bm25"|<extra>: {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100",
                                                    "dims": {"256": {...same metrics...}, ...}}},
     "per_query": {<model>: {<query id>: {"ndcg@10": ...}}}, "wall_seconds": {<model>: s},
     "significance": {"finetuned vs base": {"diff", "ci95", "p_value", "wins", "ties", "losses", ...}, ...},
     "specs": {<row>: <RetrieverSpec as JSON>},  # the retrieval system each row measured
     "recommended": {"row", "ndcg@10", "spec", "split", "best_single": {"row", "ndcg@10"}, "why"}}

``recommended`` is the deploy choice (``eval/deploy.py``: chosen on dev queries or the label-free probe, never on
the reported split); export writes its spec into the bundle (``retriever.json``) and ``/search`` serves it. Every
row is scored by :func:`embtune.eval.evaluate` (``eval/evaluator.py``), the entry the benchmark scripts use too.

Optional rows, same metrics: ``<model>+bm25_rrf`` / ``<model>+bm25_weighted`` (``eval.hybrid``, see
``embtune/retrieval/fusion.py``) and ``<row>>rerank`` (``eval.reranker``). With ``eval.sweep.enabled`` it also writes
``sweep.json``, ``sweep.txt`` and ``sweep.png`` (``eval/sweep.py``). Significance: ``eval/significance.py``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from embtune.compute.corpus import bm25_index, open_corpus
from embtune.compute.encoding import encode_corpus
from embtune.config import ConfigError
from embtune.dataio import load_qrels, load_queries
from embtune.eval.deploy import chosen_weight, deploy_choice, dev_rows, hybrid_spec, recommendation
from embtune.eval.endpoint import EndpointEncoder
from embtune.eval.evaluator import EvalRow, Queries, encode_queries, evaluate, score
from embtune.eval.inputs import eval_inputs, load_encoder, models_to_evaluate, upstream
from embtune.eval.significance import default_pairs, format_significance, significance_table
from embtune.manifest import Stage
from embtune.models import resolve_model
from embtune.retrieval.bm25 import bm25_search
from embtune.retrieval.encoder import cache_key
from embtune.retrieval.index import to_run
from embtune.retrieval.metrics import METRICS
from embtune.retrieval.rerank import rerank
from embtune.retrieval.spec import BM25Index, DenseSpec, RerankSpec, Retriever, RetrieverSpec

logger = logging.getLogger(__name__)

# Importable from here as before (choose.py, tests, scripts/labelfree_measure.py).
__all__ = ["METRICS", "eval_inputs", "load_encoder", "models_to_evaluate", "upstream", "run", "evaluate_dense",
           "encode_queries", "hybrid_spec", "read_run", "run_file_name"]


def eval_row(name: str, retriever: Retriever, queries: Queries, qrels, cfg, spec: RetrieverSpec | None = None
             ) -> EvalRow:
    """One row of the table: :func:`embtune.eval.evaluate` with eval's depth and identical-id rule."""
    return evaluate(retriever, queries, qrels, spec=spec, name=name, k=cfg.eval.top_k,
                    ignore_identical_ids=cfg.eval.ignore_identical_ids)


def evaluate_dense(name: str, model_path: str, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg,
                   bm25: BM25Index | None = None) -> dict[str, Any]:
    """Metrics at the full dim and at each configured Matryoshka dim; per-query metrics at the full dim.

    Every dim is searched through one :class:`Retriever` (the one the server runs), which is returned for the
    hybrid rows of this model. Returns ``{"row": EvalRow (full dim; ``extra`` holds ``dims``, ``dim``), "metrics",
    "per_query", "run", "doc_emb", "query_emb", "queries", "cosine", "spec", "retriever"}``.
    """
    model = load_encoder(model_path, cfg, calibration_texts=doc_texts)
    if isinstance(model, EndpointEncoder):
        key = None  # the endpoint encoder caches per batch itself
    else:
        key = cache_key(model_path, model.max_seq_length, role="document")
    # Roles: an asymmetric model (label-free, train.document_side: base) encodes queries and documents apart.
    # On the Ray engine the corpus stays in its shards and the Retriever searches them there.
    doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                            role="document")  # (n_docs, dim) or a ShardSet
    queries = Queries(list(query_ids), list(query_texts), encode_queries(model, query_texts, cfg.eval.batch_size))
    full_dim = doc_emb.shape[1]
    cosine = model.similarity_fn_name in (None, "cosine")
    if not cosine:
        logger.warning("%s scores by %s, not cosine: Matryoshka dims are renormalized as for cosine", name,
                       model.similarity_fn_name)
    spec = RetrieverSpec(dense=DenseSpec(model=model_path, dim=full_dim))
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb, bm25=bm25)
    row = eval_row(name, retriever, queries, qrels, cfg, spec)
    row.extra["dims"] = {}
    for dim in [full_dim] + [d for d in cfg.eval.dims if d < full_dim]:
        at_dim = row if dim == full_dim else eval_row(name, retriever, queries, qrels, cfg,
                                                      spec.replace(dense=DenseSpec(model=model_path, dim=dim)))
        row.extra["dims"][str(dim)] = at_dim.metrics
    row.extra["dim"] = full_dim
    if isinstance(model, EndpointEncoder):
        row.extra["endpoint"] = vars(model.stats)
        model.close()
    # The full-dim run feeds rerank rows; the retriever the hybrid rows; the embeddings the deployment sweep.
    return {"row": row, "metrics": {**row.metrics, **row.extra}, "per_query": row.per_query, "run": row.run,
            "doc_emb": doc_emb, "query_emb": queries.emb, "queries": queries, "cosine": cosine, "spec": spec,
            "retriever": retriever}


def print_table(results: dict[str, dict[str, Any]], split: str) -> str:
    width = max([14, *(len(name) + 2 for name in results)])
    header = f"{'model':<{width}}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [f"retrieval eval on split '{split}' (percent)", header, "-" * len(header)]
    for name, metrics in results.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * metrics[m]:>12.2f}" for m in METRICS))
        for dim, dm in sorted(metrics.get("dims", {}).items(), key=lambda kv: -int(kv[0])):
            if int(dim) != metrics.get("dim"):
                lines.append(f"{'  @' + dim:<{width}}" + "".join(f"{100 * dm[m]:>12.2f}" for m in METRICS))
    text = "\n".join(lines)
    print(text)
    return text


def stage_config(cfg, models: dict[str, str]) -> dict[str, Any]:
    """The config eval's results depend on (its fingerprint).

    The models by name and hub name or endpoint spec (a local folder is named by its content hash, an input, not
    its path); the seed of the significance resamples; how bad input lines are handled. Not ``eval.rag``: only
    ``python -m embtune.eval.rag`` reads it.
    """
    from embtune.config import to_dict

    section = {k: v for k, v in to_dict(cfg.eval).items() if k != "rag"}
    names = {name: None if Path(path).exists() else path for name, path in models.items()}
    # The deploy choice reads these (deploy_choice); the probe set and the dev qrels are inputs.
    choice = {"min_student_gain": cfg.labelfree.min_student_gain, "queries": cfg.data.queries}
    if cfg.data.queries == "labelfree":  # the probe tries these weights (probe_rows); no other path reads them
        choice["probe_weights"] = cfg.labelfree.probe_weights
    return {"eval": section, "models": names, "bm25": to_dict(cfg.bm25), "seed": cfg.seed,
            "on_error": cfg.data.on_error, "deploy_choice": choice, "include_title": cfg.mining.include_title}


def run(cfg, force: bool = False) -> dict[str, str]:
    inputs = eval_inputs(cfg)
    models = models_to_evaluate(cfg)
    present = {k: v for k, v in inputs.items() if Path(v).is_file()}  # label-free: there may be no queries
    data_out = upstream(cfg, "data_prep")
    present.update({k: data_out[k] for k in ("probe_set", "dev_qrels") if k in data_out})  # the deploy choice's
    stage = Stage("eval", cfg.run_dir, config=stage_config(cfg, models),
                  inputs={**present, **{f"model_{k}": v for k, v in models.items() if Path(v).exists()},
                          **({"reranker": cfg.eval.reranker} if Path(cfg.eval.reranker or "-").exists() else {})})
    if not force and stage.up_to_date():
        print((stage.dir / "table.txt").read_text())
        return stage.outputs()
    stage.begin()
    check_rerank_on(cfg, models)
    if not Path(inputs["qrels"]).is_file() or not Path(inputs["queries"]).is_file():
        return no_labelled_queries(cfg, stage, inputs)

    # A dict on the local engine; on Ray the file read by row, never held (embtune.compute.corpus).
    corpus = open_corpus(inputs["corpus"], cfg.data.on_error)
    queries = load_queries(inputs["queries"], cfg.data.on_error)
    qrels = load_qrels(inputs["qrels"], corpus, queries, cfg.data.on_error)
    query_ids = sorted(qrels)
    if cfg.eval.max_queries:
        query_ids = query_ids[: cfg.eval.max_queries]
        logger.warning("eval.max_queries=%d: a quick look only, not a reportable number", cfg.eval.max_queries)
    qrels = {q: qrels[q] for q in query_ids}
    doc_ids = corpus.ids
    # Titles as data_prep mined with them and the bundle embeds them (mining.include_title).
    doc_texts = corpus.texts(cfg.mining.include_title)
    query_texts = [queries[q] for q in query_ids]
    logger.info("eval on split '%s': %d queries, %d documents", cfg.eval.split, len(query_ids), len(doc_ids))

    rows: dict[str, EvalRow] = {}
    wall: dict[str, float] = {}
    retrievers: dict[str, Retriever] = {}
    encoded: dict[str, Queries] = {}
    sweep_rows: list[dict[str, Any]] = []
    # One BM25 index for the BM25 row and every model's hybrid rows.
    bm25 = bm25_index(doc_texts, cfg.bm25) if cfg.eval.compare_bm25 else None
    for name, path in models.items():
        start = time.time()
        out = evaluate_dense(name, path, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg, bm25=bm25)
        rows[name], retrievers[name], encoded[name] = out["row"], out["retriever"], out["queries"]
        wall[name] = round(time.time() - start, 1)
        if cfg.eval.sweep.enabled and not isinstance(out["doc_emb"], np.ndarray):
            logger.warning("eval.sweep is skipped for %s: the deployment sweep quantizes the whole matrix, which the "
                           "Ray engine keeps in shards (run it on a sample with compute.engine: local)", name)
        elif cfg.eval.sweep.enabled:
            from embtune.eval.sweep import sweep_model

            start = time.time()
            sweep_rows += sweep_model(name, out["doc_emb"], out["query_emb"], doc_ids, query_ids, qrels,
                                      cfg.eval.sweep, out["cosine"], cfg.eval.ignore_identical_ids)
            wall[f"sweep_{name}"] = round(time.time() - start, 1)
    if cfg.eval.compare_bm25:
        start = time.time()
        bm25_spec = RetrieverSpec(dense=None, bm25=cfg.bm25)
        if cfg.bm25.backend == "rank_bm25":  # the reference implementation, for checking FastBM25 on new data
            scores, indices = bm25_search(doc_texts, query_texts, cfg.eval.top_k, cfg.bm25)
            rows["bm25"] = score(qrels, to_run(query_ids, doc_ids, scores, indices), "bm25", bm25_spec,
                                 ignore_identical_ids=cfg.eval.ignore_identical_ids)
        else:
            rows["bm25"] = eval_row("bm25", Retriever(bm25_spec, doc_ids, doc_texts, bm25=bm25),
                                    Queries(query_ids, query_texts), qrels, cfg)
        wall["bm25"] = round(time.time() - start, 1)
    dev = dev_rows(cfg, models, doc_ids, doc_texts, bm25)
    deploy = deploy_choice(cfg, models, doc_ids, doc_texts, dev)
    for name in list(models) if cfg.eval.hybrid else []:
        for method in cfg.eval.hybrid:
            row = f"{name}+bm25_{method}"
            rows[row] = eval_row(row, retrievers[name], encoded[name], qrels, cfg, hybrid_spec(
                rows[name].spec, cfg, method, chosen_weight(deploy, name, cfg)))
    if cfg.eval.reranker:
        start = time.time()
        reranked = rerank_rows(cfg, {name: row.run for name, row in rows.items()}, models,
                               dict(zip(query_ids, query_texts)), corpus.text_by_id(cfg.mining.include_title))
        for target, run_ in reranked.items():
            row = f"{target}>rerank"
            spec = rows[target].spec.replace(rerank=RerankSpec(model=cfg.eval.reranker, top_k=cfg.eval.rerank_top_k,
                                                                max_length=cfg.eval.max_seq_length))
            rows[row] = score(qrels, run_, row, spec, ignore_identical_ids=cfg.eval.ignore_identical_ids)
        wall["rerank"] = round(time.time() - start, 1)
    results = {name: {**row.metrics, **row.extra} for name, row in rows.items()}
    per_query = {name: row.per_query for name, row in rows.items()}
    runs = {name: row.run for name, row in rows.items()}
    specs = {name: row.spec for name, row in rows.items()}
    recommended = recommendation(deploy, results, specs, cfg.eval.split)

    stage.dir.mkdir(parents=True, exist_ok=True)
    table = print_table(results, cfg.eval.split)
    if cfg.eval.hybrid and "weighted" in cfg.eval.hybrid:
        line = (f"weighted hybrid rows: dense weight {deploy['dense_weight']} (chosen by: {deploy['weight_from']}; "
                "never the reported split)")
        print(line)
        table += "\n" + line
    if recommended:
        print(recommended["why"])
        table += "\n\n" + recommended["why"]
    significance = {}
    if cfg.eval.significance_resamples:
        significance = significance_table(per_query, default_pairs(list(results)), "ndcg@10",
                                          cfg.eval.significance_resamples, seed=cfg.seed)
        if significance:
            text = "paired significance of per-query nDCG@10:\n" + format_significance(significance)
            print(text)
            table += "\n\n" + text
    outputs = {"results": stage.dir / "results.json", "table": stage.dir / "table.txt"}
    if cfg.eval.save_runs:
        outputs["runs"] = write_runs(runs, stage.dir / "runs", cfg.eval.save_runs)
    if sweep_rows:
        from embtune.eval.sweep import format_sweep, plot_sweep

        sweep_text = format_sweep(sweep_rows)
        print(sweep_text)
        (stage.dir / "sweep.txt").write_text(sweep_text + "\n")
        (stage.dir / "sweep.json").write_text(json.dumps({"rows": sweep_rows}, indent=1))
        outputs.update(sweep=stage.dir / "sweep.json", sweep_table=stage.dir / "sweep.txt")
        if cfg.eval.sweep.plot:
            outputs["sweep_plot"] = plot_sweep(sweep_rows, stage.dir / "sweep.png")
    (stage.dir / "table.txt").write_text(table + "\n")
    payload = {"split": cfg.eval.split, "num_queries": len(query_ids), "num_documents": len(doc_ids),
               "models": models, "results": results, "per_query": per_query, "wall_seconds": wall,
               "significance": significance, "specs": {row: spec.to_dict() for row, spec in specs.items()},
               "recommended": recommended,
               "hybrid_weight": {"dense_weight": deploy["dense_weight"], "from": deploy["weight_from"]}}
    (stage.dir / "results.json").write_text(json.dumps(payload, indent=1))
    from embtune.tracking import (
        log_eval_results,  # wandb tables in the pipeline's group, when tracking.report_to has it
    )

    log_eval_results(cfg, results, per_query, cfg.eval.split)
    return stage.finish(outputs)


def run_file_name(row: str) -> str:
    return row.replace(">", "+") + ".trec"


def write_runs(runs: dict[str, Any], folder: Path, depth: int) -> Path:
    """Each row's top ``depth`` per query as a TREC run file (``qid Q0 doc rank score row``), in eval's order."""
    import shutil

    from embtune.retrieval.fusion import ranked

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for row, run_ in runs.items():
        with open(folder / run_file_name(row), "w") as handle:
            for qid in sorted(run_):
                for rank, doc_id in enumerate(ranked(run_[qid], depth), start=1):
                    handle.write(f"{qid} Q0 {doc_id} {rank} {float(run_[qid][doc_id])!r} {row}\n")
    return folder


def read_run(path: str | Path) -> dict[str, list[str]]:
    """A TREC run file as ``{qid: [doc ids in rank order]}``."""
    out: dict[str, list[tuple[int, str]]] = {}
    with open(path) as handle:
        for line in handle:
            qid, _, doc_id, rank, *_ = line.split()
            out.setdefault(qid, []).append((int(rank), doc_id))
    return {qid: [d for _, d in sorted(rows)] for qid, rows in out.items()}


def no_labelled_queries(cfg, stage, inputs: dict[str, str]) -> dict[str, str]:
    """A corpus without judged queries (label-free mode): nothing to measure. Say so plainly, and write an empty
    results file so that export and serve still work; any other mode is an error naming the missing file."""
    missing = inputs["qrels"] if not Path(inputs["qrels"]).is_file() else inputs["queries"]
    if cfg.data.queries != "labelfree":
        raise FileNotFoundError(f"{missing}: file not found (eval.split={cfg.eval.split} needs judged queries)")
    note = (f"no labelled queries to evaluate on ({missing} not found): the model was trained label-free from the "
            "corpus alone, and no judged query measured it. Add judged queries (BEIR qrels/<split>.tsv) to measure "
            "it.")
    print(note)
    corpus = open_corpus(inputs["corpus"], cfg.data.on_error)
    doc_ids = corpus.ids
    models = models_to_evaluate(cfg)
    deploy = deploy_choice(cfg, models, doc_ids, corpus.texts(cfg.mining.include_title), None)
    recommended = {**deploy, "split": cfg.eval.split, "ndcg@10": None}
    print(recommended["why"])
    stage.dir.mkdir(parents=True, exist_ok=True)
    payload = {"split": cfg.eval.split, "num_queries": 0, "num_documents": len(doc_ids), "models": models,
               "results": {}, "per_query": {}, "note": note, "specs": {deploy["row"]: deploy["spec"]},
               "recommended": recommended}
    (stage.dir / "results.json").write_text(json.dumps(payload, indent=1))
    (stage.dir / "table.txt").write_text(note + "\n" + recommended["why"] + "\n")
    return stage.finish({"results": stage.dir / "results.json", "table": stage.dir / "table.txt"})


def check_rerank_on(cfg, models: dict[str, str]) -> None:
    """Fail before any encoding when ``eval.rerank_on`` names a row this run will not compute."""
    rows = {*models, *(["bm25"] if cfg.eval.compare_bm25 else []),
            *(f"{m}+bm25_{method}" for m in models for method in cfg.eval.hybrid)}
    missing = [name for name in cfg.eval.rerank_on if name not in rows]
    if cfg.eval.reranker and missing:
        raise ConfigError(f"eval.rerank_on names rows this run does not compute: {missing} (rows: {sorted(rows)})",
                          "eval.rerank_on", cfg.source)


def rerank_rows(cfg, runs: dict[str, Any], models: dict[str, str], query_texts: dict[str, str],
                doc_texts: dict[str, str]) -> dict[str, Any]:
    """Each row of ``eval.rerank_on`` (default: finetuned, else the first dense model) reranked: ``{row: run}``,
    the table's ``<row>>rerank``."""
    from sentence_transformers import CrossEncoder

    targets = cfg.eval.rerank_on or [next(m for m in ("finetuned", *models, "bm25") if m in runs)]
    scorer = CrossEncoder(resolve_model(cfg.eval.reranker, must_exist=True), device=None)
    if cfg.eval.max_seq_length:
        scorer.max_length = cfg.eval.max_seq_length
    logger.info("reranking the top %d of %s with %s", cfg.eval.rerank_top_k, targets, cfg.eval.reranker)
    return {t: rerank(scorer, runs[t], query_texts, doc_texts, cfg.eval.rerank_top_k, cfg.eval.rerank_batch_size)
            for t in targets}
