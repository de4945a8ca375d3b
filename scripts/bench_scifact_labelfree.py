"""Label-free SciFact benchmark: pseudo-queries cut from the corpus, the fused dense + BM25 teacher, the query side
distilled (``data.queries: labelfree``, docs/labelfree.md). No SciFact query is trained on. Settings are chosen on
dev (half the SciFact *train* queries, seeded), then the shipped default is evaluated on test once.

    # 1. dev: variants (overrides on configs/scifact_labelfree.yaml); test is never read
    python scripts/bench_scifact_labelfree.py --phase dev --variants default,keep_source,margin_mse
    # 2. test: the shipped default (configs/scifact_labelfree.yaml as it is), the whole pipeline, timed
    python scripts/bench_scifact_labelfree.py --phase final
    # pydoc: the same default on the embedded demo corpus (its summary-line test split)
    python scripts/bench_scifact_labelfree.py --phase pydoc
    # the query side's ceiling on dev: free query vectors fitted by the loss against the base index
    python scripts/bench_scifact_labelfree.py --phase ceiling

Dev variants that change only the ``train`` section share one data_prep run (its stage is skipped), so a dev
comparison of losses costs training time only. Each dev variant is scored two ways: ``query_side`` (the student's
query embeddings against the base model's corpus embeddings, the index data_prep wrote: what a user who keeps their
index gets, and seconds to compute) and, with ``--symmetric``, the eval stage (the student encodes both sides).

Writes ``benchmarks/results/scifact_labelfree_dev.json`` and ``benchmarks/results/scifact_labelfree.json``
(``results.{base,bm25,teacher,finetuned}`` in percent, ``significance``, ``wall_seconds``, ``command``,
``machine``, ``versions``) and ``benchmarks/results/pydoc_labelfree.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.cli import setup_logging  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
from benchlib import bench_command, percent, run_recipe, write_result  # noqa: E402  (scripts/benchlib.py)

# Dotted overrides on configs/scifact_labelfree.yaml, grouped by the data_prep they need: variants of one group
# share a run folder (and its data_prep), so only their training runs.
# The query_kl recipe (the default); the variants measured with it keep it if the default changes.
QUERY_KL = ["labelfree.documents=10000", "labelfree.sentences_per_document=4", "labelfree.positives=none",
            "train.loss=query_kl", "train.learning_rate=5e-5"]
# The first query_fused screens, before the default took query_fused (lr 5e-5, the student's own statistics).
FUSED_THEN = ["train.learning_rate=5e-5", "train.query_fused_stats=student"]
# The recipe before commit 9328c5f; the variants recorded then are pinned to it so that they reproduce by name.
PREVIOUS = [*QUERY_KL, "labelfree.documents=2000", "labelfree.sentences_per_document=2", "train.learning_rate=2e-5"]
VARIANTS = {
    "default": [],  # configs/scifact_labelfree.yaml as it is (the dev file's "default" entry: the query_kl one)
    "default_ep2": [*QUERY_KL, "train.epochs=2"],
    "depth64": [*QUERY_KL, "labelfree.depth=64"],
    "s8": [*QUERY_KL, "labelfree.sentences_per_document=8"],
    # query style at a small scale (2,000 passages, 2 sentences each: ~6k queries, ~190 steps)
    "small": [*QUERY_KL, "labelfree.documents=2000", "labelfree.sentences_per_document=2"],
    "small_span4-12": [*QUERY_KL, "labelfree.documents=2000", "labelfree.sentences_per_document=2",
                       "labelfree.span_words=[4,12]"],
    "small_span8-16": [*QUERY_KL, "labelfree.documents=2000", "labelfree.sentences_per_document=2",
                       "labelfree.span_words=[8,16]"],
    # every title, no sentence
    "small_titles": [*QUERY_KL, "labelfree.documents=0", "labelfree.sentences_per_document=0"],
    "span4-12": [*QUERY_KL, "labelfree.span_words=[4,12]"],
    "previous_default": PREVIOUS,
    # issue 32: the query side trained through the fused score (train.loss query_fused: the cut-out passage's
    # cross-entropy among the candidates, each scored w * z(student) + (1 - w) * z(BM25)); screened at a small
    # scale (2,000 passages, the title and 1 sentence each: ~4k queries, each with its cut passage encoded)
    "small_fused": ["labelfree.documents=2000", "labelfree.sentences_per_document=1", "labelfree.positives=cut",
                    "train.loss=query_fused", *FUSED_THEN],  # the fused config before the default took it
    "small_fused_t0.5": ["labelfree.documents=2000", "labelfree.sentences_per_document=1",
                         "labelfree.positives=cut", "train.loss=query_fused", "train.query_fused_temperature=0.5",
                         *FUSED_THEN],
    "small_fused_lr1e-5": ["labelfree.documents=2000", "labelfree.sentences_per_document=1",
                           "labelfree.positives=cut", "train.loss=query_fused", *FUSED_THEN,
                           "train.learning_rate=1e-5"],
    # the same data, the query_kl loss (the control: what the fused loss changes)
    "small_fused_kl": ["labelfree.documents=2000", "labelfree.sentences_per_document=1", "labelfree.positives=cut",
                       "train.loss=query_kl", "train.learning_rate=5e-5"],
    # small_fused on every passage (~9k queries and cut passages)
    "fused_all": ["labelfree.documents=0", "labelfree.sentences_per_document=1", "labelfree.positives=cut",
                  "train.loss=query_fused", *FUSED_THEN],
    # LLM-written queries (labelfree.query_source: llm), one per passage for 2,000 passages, teacher round trip
    "llm_kl": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1"],
    "llm_fused": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                  "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                  "train.query_fused_stats=student"],
    "llm_kl_first": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                     "labelfree.llm_answer=first"],
    "llm_kl_ep3": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                   "train.epochs=3"],
    "llm_kl_first_ep3": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                         "labelfree.llm_answer=first", "train.epochs=3"],
    "llm_dense_first": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                        "labelfree.llm_answer=dense_first"],
    "llm_dense_first_ep3": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                            "labelfree.llm_answer=dense_first", "train.epochs=3"],
    "llm_fused_base_stats": [*QUERY_KL, "labelfree.query_source=llm", "llm.documents=2000", "llm.n_queries=1",
                             "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                             "train.query_fused_stats=base"],
    "small_fused_base_stats": ["labelfree.documents=2000", "labelfree.sentences_per_document=1",
                               "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                               "train.query_fused_stats=base"],
    "fused_all_base_stats": ["labelfree.documents=0", "labelfree.sentences_per_document=1",
                             "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                             "train.query_fused_stats=base"],
    "fused_all_base_stats_lr5e-5": ["labelfree.documents=0", "labelfree.sentences_per_document=1",
                                    "labelfree.positives=cut", "train.loss=query_fused",
                                    "train.learning_rate=5e-5", "train.query_fused_stats=base"],
    "fused_all_s2_base_stats": ["labelfree.documents=0", "labelfree.sentences_per_document=2",
                                "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                                "train.query_fused_stats=base"],
    # the default's cut queries and LLM-written ones together (labelfree.query_source: both), the LLM's passage the
    # positive; screened with the 2,960 passages' queries that the in-process stand-in wrote (the entry's note)
    "both_fused_base_stats": ["labelfree.documents=0", "labelfree.sentences_per_document=1",
                              "labelfree.positives=cut", "train.loss=query_fused", "train.learning_rate=2e-5",
                              "train.query_fused_stats=base", "labelfree.query_source=both", "llm.documents=2960",
                              "llm.n_queries=1"],
    "margin_mse": [*PREVIOUS, "train.loss=query_margin_mse"],
    "over_corpus": [*PREVIOUS, "train.query_distill_over=corpus"],
    "keep_source": [*PREVIOUS, "labelfree.source=keep"],
    "fixed_weight_0.7": [*PREVIOUS, "labelfree.dense_weight=0.7"],
    "lr5e-5": [*PREVIOUS, "train.learning_rate=5e-5"],
    "lr1e-4": [*PREVIOUS, "train.learning_rate=1e-4"],
    "ep3": [*PREVIOUS, "train.epochs=3"],
    "docs_all": [*QUERY_KL, "labelfree.documents=0", "labelfree.sentences_per_document=2",
                 "train.learning_rate=2e-5"],
    "docs_all_lr5e-5": [*QUERY_KL, "labelfree.documents=0", "labelfree.sentences_per_document=2"],
    "docs_all_lr5e-5_tt0.05": [*QUERY_KL, "labelfree.documents=0", "labelfree.sentences_per_document=2",
                               "train.query_teacher_temperature=0.05"],
    # = the query_kl default on a corpus under 10,000 passages
    "docs_all_s4_lr5e-5": [*QUERY_KL, "labelfree.documents=0"],
    # symmetric: the student encodes m candidates per query too, so its document side trains (--symmetric)
    # (the softmax over each query's own m passages; its dev score is in scifact_labelfree_dev.json variants.sym_m4)
    "sym_m4": [*PREVIOUS, "train.document_side=student", "train.query_distill_documents=4",
               "train.query_distill_in_batch=false"],
    # the softmax over every passage of the batch (the other queries' candidates as in-batch negatives)
    "sym_m4_ib": [*PREVIOUS, "train.document_side=student", "train.query_distill_documents=4"],
    # scripts/gpu_labelfree.sh's symmetric sweeps (before in-batch negatives existed)
    "sym_m8": [*PREVIOUS, "train.document_side=student", "train.query_distill_documents=8",
               "train.query_distill_in_batch=false"],
    "sym_m4_lr5e-5": [*PREVIOUS, "train.document_side=student", "train.query_distill_documents=4",
                      "train.query_distill_in_batch=false", "train.learning_rate=5e-5"],
    "sym_m4_keep": [*PREVIOUS, "labelfree.source=keep", "train.document_side=student",
                    "train.query_distill_documents=4", "train.query_distill_in_batch=false"],
}


def data_group(overrides: list[str]) -> str:
    """The run folder a variant shares with the other variants of the same data (non-train overrides)."""
    data = [o for o in overrides if not o.startswith("train.")]
    return "dev_" + ("_".join(o.replace("=", "-").replace(".", "_") for o in data) or "default")


def labelled_queries(cfg, split: str):
    """(query ids, query texts, qrels) of ``split``: ``dev`` is data_prep's dev split, else a BEIR qrels file."""
    from embtune.dataio import load_corpus, load_qrels, load_queries

    manifest = json.loads((Path(cfg.run_dir) / "data_prep" / "manifest.json").read_text())["outputs"]
    folder = Path(manifest["eval_dataset"])
    corpus = load_corpus(folder / "corpus.jsonl")
    queries = load_queries(folder / "queries.jsonl")
    qrels_path = manifest["dev_qrels"] if split == "dev" else folder / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qrels_path, corpus, queries)
    query_ids = sorted(qrels)
    return query_ids, [queries[q] for q in query_ids], qrels


