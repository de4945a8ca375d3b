"""Choose a base model before fine-tuning: candidate models, BM25 and their hybrids, ranked on your own queries.

    python -m embtune.eval.choose CONFIG [key=value ...] [--candidates SPEC [SPEC ...]] [--out FILE]

Candidates (``eval.choose.candidates`` or ``--candidates``), in any mix:
  minilm                        an embtune.models alias (all-MiniLM-L6-v2, shipped on PyPI, offline)
  path/to/folder                a local SentenceTransformer folder
  BAAI/bge-small-en-v1.5        a hub name (needs the hub, or the model in the local HF cache; skipped otherwise)
  run:runs/demo                 the model an earlier embtune run trained (<run_dir>/train/manifest.json);
                                globs take every run that has one: run:runs/*
  openai:<model>[@<base_url>]   an OpenAI-compatible embeddings endpoint (eval/endpoint.py), e.g.
                                openai:text-embedding-3-small or openai:minilm@http://127.0.0.1:8000/v1
BM25 (the ``bm25`` section) and, for each dense candidate, its fusion with BM25 (``eval.choose.hybrid``) are rows too.

Queries (``eval.choose.queries``): ``dev`` is the dev split of the train queries (``data.dev_fraction``: data_prep's
``qrels/dev.tsv`` when it ran, else the same seeded split carved here); ``synthetic`` is data_prep's LLM queries
(``data.queries: synthetic``); ``auto`` takes dev when there is one. Never the test split: choosing on test would
make the final test number optimistic.

Per row: nDCG@10, MRR@10, recall@10/100 (exact FAISS search, pytrec_eval, as ``python -m embtune.eval``); the paired
randomization test of its per-query nDCG@10 against the best row; encode seconds per 1,000 documents (a seeded
sample encoded without the cache, so a warm cache does not flatter a model; BM25: tokenize, index and search); bytes
per vector (fp32). A fit check tokenizes a corpus sample with each candidate's tokenizer: a high share of its
unknown token means the model cannot read the corpus' script, and a dense row far below BM25 does not fit the corpus;
both are warnings in the output.

Writes ``<run_dir>/eval/choose.json`` (``eval.choose.out``) and the table as ``choose.txt`` beside it::

    {"queries": {"source", "qrels", "num_queries", "num_documents"}, "best": <row name>,
     "ranking": [{"rank", "name", "kind": "dense"|"bm25"|"hybrid", "spec", "model", "ndcg@10", "mrr@10",
                  "recall@10", "recall@100", "map@100", "vs_best": {"diff", "ci95", "p_value", "wins", ...} | null,
                  "dim", "bytes_per_vector", "encode_s_per_1k_docs", "fit": {"unknown_share", ...} | null,
                  "warnings": [...]}],
     "skipped": [{"candidate", "reason"}], "warnings": [...], "per_query": {<row>: {<query id>: nDCG@10}}, ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embtune.compute.encoding import encode_corpus
from embtune.dataio import document_text, load_corpus, load_qrels, load_queries, split_dev
from embtune.eval.deploy import hybrid_spec
from embtune.eval.endpoint import EndpointEncoder, is_endpoint_spec
from embtune.eval.inputs import load_encoder, upstream
from embtune.eval.significance import compare_systems
from embtune.models import resolve_model
from embtune.retrieval.encoder import cache_key, encode
from embtune.retrieval.metrics import METRICS, score_run
from embtune.retrieval.spec import BM25Index, DenseSpec, Retriever, RetrieverSpec

logger = logging.getLogger(__name__)

RUN_PREFIX = "run:"


@dataclass
class Candidate:
    name: str  # the row's label: the spec as written (one per run for run: globs)
    spec: str
    model: str  # a folder, a hub name or an openai: spec


@dataclass
class ChoiceQueries:
    source: str  # "dev" or "synthetic"
    qrels_path: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def resolve_candidates(specs: list[str]) -> tuple[list[Candidate], list[str]]:
    """Candidates from their specs (``run:`` globs expanded), and warnings for globs that matched no run."""
    candidates: list[Candidate] = []
    warnings: list[str] = []
    for spec in specs:
        if spec.startswith(RUN_PREFIX):
            pattern = spec[len(RUN_PREFIX):]
            is_glob = glob.has_magic(pattern)
            run_dirs = sorted(glob.glob(pattern)) if is_glob else [pattern]
            found = 0
            for run_dir in run_dirs:
                manifest = Path(run_dir) / "train" / "manifest.json"
                model = json.loads(manifest.read_text())["outputs"].get("model") if manifest.is_file() else None
                if model and Path(model).is_dir():
                    candidates.append(Candidate(f"{RUN_PREFIX}{run_dir}" if is_glob else spec, spec, model))
                    found += 1
                elif not is_glob:
                    raise FileNotFoundError(f"eval.choose.candidates: {spec!r}: no trained model in {manifest} "
                                            "(run the train stage there first)")
            if is_glob and not found:
                warnings.append(f"{spec}: no earlier run with a trained model matches")
        elif is_endpoint_spec(spec):
            candidates.append(Candidate(spec, spec, spec))
        else:
            candidates.append(Candidate(spec, spec, resolve_model(spec)))  # one not on disk is skipped when loaded
    seen: set[str] = set()
    unique = []
    for candidate in candidates:  # the same model named twice (an alias and its folder) is evaluated once
        if candidate.model not in seen:
            seen.add(candidate.model)
            unique.append(candidate)
    return unique, warnings


def _chunk_parent(doc_id: str, corpus: dict[str, Any]) -> str:
    """Synthetic queries of a chunked corpus are judged against ``<doc id>#<n>`` chunks; eval reads whole documents."""
    return doc_id if doc_id in corpus else doc_id.rsplit("#", 1)[0]


