"""eval stage: base model vs fine-tuned model vs BM25 on a held-out split, at every Matryoshka dim.

Reads the BEIR folder named by data_prep's manifest (or ``data.path`` for BEIR data when data_prep has not run),
encodes the corpus once per model (cached on disk by weights and text hash), searches every row through the
``Retriever`` the server runs (``embtune/retrieval/spec.py``: a FAISS exact inner-product index, FastBM25, fusion),
and scores with pytrec_eval as BEIR/MTEB do (see ``eval/metrics.py``).

Writes ``<run_dir>/eval/results.json``::

    {"split", "num_queries", "num_documents",
     "results": {"base"|"finetuned"|"bm25"|<extra>: {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100",
                                                    "dims": {"256": {...same metrics...}, ...}}},
     "per_query": {<model>: {<query id>: {"ndcg@10": ...}}}, "wall_seconds": {<model>: s},
     "significance": {"finetuned vs base": {"diff", "ci95", "p_value", "wins", "ties", "losses", ...}, ...},
     "specs": {<row>: <RetrieverSpec as JSON>},  # the retrieval system each row measured
     "recommended": {"row", "ndcg@10", "spec", "split", "best_single": {"row", "ndcg@10"}, "why"}}

``recommended`` is the best dense, BM25 or hybrid row by nDCG@10 (see :func:`recommend`); export writes its spec
into the bundle (``retriever.json``) and ``/search`` serves it.

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

from embtune.config import ConfigError
from embtune.dataio import document_text, load_corpus, load_qrels, load_queries
from embtune.eval.endpoint import EndpointEncoder, is_endpoint_spec
from embtune.eval.metrics import evaluate
from embtune.eval.significance import default_pairs, format_significance, significance_table
from embtune.manifest import Stage
from embtune.models import resolve_model
from embtune.retrieval.bm25 import bm25_search
from embtune.retrieval.encoder import cache_key, encode, encode_corpus
from embtune.retrieval.encoder import load_encoder as load_core_encoder
from embtune.retrieval.index import to_run
from embtune.retrieval.probe import lexical_check
from embtune.retrieval.rerank import rerank
from embtune.retrieval.spec import (
    BM25Index,
    DenseSpec,
    FusionSpec,
    RerankSpec,
    Retriever,
    RetrieverSpec,
    replace_rows,
)

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
    train_manifest = Path(cfg.run_dir) / "train" / "manifest.json"
    if trained and json.loads(train_manifest.read_text()).get("trained", True):  # label-free may train no student
        models["finetuned"] = trained
    for name, path in cfg.eval.extra_models.items():
        models[name] = path if is_endpoint_spec(path) else resolve_model(path)
    return models


def load_encoder(model_path: str, cfg):
    """The core encoder on ``eval.backend`` (torch, onnx, onnx-int8), or an :class:`EndpointEncoder` for
    ``openai:<model>[@<base_url>]`` specs."""
    if is_endpoint_spec(model_path):
        return EndpointEncoder.from_spec(model_path, api_key_env=cfg.eval.endpoint_api_key_env,
                                         batch_size=cfg.eval.endpoint_batch_size, retry=cfg.llm)
    model, _ = load_core_encoder(model_path, cfg.eval.max_seq_length, backend=cfg.eval.backend,
                                 threads=cfg.eval.threads)
    return model


def score_run(qrels, run, cfg) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    return evaluate(qrels, run, ndcg_k=(10,), mrr_k=(10,), recall_k=(10, 100), map_k=(100,),
                    ignore_identical_ids=cfg.eval.ignore_identical_ids)


def evaluate_dense(name: str, model_path: str, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg,
                   bm25: BM25Index | None = None) -> dict[str, Any]:
    """Metrics at the full dim and at each configured Matryoshka dim; per-query nDCG@10 at the full dim.

    Every dim is searched through one :class:`Retriever` (the one the server runs), which is returned for the
    hybrid rows of this model.
    """
    model = load_encoder(model_path, cfg)
    if isinstance(model, EndpointEncoder):
        key = None  # the endpoint encoder caches per batch itself
    else:
        key = cache_key(model_path, model.max_seq_length, role="document")
    # Roles: an asymmetric model (label-free, train.document_side: base) encodes queries and documents apart.
    # On the Ray engine the corpus stays in its shards and the Retriever searches them there.
    doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                            role="document")  # (n_docs, dim) or a ShardSet
    query_emb = encode_queries(model, query_texts, cfg)  # (n_queries, dim)
    full_dim = doc_emb.shape[1]
    cosine = model.similarity_fn_name in (None, "cosine")
    if not cosine:
        logger.warning("%s scores by %s, not cosine: Matryoshka dims are renormalized as for cosine", name,
                       model.similarity_fn_name)
    spec = RetrieverSpec(dense=DenseSpec(model=model_path, dim=full_dim))
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb, bm25=bm25)
    result: dict[str, Any] = {}
    per_query: dict[str, dict[str, float]] = {}
    for dim in [full_dim] + [d for d in cfg.eval.dims if d < full_dim]:
        dim_spec = spec.replace(dense=DenseSpec(model=model_path, dim=dim))
        dim_run = retriever.search(query_texts, query_emb, cfg.eval.top_k, query_ids, spec=dim_spec)
        mean, pq = score_run(qrels, dim_run, cfg)
        if dim == full_dim:
            result.update(mean)
            per_query, full_run = pq, dim_run
        result.setdefault("dims", {})[str(dim)] = mean
    result["dim"] = full_dim
    if isinstance(model, EndpointEncoder):
        result["endpoint"] = vars(model.stats)
        model.close()
    # The full-dim run feeds rerank rows; the retriever the hybrid rows; the embeddings the deployment sweep.
    return {"metrics": result, "per_query": per_query, "run": full_run, "doc_emb": doc_emb, "query_emb": query_emb,
            "cosine": cosine, "spec": spec, "retriever": retriever}


def encode_queries(model, query_texts: list[str], cfg):
    """Query embeddings, (n_queries, dim), each query in a batch of its own, as the server encodes a request.

    A batch pads its texts to the longest one, and the padded forward pass rounds differently in the last bits,
    enough to swap two near-tied documents: encoded alone, the eval's query vector is the one ``/search``
    computes for that query at the same torch thread count, so the measured ranking is the served one
    (scripts/bench_serve_parity.py, which also measures what another thread count moves).
    """
    if isinstance(model, EndpointEncoder):  # a remote model: its batches are its own business
        return encode(model, query_texts, cfg.eval.batch_size, desc="query", role="query")
    return encode(model, query_texts, 1, desc="query (one per batch)", role="query")


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
    return {"eval": section, "models": names, "bm25": to_dict(cfg.bm25), "seed": cfg.seed,
            "on_error": cfg.data.on_error, "deploy_choice": choice}


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
    specs: dict[str, RetrieverSpec] = {}
    retrievers: dict[str, Retriever] = {}
    query_embs: dict[str, Any] = {}
    sweep_rows: list[dict[str, Any]] = []
    # One BM25 index for the BM25 row and every model's hybrid rows.
    bm25 = BM25Index(doc_texts, cfg.bm25) if cfg.eval.compare_bm25 else None
    for name, path in models.items():
        start = time.time()
        out = evaluate_dense(name, path, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg, bm25=bm25)
        results[name], per_query[name], runs[name] = out["metrics"], out["per_query"], out["run"]
        specs[name], retrievers[name], query_embs[name] = out["spec"], out["retriever"], out["query_emb"]
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
        specs["bm25"] = RetrieverSpec(dense=None, bm25=cfg.bm25)
        if cfg.bm25.backend == "rank_bm25":  # the reference implementation, for checking FastBM25 on new data
            scores, indices = bm25_search(doc_texts, query_texts, cfg.eval.top_k, cfg.bm25)
            runs["bm25"] = to_run(query_ids, doc_ids, scores, indices)
        else:
            runs["bm25"] = Retriever(specs["bm25"], doc_ids, doc_texts, bm25=bm25).search(
                query_texts, None, cfg.eval.top_k, query_ids)
        results["bm25"], per_query["bm25"] = score_run(qrels, runs["bm25"], cfg)
        wall["bm25"] = round(time.time() - start, 1)
    dev = dev_rows(cfg, models, doc_ids, doc_texts, bm25)
    deploy = deploy_choice(cfg, models, doc_ids, doc_texts, dev)
    for name in list(models) if cfg.eval.hybrid else []:
        for method in cfg.eval.hybrid:
            row = f"{name}+bm25_{method}"
            specs[row] = hybrid_spec(specs[name], cfg, method, chosen_weight(deploy, name, cfg))
            runs[row] = retrievers[name].search(query_texts, query_embs[name], cfg.eval.top_k, query_ids,
                                                spec=specs[row])
            results[row], per_query[row] = score_run(qrels, runs[row], cfg)
    if cfg.eval.reranker:
        start = time.time()
        for row, run_ in rerank_rows(cfg, runs, models, dict(zip(query_ids, query_texts)),
                                     dict(zip(doc_ids, doc_texts))).items():
            runs[row] = run_
            results[row], per_query[row] = score_run(qrels, run_, cfg)
            target = row[: -len(">rerank")]
            specs[row] = specs[target].replace(rerank=RerankSpec(model=cfg.eval.reranker,
                                                                 top_k=cfg.eval.rerank_top_k))
        wall["rerank"] = round(time.time() - start, 1)
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
    corpus = load_corpus(inputs["corpus"], cfg.data.on_error)
    doc_ids = list(corpus)
    models = models_to_evaluate(cfg)
    deploy = deploy_choice(cfg, models, doc_ids, [document_text(corpus[d]) for d in doc_ids], None)
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
    """``<row>>rerank`` for each row in ``eval.rerank_on`` (default: finetuned, else the first dense model)."""
    from sentence_transformers import CrossEncoder

    targets = cfg.eval.rerank_on or [next(m for m in ("finetuned", *models, "bm25") if m in runs)]
    scorer = CrossEncoder(resolve_model(cfg.eval.reranker), device=None)
    if cfg.eval.max_seq_length:
        scorer.max_length = cfg.eval.max_seq_length
    logger.info("reranking the top %d of %s with %s", cfg.eval.rerank_top_k, targets, cfg.eval.reranker)
    return {f"{t}>rerank": rerank(scorer, runs[t], query_texts, doc_texts, cfg.eval.rerank_top_k,
                                  cfg.eval.rerank_batch_size) for t in targets}


# Dense weights of the weighted fusion tried on the dev split (0 = BM25 alone ... 1 = dense alone).
DEV_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Rows the deploy choice compares, simplest first: on a tie the earlier one ships.
DEPLOY_ORDER = ("base", "bm25", "base+bm25_weighted", "finetuned", "finetuned+bm25_weighted")


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
    bm25 = BM25Index(texts, cfg.bm25)
    mrr: dict[str, float] = {}
    weights: dict[str, float] = {}
    specs: dict[str, RetrieverSpec] = {}
    ids = probe.query_ids()
    low = probe.least_lexical(bm25.tokenizer)  # the lexical check's queries (embtune.retrieval.probe)
    low_mrr: dict[str, float] = {}
    specs["bm25"] = RetrieverSpec(dense=None, bm25=cfg.bm25)
    bm25_run = Retriever(specs["bm25"], doc_ids, texts, bm25=bm25).search(probe.queries, None, 10, ids)
    mrr["bm25"], low_mrr["bm25"] = probe.mrr(bm25_run), probe.mrr(bm25_run, only=low)
    for name in ("base", "finetuned"):
        if name not in models:
            continue
        model = load_encoder(models[name], cfg)
        key = cache_key(models[name], model.max_seq_length, role="document")
        doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                                role="document")  # (n_docs, dim) or a ShardSet; the cached full corpus
        if cut_rows:
            doc_emb = replace_rows(doc_emb, cut_rows, encode(model, cut_texts, cfg.eval.batch_size,
                                                             desc=f"{name} probe passages", role="document"))
        query_emb = encode(model, probe.queries, cfg.eval.batch_size, desc=f"{name} probe queries", role="query")
        specs[name] = RetrieverSpec(dense=DenseSpec(model=models[name], dim=doc_emb.shape[1]))
        retriever = Retriever(specs[name], doc_ids, texts, doc_emb, bm25=bm25)
        dense_run = retriever.search(probe.queries, query_emb, 10, ids)
        mrr[name], low_mrr[name] = probe.mrr(dense_run), probe.mrr(dense_run, only=low)
        by_weight, by_weight_low = {1.0: mrr[name]}, {1.0: low_mrr[name]}
        for w in cfg.labelfree.probe_weights:
            spec = specs[name].replace(bm25=cfg.bm25, fusion=FusionSpec(
                method="weighted", dense_weight=w, rrf_k=cfg.eval.rrf_k, depth=cfg.eval.hybrid_depth))
            run_ = retriever.search(probe.queries, query_emb, 10, ids, spec=spec)
            by_weight[w], by_weight_low[w] = probe.mrr(run_), probe.mrr(run_, only=low)
        # only weights passing the lexical check against this model alone; ties go to the denser
        passing = [w for w in by_weight if w >= 1 or by_weight_low[w] > low_mrr[name]]
        weights[name] = max(passing, key=lambda w: (by_weight[w], w))
        fused = f"{name}+bm25_weighted"
        specs[fused] = specs[name].replace(bm25=cfg.bm25, fusion=FusionSpec(
            method="weighted", dense_weight=weights[name], rrf_k=cfg.eval.rrf_k, depth=cfg.eval.hybrid_depth))
        mrr[fused], low_mrr[fused] = by_weight[weights[name]], by_weight_low[weights[name]]
    return mrr, specs, weights, {"queries": len(low), "mrr@10": low_mrr}


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
    if "bm25" in mrr and "base" in low and not lexical_check(low["bm25"], low["base"], least_lexical["queries"])[
            "passes"]:
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


def dev_rows(cfg, models: dict[str, str], doc_ids: list[str], doc_texts: list[str],
             bm25: BM25Index | None) -> dict[str, Any] | None:
    """nDCG@10 on data_prep's dev split of every deploy row, each model's fusion weight chosen there (from
    :data:`DEV_WEIGHTS`); None without a dev split or when eval reports the dev split itself."""
    data_out = upstream(cfg, "data_prep")
    if cfg.eval.split == "dev" or "dev_qrels" not in data_out:
        return None
    folder = Path(eval_inputs(cfg)["corpus"]).parent
    corpus = {d: None for d in doc_ids}
    queries = load_queries(folder / "queries.jsonl", cfg.data.on_error)
    qrels = load_qrels(data_out["dev_qrels"], corpus, queries, cfg.data.on_error)
    query_ids = sorted(qrels)
    query_texts = [queries[q] for q in query_ids]
    bm25 = bm25 or BM25Index(doc_texts, cfg.bm25)
    scores: dict[str, float] = {}
    specs: dict[str, RetrieverSpec] = {"bm25": RetrieverSpec(dense=None, bm25=cfg.bm25)}
    run_ = Retriever(specs["bm25"], doc_ids, doc_texts, bm25=bm25).search(query_texts, None, cfg.eval.top_k,
                                                                         query_ids)
    scores["bm25"] = round(100 * score_run(qrels, run_, cfg)[0]["ndcg@10"], 2)
    weights: dict[str, float] = {}
    for name in ("base", "finetuned"):
        if name not in models:
            continue
        model = load_encoder(models[name], cfg)
        key = cache_key(models[name], model.max_seq_length, role="document")
        doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{name} corpus",
                                role="document")
        query_emb = encode_queries(model, query_texts, cfg)
        specs[name] = RetrieverSpec(dense=DenseSpec(model=models[name], dim=doc_emb.shape[1]))
        retriever = Retriever(specs[name], doc_ids, doc_texts, doc_emb, bm25=bm25)
        scores[name] = round(100 * score_run(qrels, retriever.search(query_texts, query_emb, cfg.eval.top_k,
                                                                     query_ids), cfg)[0]["ndcg@10"], 2)
        by_weight = {}
        for w in DEV_WEIGHTS:
            spec = specs[name].replace(bm25=cfg.bm25, fusion=FusionSpec(method="weighted", dense_weight=w,
                                                                         rrf_k=cfg.eval.rrf_k,
                                                                         depth=cfg.eval.hybrid_depth))
            by_weight[w] = round(100 * score_run(qrels, retriever.search(query_texts, query_emb, cfg.eval.top_k,
                                                                         query_ids, spec=spec), cfg)[0]["ndcg@10"], 2)
        weights[name] = max(by_weight, key=lambda w: (by_weight[w], w))
        fused = f"{name}+bm25_weighted"
        specs[fused] = specs[name].replace(bm25=cfg.bm25, fusion=FusionSpec(
            method="weighted", dense_weight=weights[name], rrf_k=cfg.eval.rrf_k, depth=cfg.eval.hybrid_depth))
        scores[fused] = by_weight[weights[name]]
    return {"ndcg@10": scores, "specs": specs, "dense_weight": weights, "num_queries": len(query_ids)}