def base_index_and_teacher(cfg, query_texts: list[str]) -> dict:
    """What both dev measurements read: data_prep's manifest, the base model's corpus embeddings (the index the
    query side trains against) and their doc ids, and the teacher's two member runs over ``query_texts`` (top 100
    each, query ids ``"0".."n-1"``) with the base model's query embeddings."""
    import numpy as np

    from embtune.data_prep.labelfree import FusedTeacher
    from embtune.dataio import document_text, load_corpus
    from embtune.retrieval.encoder import load_encoder
    from embtune.retrieval.spec import DenseSpec, Retriever, RetrieverSpec

    manifest = json.loads((Path(cfg.run_dir) / "data_prep" / "manifest.json").read_text())
    outputs = manifest["outputs"]
    doc_emb = np.load(outputs["corpus_embeddings"])
    doc_ids = json.loads((Path(outputs["corpus_embeddings"]).parent / "doc_ids.json").read_text())
    corpus = load_corpus(Path(outputs["eval_dataset"]) / "corpus.jsonl")
    base, _ = load_encoder(cfg.train.base_model, cfg.eval.max_seq_length)
    doc_texts = [document_text(corpus[d], cfg.mining.include_title) for d in doc_ids]
    teacher = FusedTeacher(doc_ids, doc_texts, doc_emb, base, cfg.bm25)
    dense, sparse, query_emb = teacher.runs(query_texts, 100)
    # data_prep's index searched as eval searches: the core Retriever over the base model's corpus embeddings.
    index = Retriever(RetrieverSpec(dense=DenseSpec(model=cfg.train.base_model)), doc_ids, doc_texts, doc_emb)
    # the teacher's hybrid (base index + BM25), which a student's query embeddings search as the base model's do
    hybrid = Retriever(teacher.spec, doc_ids, doc_texts, doc_emb, bm25=teacher.bm25)
    return {"manifest": manifest, "doc_emb": doc_emb, "doc_ids": doc_ids, "dense": dense, "sparse": sparse,
            "query_emb": query_emb, "weight": manifest["teacher"]["dense_weight"], "index": index,
            "hybrid": hybrid}


