"""eval stage: base model vs fine-tuned model vs BM25 on a held-out split, at every Matryoshka dim.

Reads the BEIR folder named by data_prep's manifest (or ``data.path`` for BEIR data when data_prep has not run),
encodes the corpus once per model (cached on disk by weights and text hash), searches a FAISS exact
inner-product index, and scores with pytrec_eval as BEIR/MTEB do (see ``eval/metrics.py``).

Writes ``<run_dir>/eval/results.json``::

    {"split", "num_queries", "num_documents",
     "results": {"base"|"finetuned"|"bm25"|<extra>: {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100",
                                                    "dims": {"256": {...same metrics...}, ...}}},
     "per_query": {<model>: {<query id>: {"ndcg@10": ...}}}, "wall_seconds": {<model>: s},
     "significance": {"finetuned vs base": {"diff", "ci95", "p_value", "wins", "ties", "losses", ...}, ...}}

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

from embtune.dataio import document_text, load_corpus, load_qrels, load_queries
from embtune.manifest import Stage, hash_path
from embtune.models import resolve_model
from eval.endpoint import EndpointEncoder, is_endpoint_spec
from embtune.retrieval.fusion import fuse
from embtune.retrieval.rerank import rerank
from eval.metrics import evaluate
from embtune.retrieval.bm25 import bm25_search
from embtune.retrieval.encoder import cache_key, encode, truncate
from embtune.retrieval.index import exact_search, to_run
from eval.significance import default_pairs, format_significance, significance_table

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")


def upstream(cfg, name: str) -> dict[str, str]:
    manifest = Path(cfg.run_dir) / name / "manifest.json"
    return json.loads(manifest.read_text())["outputs"] if manifest.is_file() else {}


def eval_inputs(cfg) -> dict[str, str]:
    """The BEIR folder files and qrels this evaluation reads."""
    data_out = upstream(cfg, "data_prep")
    split = cfg.eval.split
    folder = data_out.get("eval_dataset") or (cfg.data.path if cfg.data.format == "beir" else None)
    if not folder:
        raise FileNotFoundError(f"no eval dataset: run data_prep first (no {cfg.run_dir}/data_prep/manifest.json)")
    folder = Path(folder)
    if split == "dev":
        if "dev_qrels" not in data_out:
            raise FileNotFoundError("eval.split=dev needs data.dev_fraction > 0 and a data_prep run")
        qrels = Path(data_out["dev_qrels"])
    else:
        qrels = folder / "qrels" / f"{split}.tsv"
    return {"corpus": str(folder / "corpus.jsonl"), "queries": str(folder / "queries.jsonl"), "qrels": str(qrels)}


def models_to_evaluate(cfg) -> dict[str, str]:
    models: dict[str, str] = {}
    if cfg.eval.compare_base:
        models["base"] = resolve_model(cfg.train.base_model)
    trained = upstream(cfg, "train").get("model")
    if trained:
        models["finetuned"] = trained
    for name, path in cfg.eval.extra_models.items():
        models[name] = path if is_endpoint_spec(path) else resolve_model(path)
    return models


def load_encoder(model_path: str, cfg):
    """A SentenceTransformer, or an :class:`EndpointEncoder` for ``openai:<model>[@<base_url>]`` specs."""
    if is_endpoint_spec(model_path):
        return EndpointEncoder.from_spec(model_path, api_key_env=cfg.eval.endpoint_api_key_env,
                                         batch_size=cfg.eval.endpoint_batch_size, retry=cfg.llm)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=None)
    if cfg.eval.max_seq_length:
        model.max_seq_length = cfg.eval.max_seq_length
    return model


def score_run(qrels, run, cfg) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    return evaluate(qrels, run, ndcg_k=(10,), mrr_k=(10,), recall_k=(10, 100), map_k=(100,),
                    ignore_identical_ids=cfg.eval.ignore_identical_ids)


def evaluate_dense(name: str, model_path: str, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg) -> dict[str, Any]:
    """Metrics at the full dim and at each configured Matryoshka dim; per-query nDCG@10 at the full dim."""
    model = load_encoder(model_path, cfg)
    if isinstance(model, EndpointEncoder):
        key = None  # the endpoint encoder caches per batch itself
    else:
        key = cache_key(model_path, model.max_seq_length, role="document")
    # Roles: an asymmetric model (label-free, train.document_side: base) encodes queries and documents apart.
    doc_emb = encode(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                     role="document")  # (n_docs, dim)
    query_emb = encode(model, query_texts, cfg.eval.batch_size, desc=f"{name} query", role="query")  # (n_queries, dim)
    full_dim = doc_emb.shape[1]
    cosine = model.similarity_fn_name in (None, "cosine")
    result: dict[str, Any] = {}
    per_query: dict[str, dict[str, float]] = {}
    for dim in [full_dim] + [d for d in cfg.eval.dims if d < full_dim]:
        docs = truncate(doc_emb, dim, cosine) if dim < full_dim else doc_emb
        queries = truncate(query_emb, dim, cosine) if dim < full_dim else query_emb
        scores, indices = exact_search(docs, queries, cfg.eval.top_k)
        dim_run = to_run(query_ids, doc_ids, scores, indices)
        mean, pq = score_run(qrels, dim_run, cfg)
        if dim == full_dim:
            result.update(mean)
            per_query, full_run = pq, dim_run
        result.setdefault("dims", {})[str(dim)] = mean
    result["dim"] = full_dim
    if isinstance(model, EndpointEncoder):
        result["endpoint"] = vars(model.stats)
        model.close()
    # The full-dim run feeds hybrid/rerank rows; the embeddings feed the deployment sweep.
    return {"metrics": result, "per_query": per_query, "run": full_run, "doc_emb": doc_emb, "query_emb": query_emb,
            "cosine": cosine}


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


def run(cfg, force: bool = False) -> dict[str, str]:
    inputs = eval_inputs(cfg)
    models = models_to_evaluate(cfg)
    present = {k: v for k, v in inputs.items() if Path(v).is_file()}  # label-free: there may be no queries
    stage = Stage("eval", cfg.run_dir, config={"eval": cfg.eval, "models": sorted(models), "bm25": cfg.bm25},
                  inputs={**present, **{f"model_{k}": v for k, v in models.items() if Path(v).exists()},
                          **({"reranker": cfg.eval.reranker} if Path(cfg.eval.reranker or "-").exists() else {})})
    if not force and stage.up_to_date():
        print((stage.dir / "table.txt").read_text())
        return stage.outputs()
    check_rerank_on(cfg, models)
    if not Path(inputs["qrels"]).is_file() or not Path(inputs["queries"]).is_file():
        return no_labelled_queries(cfg, stage, inputs)

    corpus = load_corpus(inputs["corpus"], cfg.data.on_error)
    queries = load_queries(inputs["queries"], cfg.data.on_error)
    qrels = load_qrels(inputs["qrels"], corpus, queries, cfg.data.on_error)
    query_ids = sorted(qrels)
    if cfg.eval.max_queries:
        query_ids = query_ids[: cfg.eval.max_queries]
        logger.warning("eval.max_queries=%d: a quick look only, not a reportable number", cfg.eval.max_queries)
    qrels = {q: qrels[q] for q in query_ids}
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    query_texts = [queries[q] for q in query_ids]
    logger.info("eval on split '%s': %d queries, %d documents", cfg.eval.split, len(query_ids), len(doc_ids))

    results: dict[str, Any] = {}
    per_query: dict[str, Any] = {}
    wall: dict[str, float] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    sweep_rows: list[dict[str, Any]] = []
    for name, path in models.items():
        start = time.time()
        out = evaluate_dense(name, path, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg)
        results[name], per_query[name], runs[name] = out["metrics"], out["per_query"], out["run"]
        wall[name] = round(time.time() - start, 1)
        if cfg.eval.sweep.enabled:
            from eval.sweep import sweep_model

            start = time.time()
            sweep_rows += sweep_model(name, out["doc_emb"], out["query_emb"], doc_ids, query_ids, qrels,
                                      cfg.eval.sweep, out["cosine"], cfg.eval.ignore_identical_ids)
            wall[f"sweep_{name}"] = round(time.time() - start, 1)
    if cfg.eval.compare_bm25:
        start = time.time()
        scores, indices = bm25_search(doc_texts, query_texts, cfg.eval.top_k, cfg.bm25)
        runs["bm25"] = to_run(query_ids, doc_ids, scores, indices)
        results["bm25"], per_query["bm25"] = score_run(qrels, runs["bm25"], cfg)
        wall["bm25"] = round(time.time() - start, 1)
    for name in list(models) if cfg.eval.hybrid else []:
        for method in cfg.eval.hybrid:
            row = f"{name}+bm25_{method}"
            runs[row] = fuse(method, runs[name], runs["bm25"], rrf_k=cfg.eval.rrf_k,
                             dense_weight=cfg.eval.hybrid_weight, depth=cfg.eval.hybrid_depth)
            results[row], per_query[row] = score_run(qrels, runs[row], cfg)
    if cfg.eval.reranker:
        start = time.time()
        for row, run_ in rerank_rows(cfg, runs, models, dict(zip(query_ids, query_texts)),
                                     dict(zip(doc_ids, doc_texts))).items():
            runs[row] = run_
            results[row], per_query[row] = score_run(qrels, run_, cfg)
        wall["rerank"] = round(time.time() - start, 1)

    stage.dir.mkdir(parents=True, exist_ok=True)
    table = print_table(results, cfg.eval.split)
    significance = {}
    if cfg.eval.significance_resamples:
        significance = significance_table(per_query, default_pairs(list(results)), "ndcg@10",
                                          cfg.eval.significance_resamples, seed=cfg.seed)
        if significance:
            text = "paired significance of per-query nDCG@10:\n" + format_significance(significance)
            print(text)
            table += "\n\n" + text
    outputs = {"results": stage.dir / "results.json", "table": stage.dir / "table.txt"}
    if sweep_rows:
        from eval.sweep import format_sweep, plot_sweep

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
               "significance": significance}
    (stage.dir / "results.json").write_text(json.dumps(payload, indent=1))
    from embtune.tracking import log_eval_results  # wandb tables in the pipeline's group, when train.report_to has it

    log_eval_results(cfg, results, per_query, cfg.eval.split)
    return stage.finish(outputs)


def no_labelled_queries(cfg, stage, inputs: dict[str, str]) -> dict[str, str]:
    """A corpus without judged queries (label-free mode): nothing to measure. Say so plainly, and write an empty
    results file so that export and serve still work; any other mode is an error naming the missing file."""
    missing = inputs["qrels"] if not Path(inputs["qrels"]).is_file() else inputs["queries"]
    if cfg.data.queries != "labelfree":
        raise FileNotFoundError(f"{missing}: file not found (eval.split={cfg.eval.split} needs judged queries)")
    note = (f"no labelled queries to evaluate on ({missing} not found): the model was trained label-free from the "
            "corpus alone, and nothing measured it. Add judged queries (BEIR qrels/<split>.tsv) to measure it.")
    print(note)
    stage.dir.mkdir(parents=True, exist_ok=True)
    payload = {"split": cfg.eval.split, "num_queries": 0, "num_documents": None, "results": {}, "per_query": {},
               "note": note}
    (stage.dir / "results.json").write_text(json.dumps(payload, indent=1))
    (stage.dir / "table.txt").write_text(note + "\n")
    return stage.finish({"results": stage.dir / "results.json", "table": stage.dir / "table.txt"})


def check_rerank_on(cfg, models: dict[str, str]) -> None:
    """Fail before any encoding when ``eval.rerank_on`` names a row this run will not compute."""
    rows = {*models, *(["bm25"] if cfg.eval.compare_bm25 else []),
            *(f"{m}+bm25_{method}" for m in models for method in cfg.eval.hybrid)}
    missing = [name for name in cfg.eval.rerank_on if name not in rows]
    if cfg.eval.reranker and missing:
        raise ValueError(f"eval.rerank_on names rows this run does not compute: {missing} (rows: {sorted(rows)})")


def rerank_rows(cfg, runs: dict[str, Any], models: dict[str, str], query_texts: dict[str, str],
                doc_texts: dict[str, str]) -> dict[str, Any]:
    """``<row>>rerank`` for each row in ``eval.rerank_on`` (default: finetuned, else the first dense model)."""
    from sentence_transformers import CrossEncoder

    targets = cfg.eval.rerank_on or [next(m for m in ("finetuned", *models, "bm25") if m in runs)]
    scorer = CrossEncoder(resolve_model(cfg.eval.reranker), device=None)
    if cfg.eval.max_seq_length:
        scorer.max_length = cfg.eval.max_seq_length
    logger.info("reranking the top %d of %s with %s", cfg.eval.rerank_top_k, targets, cfg.eval.reranker)
    return {f"{t}>rerank": rerank(scorer, runs[t], query_texts, doc_texts, cfg.eval.rerank_top_k,
                                  cfg.eval.rerank_batch_size) for t in targets}