def choice_queries(cfg) -> ChoiceQueries:
    """The queries that rank the candidates (``eval.choose.queries``); never the test split."""
    data_out = upstream(cfg, "data_prep")
    folder = data_out.get("eval_dataset") or (cfg.data.path if cfg.data.format == "beir" else None)
    if not folder:
        raise FileNotFoundError(f"eval.choose: no corpus; run data_prep first (no {cfg.run_dir}/data_prep/"
                                "manifest.json) or point data.path at a BEIR folder")
    folder = Path(folder)
    on_error = cfg.data.on_error
    corpus = load_corpus(folder / "corpus.jsonl", on_error)
    queries = load_queries(folder / "queries.jsonl", on_error)
    wanted = cfg.eval.choose.queries
    if wanted in ("auto", "dev"):
        if "dev_qrels" in data_out:
            qrels = load_qrels(data_out["dev_qrels"], corpus, queries, on_error)
            return ChoiceQueries("dev", str(data_out["dev_qrels"]), corpus, queries, qrels)
        train = folder / "qrels" / f"{cfg.data.train_split}.tsv"
        if cfg.data.dev_fraction > 0 and train.is_file():
            _, dev = split_dev(load_qrels(train, corpus, queries, on_error), cfg.data.dev_fraction, cfg.seed)
            return ChoiceQueries("dev", f"{train} (dev_fraction {cfg.data.dev_fraction}, seed {cfg.seed})",
                                 corpus, queries, dev)
        if wanted == "dev":
            raise ValueError("eval.choose.queries=dev: no dev split; set data.dev_fraction (e.g. 0.2) to carve it "
                             f"from {train}")
    if "synthetic_qrels" in data_out:
        synthetic = load_queries(data_out["synthetic_queries"], on_error)
        qrels: dict[str, dict[str, int]] = {}
        for line in Path(data_out["synthetic_qrels"]).read_text().splitlines()[1:]:
            query_id, doc_id, score = line.split("\t")
            qrels.setdefault(query_id, {})[_chunk_parent(doc_id, corpus)] = int(score)
        return ChoiceQueries("synthetic", str(data_out["synthetic_qrels"]), corpus, {**queries, **synthetic}, qrels)
    raise ValueError("eval.choose: no queries to choose on. Set data.dev_fraction (e.g. 0.2) to carve a dev split "
                     "from the labelled train queries, or, without labels, run data_prep with data.queries=synthetic "
                     "first (python -m embtune.data_prep CONFIG data.queries=synthetic)")