def query_side_scores(cfg, split: str, models: dict[str, str]) -> dict:
    """nDCG@10 etc. of each model's queries against data_prep's corpus embeddings (the base model's index), and of
    the fused teacher (base dense + BM25 at the teacher's weight) on the same queries."""
    from embtune.eval import Queries, evaluate, score
    from embtune.retrieval.encoder import load_encoder
    from embtune.retrieval.fusion import weighted_fuse

    query_ids, query_texts, qrels = labelled_queries(cfg, split)
    setup = base_index_and_teacher(cfg, query_texts)
    weight = setup["weight"]
    out, per_query, embeddings = {}, {}, {}
    for name, path in models.items():
        model, _ = load_encoder(path, cfg.eval.max_seq_length)
        queries = Queries.of(dict(zip(query_ids, query_texts)), model)  # one per batch, role query: as eval
        embeddings[name] = queries.emb  # (n_queries, dim)
        row = evaluate(setup["index"], queries, qrels, name=name, k=1000)
        out[name], per_query[name] = percent(row.metrics), row.per_query
    mapping = {str(i): q for i, q in enumerate(query_ids)}
    fused = {mapping[i]: docs for i, docs in weighted_fuse(setup["dense"], setup["sparse"], weight, 100).items()}
    row = score(qrels, fused, "teacher")
    out["teacher"], per_query["teacher"] = percent(row.metrics), row.per_query
    bm25 = {mapping[i]: docs for i, docs in setup["sparse"].items()}
    row = score(qrels, bm25, "bm25_top100")
    out["bm25_top100"], per_query["bm25"] = percent(row.metrics), row.per_query
    if "finetuned" in embeddings:  # the teacher a second round would distil: the student's queries fused with BM25
        # Searched as the teacher's members are (the core Retriever, each member's top 100 with its whole-corpus
        # statistics), so student + BM25 and base + BM25 differ in the query embeddings only.
        dense, sparse = setup["hybrid"].member_runs(query_texts, embeddings["finetuned"], 100, query_ids=query_ids)
        row = score(qrels, weighted_fuse(dense, sparse, weight, 100), "finetuned+bm25")
        out["next_round_teacher"], per_query["finetuned+bm25"] = percent(row.metrics), row.per_query
    return {"results": out, "per_query": per_query, "num_queries": len(query_ids), "teacher_dense_weight": weight}


def query_side_ceiling(cfg, steps: int = 200) -> dict:
    """How far any query-side student could go against the base index: one free vector per dev query, started at
    the base model's embedding and fitted (Adam, ``steps``) by the training loss itself to the teacher's scores of
    its top ``labelfree.depth`` candidates; then nDCG@10 of those vectors over the whole corpus. A query encoder
    cannot do better on these queries than the loss lets a free vector do."""
    import dataclasses

    import torch

    from embtune.data_prep.labelfree import FusedTeacher
    from embtune.eval import Queries, evaluate
    from embtune.retrieval.fusion import ranked, weighted_fuse
    from embtune.train.losses import build_query_loss, split_rows

    query_ids, query_texts, qrels = labelled_queries(cfg, "dev")
    setup = base_index_and_teacher(cfg, query_texts)
    doc_emb, doc_ids, weight = setup["doc_emb"], setup["doc_ids"], setup["weight"]
    fused = weighted_fuse(setup["dense"], setup["sparse"], weight, 100)
    position = {d: i for i, d in enumerate(doc_ids)}
    depth = cfg.labelfree.depth
    labels = []  # labelfree_dataset's layout: [source row (-1: none), candidate rows, teacher scores, base scores]
    for i in range(len(query_ids)):
        top = ranked(fused[str(i)], depth)
        # the teacher's scores as the training table holds them (FusedTeacher.labels: [0, 1] over the candidates)
        labels.append([*split_rows([-1]), *split_rows(position[d] for d in top),
                       *FusedTeacher.labels(fused[str(i)], top), *[0.0] * depth])
    labels = torch.tensor(labels)
    out = {"dev_queries": len(query_ids), "depth": depth, "steps": steps, "teacher_dense_weight": weight,
           "fit": training_fit(cfg, setup["manifest"], doc_emb, query_texts, labels)}
    for over in ("candidates", "corpus"):
        loss = build_query_loss(None, dataclasses.replace(cfg.train, query_distill_over=over), doc_emb)
        vectors = torch.tensor(setup["query_emb"]).requires_grad_(True)
        optimizer = torch.optim.Adam([vectors], lr=0.01)
        for _ in range(steps):
            value = loss.compute_loss_from_embeddings([vectors], labels)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        fitted = torch.nn.functional.normalize(vectors.detach(), dim=-1).numpy()
        row = evaluate(setup["index"], Queries(query_ids, query_texts, fitted), qrels, k=1000)
        out[f"over_{over}"] = percent(row.metrics)["ndcg@10"]
    return out