def fit_check(tokenizer, texts: list[str], max_seq_length: int) -> dict[str, Any]:
    """How well a tokenizer reads the corpus: the share of its unknown token, and of documents cut by truncation."""
    unk = tokenizer.unk_token_id
    total = unknown = truncated = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        total += len(ids)
        unknown += sum(1 for i in ids if i == unk) if unk is not None else 0
        truncated += len(ids) + 2 > max_seq_length  # + [CLS]/[SEP] or the model's equivalents
    return {"documents": len(texts), "tokens": total, "unknown_token": tokenizer.unk_token,
            "unknown_share": unknown / total if total else 0.0,
            "tokens_per_document": total / len(texts) if texts else 0.0,
            "truncated_share": truncated / len(texts) if texts else 0.0, "max_seq_length": max_seq_length}


def evaluate_candidate(candidate: Candidate, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg,
                       sample_idx: list[int], fit_idx: list[int], bm25: BM25Index | None = None) -> dict[str, Any]:
    """One dense candidate: metrics, per-query nDCG@10, timing, size and fit; its ``Retriever`` (sharing ``bm25``)
    and query embeddings for the hybrid rows.

    Documents are encoded by the document role and queries by the query role (``encode(..., role=)``), so an
    asymmetric model (a label-free Router) is scored through its query route, as eval and serve score it."""
    model = load_encoder(candidate.model, cfg, calibration_texts=doc_texts)
    endpoint = isinstance(model, EndpointEncoder)
    sample = [doc_texts[i] for i in sample_idx]
    cached_before = model.stats.cached_batches if endpoint else 0
    start = time.perf_counter()
    encode(model, sample, cfg.eval.batch_size, desc=f"{candidate.name} timing sample")  # no cache key: timed for real
    seconds = time.perf_counter() - start
    # An endpoint caches its batches itself; a sample it answered from its cache was not timed.
    per_1k = None if endpoint and model.stats.cached_batches > cached_before else 1000 * seconds / len(sample)

    key = None if endpoint else cache_key(candidate.model, model.max_seq_length, role="document")
    doc_emb = encode_corpus(model, doc_texts, cfg.eval.batch_size, cache_key=key, desc=f"{candidate.name} corpus",
                            role="document")  # (n_docs, dim), or the Ray engine's shards
    query_emb = encode(model, query_texts, cfg.eval.batch_size, desc=f"{candidate.name} query",
                       role="query")  # (n_queries, dim)
    spec = RetrieverSpec(dense=DenseSpec(model=candidate.model, dim=int(doc_emb.shape[1])))
    retriever = Retriever(spec, doc_ids, doc_texts, doc_emb, bm25=bm25)
    run = retriever.search(query_texts, query_emb, cfg.eval.top_k, query_ids)
    metrics, per_query = score_run(qrels, run, METRICS, cfg.eval.ignore_identical_ids)
    fit = None
    if not endpoint and getattr(model, "tokenizer", None) is not None:
        fit = fit_check(model.tokenizer, [doc_texts[i] for i in fit_idx], model.max_seq_length)
    if endpoint:
        model.close()
    dim = int(doc_emb.shape[1])
    return {"row": {"name": candidate.name, "kind": "dense", "spec": candidate.spec, "model": candidate.model,
                    **metrics, "dim": dim, "bytes_per_vector": 4 * dim, "encode_s_per_1k_docs": per_1k, "fit": fit},
            "per_query": per_query, "retriever": retriever, "query_emb": query_emb}