def training_fit(cfg, manifest: dict, doc_emb, dev_texts: list[str], dev_labels, every: int = 12) -> dict:
    """The training loss (KL to the teacher over its candidates) of the base model and of the run's student, on
    every ``every``-th pseudo-query of the train table (each seen once in one epoch) and on the dev queries: how
    much of what the student learnt on pseudo-queries carries over to real ones."""
    import torch
    from datasets import load_from_disk

    from embtune.retrieval.encoder import encode, load_encoder
    from embtune.train.losses import build_query_loss, labelfree_dataset

    table = load_from_disk(manifest["outputs"]["train_table"])
    rows = labelfree_dataset(table.select(range(0, len(table), every)))  # the query and the label training reads
    train_labels = torch.tensor(rows["label"])
    loss = build_query_loss(None, cfg.train, doc_emb)
    student = json.loads((Path(cfg.run_dir) / "train" / "manifest.json").read_text())["outputs"]["model"]
    out: dict = {"pseudo_queries": len(rows), "dev_queries": len(dev_texts)}
    for name, path in (("base", cfg.train.base_model), ("student", student)):
        model, _ = load_encoder(path, cfg.eval.max_seq_length)
        for split, texts, labels in (("pseudo", list(rows["query"]), train_labels), ("dev", dev_texts, dev_labels)):
            embeddings = torch.tensor(encode(model, texts, 64, desc=f"{name} {split}", role="query"))
            with torch.no_grad():
                out[f"{split}_loss_{name}"] = round(float(loss.compute_loss_from_embeddings([embeddings], labels)), 4)
    for split in ("pseudo", "dev"):
        out[f"{split}_loss_drop"] = round(1 - out[f"{split}_loss_student"] / out[f"{split}_loss_base"], 3)
    return out


def significance(per_query: dict, a: str, b: str) -> dict:
    from embtune.eval.significance import compare_systems

    return compare_systems(per_query[a], per_query[b], "ndcg@10", 10000, seed=42)


def data_summary(run_dir: Path) -> dict:
    report = json.loads((run_dir / "data_prep" / "report.json").read_text())["labelfree"]
    return {k: report.get(k) for k in ("queries", "kinds", "source", "depth", "teacher", "teacher_choice",
                                       "source_rank_under_teacher", "decision")}


STAGES = ("data_prep", "train", "eval", "export")