def choose(cfg, candidates: list[str] | None = None, out_path: str | Path | None = None) -> dict[str, Any]:
    """Rank the candidates, BM25 and the hybrids on the choice queries; write choose.json and choose.txt."""
    settings = cfg.eval.choose
    started = time.time()
    chosen, warnings = resolve_candidates(candidates if candidates is not None else settings.candidates)
    data = choice_queries(cfg)
    query_ids = sorted(data.qrels)
    if settings.max_queries:
        query_ids = query_ids[: settings.max_queries]
        logger.warning("eval.choose.max_queries=%d: a quick look only", settings.max_queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    doc_ids = list(data.corpus)
    # Titles as eval reads them and the bundle embeds them (mining.include_title): the choice ranks what ships.
    doc_texts = [document_text(data.corpus[d], cfg.mining.include_title) for d in doc_ids]
    query_texts = [data.queries[q] for q in query_ids]
    logger.info("choosing on %d %s queries over %d documents: %d candidates", len(query_ids), data.source,
                len(doc_ids), len(chosen))
    if data.source == "synthetic":
        warnings.append("ranked on synthetic queries, which data_prep's round trip kept only when BM25 or the base "
                        "model found their passage: they favour those two; prefer labelled dev queries")
    rng = random.Random(cfg.seed)
    sample_idx = sorted(rng.sample(range(len(doc_ids)), min(settings.timing_documents, len(doc_ids))))
    fit_idx = sorted(rng.sample(range(len(doc_ids)), min(settings.fit_documents, len(doc_ids))))

    rows: dict[str, dict[str, Any]] = {}
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    searched: dict[str, dict[str, Any]] = {}  # dense row -> its retriever and query embeddings
    skipped: list[dict[str, str]] = []
    bm25 = bm25_seconds = None
    if settings.bm25:  # one BM25 index (the bm25 section) for the BM25 row and every hybrid
        start = time.perf_counter()
        bm25 = BM25Index(doc_texts, cfg.bm25)
        bm25_seconds = time.perf_counter() - start
    for candidate in chosen:
        try:
            out = evaluate_candidate(candidate, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg,
                                     sample_idx, fit_idx, bm25)
        except OSError as err:  # a hub name with no hub (offline) and no local copy
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            skipped.append({"candidate": candidate.spec, "reason": reason})
            warnings.append(f"{candidate.spec}: skipped ({reason})")
            continue
        rows[candidate.name], per_query[candidate.name] = out["row"], out["per_query"]
        searched[candidate.name] = out
    dense = list(rows)
    if settings.bm25:
        start = time.perf_counter()
        run = Retriever(RetrieverSpec(dense=None, bm25=cfg.bm25), doc_ids, doc_texts, bm25=bm25).search(
            query_texts, None, cfg.eval.top_k, query_ids)
        seconds = bm25_seconds + time.perf_counter() - start  # tokenize and index, then search
        metrics, per_query["bm25"] = score_run(qrels, run, METRICS, cfg.eval.ignore_identical_ids)
        rows["bm25"] = {"name": "bm25", "kind": "bm25", "spec": "bm25", "model": None, **metrics, "dim": None,
                        "bytes_per_vector": None, "encode_s_per_1k_docs": 1000 * seconds / len(doc_ids), "fit": None}
    for name in dense if settings.bm25 else []:
        retriever, query_emb = searched[name]["retriever"], searched[name]["query_emb"]
        for method in settings.hybrid:
            row = f"{name}+bm25_{method}"
            # eval's hybrid rows: the same fusion settings through the same Retriever.
            run = retriever.search(query_texts, query_emb, cfg.eval.top_k, query_ids,
                                   spec=hybrid_spec(retriever.spec, cfg, method))
            metrics, per_query[row] = score_run(qrels, run, METRICS, cfg.eval.ignore_identical_ids)
            rows[row] = {**rows[name], "name": row, "kind": "hybrid", **metrics}
            rows[row]["fit"] = None  # the dense row carries the fit check
    if not rows:
        raise RuntimeError(f"eval.choose: no candidate could be evaluated: {skipped}")

    ranking = sorted(rows.values(), key=lambda r: -r["ndcg@10"])
    best = ranking[0]["name"]
    for rank, row in enumerate(ranking, start=1):
        row["rank"] = rank
        row["vs_best"] = None if row["name"] == best else compare_systems(
            per_query[best], per_query[row["name"]], "ndcg@10", settings.resamples, seed=cfg.seed)
        row["warnings"] = row_warnings(row, rows.get("bm25"), settings)
        warnings += [f"{row['name']}: {text}" for text in row["warnings"]]
    for text in warnings:
        logger.warning("%s", text)

    table = format_table(ranking, data.source, len(query_ids), len(doc_ids))
    print(table)
    print(f"best on {data.source}: {best}" + "".join(f"\nwarning: {w}" for w in warnings))
    result = {"queries": {"source": data.source, "qrels": data.qrels_path, "num_queries": len(query_ids),
                          "num_documents": len(doc_ids)},
              "best": best, "ranking": ranking, "skipped": skipped, "warnings": warnings,
              "settings": dataclasses.asdict(settings), "top_k": cfg.eval.top_k,
              "max_seq_length": cfg.eval.max_seq_length or "model's own",
              "per_query": {row: {q: m["ndcg@10"] for q, m in pq.items()} for row, pq in per_query.items()},
              "wall_seconds": round(time.time() - started, 1)}
    out = Path(out_path or settings.out or Path(cfg.run_dir) / "eval" / "choose.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".txt").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return result


def row_warnings(row: dict[str, Any], bm25: dict[str, Any] | None, settings) -> list[str]:
    """Why a candidate may not fit the corpus (empty when nothing is wrong)."""
    out = []
    fit = row.get("fit")
    if fit and fit["unknown_share"] > settings.max_unknown_share:
        out.append(f"{fit['unknown_share']:.0%} of its tokens on {fit['documents']} corpus documents are "
                   f"{fit['unknown_token']}: its tokenizer cannot read this text (another language or script?); "
                   "choose a model whose vocabulary covers it")
    if row["kind"] == "dense" and bm25 and row["ndcg@10"] < settings.min_share_of_bm25 * bm25["ndcg@10"]:
        share = row["ndcg@10"] / bm25["ndcg@10"] if bm25["ndcg@10"] else 0.0
        out.append(f"nDCG@10 {100 * row['ndcg@10']:.2f} is {share:.0%} of BM25's {100 * bm25['ndcg@10']:.2f}: "
                   "it does not fit this corpus")
    if fit and fit["truncated_share"] > 0.5:
        out.append(f"{fit['truncated_share']:.0%} of sampled documents are longer than its max_seq_length "
                   f"({fit['max_seq_length']} tokens) and are cut; consider chunking.max_tokens")
    return out


def format_table(ranking: list[dict[str, Any]], source: str, n_queries: int, n_docs: int) -> str:
    width = max([14, *(len(r["name"]) + 2 for r in ranking)])
    header = (f"{'#':>2} {'row':<{width}}{'nDCG@10':>9}{'R@100':>8}{'vs best':>9}{'p':>8}"
              f"{'s/1k docs':>11}{'bytes/vec':>11}{'unk':>7}")
    lines = [f"choosing a base model on {n_queries} {source} queries, {n_docs} documents (percent)", header,
             "-" * len(header)]
    for r in ranking:
        vs = r["vs_best"]
        unk = r["fit"]["unknown_share"] if r.get("fit") else None
        lines.append(
            f"{r['rank']:>2} {r['name']:<{width}}{100 * r['ndcg@10']:>9.2f}{100 * r['recall@100']:>8.2f}"
            + (f"{100 * vs['diff']:>+9.2f}{vs['p_value']:>8.3g}" if vs else f"{'best':>9}{'':>8}")
            + (f"{r['encode_s_per_1k_docs']:>11.1f}" if r["encode_s_per_1k_docs"] is not None else f"{'-':>11}")
            + (f"{r['bytes_per_vector']:>11d}" if r["bytes_per_vector"] else f"{'sparse':>11}")
            + (f"{100 * unk:>6.1f}%" if unk is not None else f"{'-':>7}")
            + ("  !" if r["warnings"] else ""))
    return "\n".join(lines)


def _choose_keys() -> str:
    from embtune.cli import describe_class
    from embtune.sections.eval import ChooseConfig

    lines = ["Config keys (override any with eval.choose.<key>=value):", *describe_class(ChooseConfig, "eval.choose")]
    lines.append("Also read: data.path / data.format / data.dev_fraction / seed, bm25.*, eval.max_seq_length, "
                 "eval.batch_size, eval.top_k, eval.rrf_k, eval.hybrid_weight, eval.hybrid_depth, run_dir.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from embtune.cli import exit_code, parse_config_args

    parser = argparse.ArgumentParser(prog="python -m embtune.eval.choose", description=__doc__,
                                     epilog=_choose_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.dev_fraction=0.2")
    parser.add_argument("--candidates", nargs="+", metavar="SPEC",
                        help="candidate models (replaces eval.choose.candidates); forms above")
    parser.add_argument("--out", help="result path (default: <run_dir>/eval/choose.json)")
    args, cfg = parse_config_args(parser, argv)
    if cfg is None:
        return 2
    return exit_code(lambda: choose(cfg, args.candidates, args.out), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