def shipped_phase(args, provenance: Provenance) -> int:
    """The whole pipeline (data_prep, train, eval, export) on SciFact's corpus.jsonl alone, so that no labelled
    query is available to it; then SciFact test, read once, measures every row and the bundle's retriever."""
    from labelfree_measure import measure_run  # scripts/labelfree_measure.py

    corpus_only = Path(args.run_root) / "scifact_corpus_only"
    corpus_only.mkdir(parents=True, exist_ok=True)
    source = ROOT / "../shared/data/beir/scifact"
    link = corpus_only / "corpus.jsonl"
    if not link.exists():
        link.symlink_to((source / "corpus.jsonl").resolve())
    run_dir = Path(args.run_root) / args.shipped_name
    overrides = [f"run_dir={run_dir}", f"data.path={corpus_only}", "data.dev_fraction=0", "eval.split=test",
                 *args.overrides]
    start = time.time()
    stages = tuple(args.stages.split(","))
    for stage in stages if stages != STAGES else ():  # a partial rerun redoes its stages (e.g. after a fusion change)
        (run_dir / stage / "manifest.json").unlink(missing_ok=True)
    cfg, _, report, wall = run_recipe(args.config, overrides, stages=stages, read_results=False)
    total_wall = round(time.time() - start, 1)
    measured = measure_run(cfg, run_dir, source.resolve(), "test")
    path = RESULTS / "scifact_labelfree.json"
    # The default recipe's run starts a new headline (the previous file goes whole under other_runs); a variant's
    # run is added beside the headline it belongs to.
    headline = args.shipped_name == "shipped"
    out = {} if headline or not path.is_file() else json.loads(path.read_text())
    shipped = {"row": measured["shipped"]["row"], "ndcg@10": measured["shipped"]["ndcg@10"],
               "chosen_by": measured["shipped"]["chosen_by"], "run": args.shipped_name,
               "overrides": list(args.overrides)}
    record = provenance.record()
    shipped.update(commit=record["commit"], tree_clean=record["tree_clean"])
    runs = out.setdefault("shipped_runs", {})
    # the headline is the default recipe's run; a variant's run stands in only until that one exists
    if headline or out.get("shipped", {}).get("run") != "shipped":
        out["shipped"] = shipped
    runs[args.shipped_name] = {
        "description": "the pipeline saw SciFact's corpus.jsonl alone (no queries, no qrels); it chose what to "
                       "ship on its probe; SciFact test (300 queries) was read afterwards, by this script",
        "why": measured["shipped"]["why"], "evidence_probe_mrr@10": measured["shipped"]["evidence"],
        "bundle_retriever": measured["shipped"]["bundle_retriever"], "test_ndcg@10": measured["rows"],
        "dense_weight": measured["dense_weight"], "num_queries": measured["num_queries"],
        "decision": report["labelfree"]["decision"], "language": report["labelfree"]["language"],
        "tokenizer_fit": report["labelfree"]["tokenizer_fit"], "data": data_summary(run_dir),
        "wall_seconds": {**wall, "total": total_wall}, "stages_run": list(stages), "overrides": overrides,
        **record,
        "note": "timed on the machine's CPU cores; load_average says whether other jobs shared them"}
    if headline:
        out = {"benchmark": "scifact_labelfree", "split": "test", **out, **record}
        write_result(path, out)
    else:
        path.write_text(json.dumps(out, indent=2))
    print(json.dumps({"shipped": shipped, "rows": measured["rows"]}, indent=1))
    return 0


def cold_phase(args, provenance: Provenance) -> int:
    """The default recipe's wall time on an empty embedding cache (the corpus and every cut passage encoded), as a
    fresh clone runs it: the whole pipeline with eval on the dev split, so test is not read. Recorded beside the
    shipped run in ``scifact_labelfree.json`` (``cold_cache_run``)."""
    import os
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="embtune-cold-cache-"))
    os.environ["EMBTUNE_CACHE"] = str(cache)  # read by embtune.retrieval.encoder.cache_dir at each call
    run_dir = Path(args.run_root) / "cold"
    for stage in STAGES:
        (run_dir / stage / "manifest.json").unlink(missing_ok=True)
    start = time.time()
    cfg, results, _, wall = run_recipe(args.config, [f"run_dir={run_dir}", "eval.split=dev", *args.overrides],
                                       stages=STAGES)
    path = RESULTS / "scifact_labelfree.json"
    out = json.loads(path.read_text())
    out["cold_cache_run"] = {"wall_seconds": {**wall, "total": round(time.time() - start, 1)},
                             "bar_seconds": 1800, "embedding_cache": "empty at the start (a fresh folder)",
                             "split": "dev (test not read)", "data": data_summary(run_dir),
                             "overrides": list(args.overrides), **provenance.record()}
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["cold_cache_run"]["wall_seconds"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["dev", "final", "pydoc", "ceiling", "shipped", "cold"], required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scifact_labelfree.yaml"))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench_labelfree"))
    parser.add_argument("--variants", default="default", help="dev: which VARIANTS to try, comma-separated")
    parser.add_argument("--queries", choices=["dev", "train"], default="dev",
                        help="dev: the labelled queries that score each variant: data_prep's dev half of the train "
                             "queries (the entries so far), or all of them (train: label-free training reads none, "
                             "and twice the queries halve the variance that made dev gains vanish on the other half; "
                             "scifact_labelfree_levers.json)")
    parser.add_argument("--symmetric", action="store_true", help="dev: also run the eval stage (student on both "
                                                                  "sides; re-encodes the corpus)")
    parser.add_argument("--dev-out", default=str(RESULTS / "scifact_labelfree_dev.json"),
                        help="dev: the result file (variants already in it are kept); one per concurrent sweep")
    parser.add_argument("--shipped-name", default="shipped", help="shipped: the run's folder and entry name")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="shipped: the stages to run (a subset reruns them over the earlier stages' outputs)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides applied to every run")
    args = parser.parse_args()
    setup_logging()
    provenance = Provenance.start(bench_command(sys.argv))
    command = provenance.command
    RESULTS.mkdir(parents=True, exist_ok=True)

    if args.phase == "ceiling":  # needs the data_prep of the first variant's data group (run it with --phase dev)
        overrides = [*VARIANTS[args.variants.split(",")[0]], *args.overrides]
        run_dir = Path(args.run_root) / data_group(overrides)
        cfg, _, _, _ = run_recipe(args.config, [f"run_dir={run_dir}", "eval.split=dev", *overrides],
                                  stages=("data_prep",), read_results=False)
        dev_path = Path(args.dev_out)
        out = json.loads(dev_path.read_text())
        out["query_side_ceiling"] = {**query_side_ceiling(cfg), "variant": args.variants.split(",")[0],
                                     "command": command}
        dev_path.write_text(json.dumps(out, indent=2))
        print(json.dumps(out["query_side_ceiling"], indent=1))
        return 0

    if args.phase == "shipped":
        return shipped_phase(args, provenance)
    if args.phase == "cold":
        return cold_phase(args, provenance)

    if args.phase == "dev":
        dev_path = Path(args.dev_out)
        previous = json.loads(dev_path.read_text()) if dev_path.is_file() else {}
        out = {**previous, "commands": [*previous.get("commands", []), command], **provenance.record(),
               "split": "dev",
               "dev": "SciFact qrels/train.tsv, half its queries (data.dev_fraction=0.5, seeded); never trained on",
               "variants": previous.get("variants", {})}
        for name in args.variants.split(","):
            overrides = [*VARIANTS[name], *args.overrides]
            run_dir = Path(args.run_root) / data_group(overrides)
            stages = ("data_prep", "train", "eval") if args.symmetric else ("data_prep", "train")
            start = time.time()
            cfg, _, _, wall = run_recipe(args.config, [f"run_dir={run_dir}", "eval.split=dev", *overrides],
                                         stages=stages, read_results=args.symmetric)
            model = json.loads((run_dir / "train" / "manifest.json").read_text())["outputs"]["model"]
            scores = query_side_scores(cfg, args.queries, {"base": cfg.train.base_model, "finetuned": model})
            entry = {"overrides": overrides, "query_side": scores["results"],
                     "significance_vs_base": significance(scores["per_query"], "base", "finetuned"),
                     # what the student adds to the system it ships in: student + BM25 against base + BM25, both
                     # at the teacher's weight, on the same dev queries
                     "fused_vs_base_fused": {
                         "student+bm25": scores["results"]["next_round_teacher"]["ndcg@10"],
                         "base+bm25": scores["results"]["teacher"]["ndcg@10"],
                         "significance": significance(scores["per_query"], "teacher", "finetuned+bm25")},
                     "data": data_summary(run_dir), "wall_seconds": {**wall, "total": round(time.time() - start, 1)},
                     "num_queries": scores["num_queries"], "queries": args.queries}
            if args.symmetric:
                results = json.loads((run_dir / "eval" / "results.json").read_text())
                entry["symmetric"] = {k: percent(v) for k, v in results["results"].items()}
            out["variants"][name] = entry
            r = scores["results"]
            print(f"dev {name}: query-side finetuned {r['finetuned']['ndcg@10']} (base {r['base']['ndcg@10']}, "
                  f"teacher {r['teacher']['ndcg@10']}); student+bm25 {r['next_round_teacher']['ndcg@10']}"
                  + (f"; symmetric {entry['symmetric']['finetuned']['ndcg@10']}" if args.symmetric else ""),
                  flush=True)
            dev_path.write_text(json.dumps(out, indent=2))
        return 0

    pydoc = args.phase == "pydoc"
    # The shipped default's data_prep and train are those of the dev run of the "default" variant (same config:
    # the model never sees a labelled query, dev or test); the final phase adds the eval of the test split, so
    # its stage wall times are those recorded when each stage ran.
    run_dir = Path(args.run_root) / ("pydoc" if pydoc else data_group(list(args.overrides)))
    overrides = [f"run_dir={run_dir}", "eval.split=test", *args.overrides]
    if pydoc:
        overrides += ["data.format=pydoc", "data.path=", "data.dev_fraction=0"]
    start = time.time()
    cfg, results, report, wall = run_recipe(args.config, overrides, stages=("data_prep", "train", "eval"))
    total_wall = round(time.time() - start, 1)
    model = json.loads((run_dir / "train" / "manifest.json").read_text())["outputs"]["model"]
    side = query_side_scores(cfg, "test", {"finetuned": model})
    res = results["results"]
    out = {
        "benchmark": "pydoc_labelfree" if pydoc else "scifact_labelfree",
        "description": ("all-MiniLM-L6-v2 distilled, label-free, from the fused dense + BM25 teacher on "
                        "pseudo-queries cut from the corpus (no labelled query trained on; settings chosen on "
                        "SciFact train queries as dev); metrics in percent"),
        "dataset": ("pydoc demo corpus (summary-line test split)" if pydoc
                    else "BEIR SciFact (../shared/data/beir/scifact)"),
        "split": "test", "num_queries": results["num_queries"], "num_documents": results["num_documents"],
        "overrides": overrides,
        "results": {"base": percent(res["base"]), "bm25": percent(res["bm25"]),
                    "teacher": side["results"]["teacher"], "finetuned": percent(res["finetuned"]),
                    "finetuned_query_side": side["results"]["finetuned"],
                    **{k: percent(v) for k, v in res.items() if "+bm25" in k}},
        "significance": results.get("significance", {}),
        "teacher_gap_share": None,
        "data": data_summary(run_dir),
        # stage times as recorded when each stage ran (data_prep and train may come from the dev run of the same
        # config); final_phase is this invocation alone
        "wall_seconds": {**wall, "stages_total": round(sum(wall.values()), 1), "final_phase": total_wall},
        **provenance.record(),
    }
    base, teacher, student = (out["results"][k]["ndcg@10"] for k in ("base", "teacher", "finetuned"))
    if teacher != base:
        out["teacher_gap_share"] = round((student - base) / (teacher - base), 3)
    name = "pydoc_labelfree.json" if pydoc else "scifact_labelfree.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))
    print(json.dumps({"results": {k: v.get("ndcg@10") for k, v in out["results"].items()},
                      "wall_seconds": out["wall_seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
