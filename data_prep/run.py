"""data_prep stage: dataset in, training table out.

    load (BEIR / JSONL pairs / datasets on disk / the pydoc demo) -> validate -> carve a dev split
    -> chunk (optional) -> [synthesize queries, when data.queries is 'synthetic' or 'labelled+synthetic']
    -> mine hard negatives -> <run_dir>/data_prep/train_table (a ``datasets`` table)

With ``data.queries: synthetic`` the training queries are written by an LLM for the corpus' passages
(``data_prep/synthetic.py``); the dataset's own labelled queries are then never trained on: they serve only as
the dev split (``data.dev_fraction``) and for eval.

Outputs, each named in ``<run_dir>/data_prep/manifest.json``:
- ``train_table``: columns ``query_id, query, positive_id, positive, negative_1..k, negative_1_id..negative_k_id``;
- ``eval_dataset``: the BEIR folder eval reads (the input folder itself for BEIR data);
- ``dev_qrels``: the dev split's qrels (queries carved from the train split), when ``data.dev_fraction > 0``;
- ``report.json``: what the loader skipped and what mining dropped (summary);
- ``mining_report.json``: the mining report with per-query candidate counts and the teacher audit;
- ``synthetic_queries``, ``synthetic_qrels``, ``synthesis_report`` (synthetic queries only):
  ``synthetic/queries.jsonl``, ``synthetic/qrels/train.tsv`` and the synthesis counts; the LLM answer cache is
  ``llm_cache.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from embtune.config import InputError
from embtune.data_prep.mining import Ranking, bm25_ranking, candidate_query_ids, dense_ranking, fuse, mine_negatives
from embtune.data_prep.sources import CORPUS_ONLY_FORMATS, documents, write_corpus
from embtune.dataio import Dataset, document_text, load_beir, load_pairs_hf, load_pairs_jsonl, split_dev
from embtune.manifest import Stage
from embtune.retrieval.bm25 import build_tokenizer

logger = logging.getLogger(__name__)


def stage_config(cfg) -> dict[str, Any]:
    """The config this stage reads (its fingerprint): a key outside it never reruns data_prep, a key inside does.

    tests/test_fingerprints.py runs the stage and checks every key it reads is here."""
    from embtune.config import to_dict

    section = {"data": to_dict(cfg.data), "chunking": to_dict(cfg.chunking), "mining": to_dict(cfg.mining),
               "bm25": to_dict(cfg.bm25), "seed": cfg.seed,
               # the Ray engine mines the same candidates up to ties and int8 batching (docs/scale.md): not bit-equal
               "compute_engine": cfg.compute.engine}
    if cfg.mining.method in ("dense", "hybrid"):
        section["mining_model"] = cfg.mining.model or cfg.train.base_model
    if cfg.chunking.max_tokens:
        section["tokenizer"] = cfg.chunking.tokenizer or cfg.train.base_model
    if cfg.data.queries == "labelfree":
        # Pseudo-queries, the teacher's probe and labels: the labelfree section, the base model (teacher member and
        # the student's fixed document side, encoded at eval's length) and the bm25 section (already above).
        section["labelfree"] = to_dict(cfg.labelfree)
        section["base_model"] = cfg.train.base_model
        section["max_seq_length"] = cfg.eval.max_seq_length
        section.pop("mining")
        section["include_title"] = cfg.mining.include_title
    if cfg.data.queries in ("synthetic", "labelled+synthetic"):
        # The answers depend on every llm key; the round trip's dense retriever is the base model, encoding at
        # eval's sequence length (the length the filtered queries are later scored at).
        section["llm"] = to_dict(cfg.llm)
        section["round_trip_model"] = cfg.train.base_model
        section["round_trip_max_seq_length"] = cfg.eval.max_seq_length
    return section


def input_files(cfg) -> dict[str, str]:
    files = data_files(cfg)
    # A local teacher or mining model is an input too: retraining it in place must rerun mining.
    if cfg.mining.teacher and cfg.mining.teacher != "hybrid" and Path(cfg.mining.teacher).exists():
        files["teacher"] = cfg.mining.teacher
    if cfg.data.queries == "labelfree" and cfg.labelfree.teacher and Path(cfg.labelfree.teacher).exists():
        files["labelfree_teacher"] = cfg.labelfree.teacher
    if cfg.mining.method in ("dense", "hybrid") and cfg.mining.model and Path(cfg.mining.model).exists():
        files["mining_model"] = cfg.mining.model
    return files


def data_files(cfg) -> dict[str, str]:
    data = cfg.data
    if data.format in ("beir", "parquet"):
        folder = Path(data.path)
        corpus = folder / "corpus.jsonl"
        if data.format == "parquet":  # corpus.parquet, or a corpus/ folder of parts
            corpus = folder / "corpus.parquet" if (folder / "corpus.parquet").is_file() else folder / "corpus"
        files = {
            "corpus": str(corpus),
            "queries": str(folder / "queries.jsonl"),
            "train_qrels": str(folder / "qrels" / f"{data.train_split}.tsv"),
        }
        if data.queries == "labelfree" or data.format == "parquet":
            # A corpus alone is enough: labelled queries, where present, only feed the dev split and eval.
            files = {k: v for k, v in files.items() if k == "corpus" or Path(v).exists()}
        return files
    if data.format in ("jsonl", "hf_disk"):
        return {"pairs": data.pairs_file}
    if data.format in ("files", "table") or (data.format == "hf" and Path(data.path).exists()):
        return {"documents": data.path}  # a changed file reruns the stage
    return {}


def load_dataset(cfg, stage_dir: Path) -> tuple[Dataset, Path]:
    """Load the configured data; returns the train-split dataset and the BEIR folder eval should read."""
    data = cfg.data
    if data.path and data.format != "hf" and not Path(data.path).exists():  # hf: a hub name is no path
        raise InputError(f"data.path {data.path}: no such file or folder (set data.path to your BEIR folder, "
                         "documents folder or table; `embtune init DIR` writes a recipe for one)")
    if data.format in CORPUS_ONLY_FORMATS:
        return load_documents(cfg, stage_dir / "dataset")
    if data.format == "beir" and data.queries == "labelfree":
        return load_corpus_only(data.path, data.train_split, data.on_error), Path(data.path)
    if data.format == "beir":
        return load_beir(data.path, data.train_split, data.on_error), Path(data.path)
    if data.format == "pydoc":
        from embtune.data_prep.pydoc_corpus import build_pydoc_beir

        folder = build_pydoc_beir(stage_dir / "dataset", max_documents=data.max_documents or 3000, seed=cfg.seed)
        return load_beir(folder, "train", data.on_error), folder
    dataset = (load_pairs_jsonl if data.format == "jsonl" else load_pairs_hf)(data.pairs_file, data.on_error)
    folder = write_beir(dataset, stage_dir / "dataset", split="train")
    return dataset, folder


def load_documents(cfg, folder: Path) -> tuple[Dataset, Path]:
    """``data.format`` files / table / hf: stream the documents into ``folder/corpus.jsonl`` (chunked when
    ``chunking.max_tokens`` > 0), then load that corpus; there are no queries or qrels."""
    from embtune.dataio import LoadReport, load_corpus

    data = cfg.data
    if data.queries == "labelfree":
        logger.info("data.format %s brings documents only, no queries or qrels: taking the label-free route "
                    "(data.queries: labelfree, docs/labelfree.md)", data.format)
    chunker = None
    if cfg.chunking.max_tokens:
        from transformers import AutoTokenizer

        from embtune.data_prep.chunking import chunk_text
        from embtune.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.chunking.tokenizer or cfg.train.base_model,
                                                                must_exist=True))

        def chunker(text: str) -> list[str]:
            return chunk_text(text, tokenizer, cfg.chunking.max_tokens, cfg.chunking.overlap)
    elif data.format == "files":
        logger.warning("chunking.max_tokens is 0: each file is one document, cut at the model's max_seq_length "
                       "(set chunking.max_tokens, e.g. 256, to chunk long files)")
    report = LoadReport()
    rows = write_corpus(documents(data, report), folder, chunker)
    if report.total:
        logger.warning("%s: %s", data.path, report.summary())
    if not rows:
        raise InputError(f"data.path {data.path}: no document to read (every file or row was skipped: "
                         f"{report.summary()})")
    logger.info("%s: %d documents -> %s", data.path, rows, folder / "corpus.jsonl")
    corpus = load_corpus(folder / "corpus.jsonl", data.on_error, LoadReport())
    return Dataset(corpus, {}, {}, report), folder


def load_corpus_only(folder: str | Path, split: str, on_error: str) -> Dataset:
    """A BEIR folder for label-free mode: ``corpus.jsonl`` is required; queries and ``qrels/<split>.tsv``, when
    both are there, are loaded for the dev split only (never trained on)."""
    from embtune.dataio import DataError, LoadReport, load_corpus

    folder = Path(folder)
    if not (folder / "corpus.jsonl").is_file():
        raise DataError(f"{folder / 'corpus.jsonl'}: file not found (label-free mode needs only a corpus)")
    if (folder / "queries.jsonl").is_file() and (folder / "qrels" / f"{split}.tsv").is_file():
        return load_beir(folder, split, on_error)
    logger.info("%s: no qrels/%s.tsv: label-free mode trains from the corpus alone, no dev split", folder, split)
    return Dataset(load_corpus(folder / "corpus.jsonl", on_error, LoadReport()), {}, {}, LoadReport())


def write_beir(dataset: Dataset, folder: Path, split: str) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as handle:
        for doc_id, doc in dataset.corpus.items():
            handle.write(json.dumps({"_id": doc_id, **doc}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for query_id, text in dataset.queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    write_qrels(dataset.qrels, folder / "qrels" / f"{split}.tsv")
    return folder


def write_qrels(qrels: dict[str, dict[str, int]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in qrels.items():
            for doc_id, score in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")


def run(cfg, force: bool = False) -> dict[str, str]:
    """Run the stage (or skip it when its manifest matches); returns the output paths."""
    stage = Stage("data_prep", cfg.run_dir, config=stage_config(cfg), inputs=input_files(cfg))
    if not force and stage.up_to_date():
        return stage.outputs()
    stage.begin()
    stage.dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.format == "parquet":  # the BEIR folder with its corpus in Parquet, streamed once into a JSONL store
        folder = parquet_to_beir(cfg.data.path, stage.dir / "dataset")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(folder), format="beir"))
    if on_shards(cfg):
        return run_on_shards(cfg, stage)

    dataset, eval_folder = load_dataset(cfg, stage.dir)
    logger.info("loaded %d documents, %d queries, %d judged queries (%s)", len(dataset.corpus),
                len(dataset.queries), len(dataset.qrels), dataset.report.summary())
    train_qrels, dev_qrels = dataset.qrels, {}
    outputs: dict[str, str | Path] = {"eval_dataset": eval_folder}
    if cfg.data.queries == "labelfree":
        return run_labelfree(cfg, stage, dataset, outputs)
    if cfg.data.dev_fraction > 0:
        train_qrels, dev_qrels = carve_dev(cfg, stage, dataset.qrels, outputs)

    corpus = dataset.corpus
    queries = dataset.queries
    include_title = cfg.mining.include_title
    exclude = None
    synthesis_report = None
    labelled_queries = len(train_qrels)
    if cfg.data.queries == "labelled+synthetic" and cfg.chunking.max_tokens:
        # A labelled positive would have to be mapped to one of its chunks (chunk_for_training) while the LLM
        # writes for chunks of its own; not needed yet, so refused rather than half done.
        raise ValueError("data.queries=labelled+synthetic does not support chunking yet: set chunking.max_tokens=0")
    if cfg.data.queries != "labelled":
        corpus, synthetic_queries, synthetic_qrels, exclude, synthetic = synthesize_for_training(cfg, corpus,
                                                                                                 stage.dir)
        if cfg.data.queries == "labelled+synthetic":
            clash = set(synthetic_queries) & set(train_qrels)
            if clash:
                raise ValueError(f"synthetic query ids clash with the dataset's: {sorted(clash)[:5]}")
            queries = {**{q: dataset.queries[q] for q in train_qrels}, **synthetic_queries}
            train_qrels = {**train_qrels, **synthetic_qrels}
            logger.info("training queries: %d labelled + %d synthetic", labelled_queries, len(synthetic_qrels))
        else:
            queries, train_qrels = synthetic_queries, synthetic_qrels
        outputs.update(synthetic.files)
        synthesis_report = synthetic.report
    elif cfg.chunking.max_tokens:
        corpus, train_qrels, exclude = chunk_for_training(cfg, corpus, train_qrels, dataset.queries)
    doc_texts = {doc_id: document_text(doc, include_title) for doc_id, doc in corpus.items()}
    m = cfg.mining
    num_negatives = m.num_negatives if m.method != "none" else 0
    ranking = build_ranking(cfg, corpus, doc_texts, queries, train_qrels) if num_negatives else None
    teacher = None
    if m.teacher:
        teacher = build_teacher(cfg, [doc_texts[d] for d in corpus])
    pairs_only = {"num_negatives": 0} if num_negatives != m.num_negatives else {}  # mining.method: none
    rows, mining_report = mine_negatives(corpus, queries, train_qrels, doc_texts, m, seed=cfg.seed, ranking=ranking,
                                         teacher=teacher,
                                         exclude=exclude, **pairs_only)
    report = {"load": dataset.report.to_dict(), "train_queries": len(train_qrels),
              "labelled_train_queries": labelled_queries if cfg.data.queries != "synthetic" else 0,
              "dev_queries": len(dev_qrels)}
    if synthesis_report is not None:
        report["synthesis"] = synthesis_report
    return finish_table(stage, rows, mining_report, report, outputs, num_negatives)


def carve_dev(cfg, stage: Stage, qrels: dict[str, dict[str, int]], outputs: dict) -> tuple[dict, dict]:
    """(train qrels, dev qrels): ``data.dev_fraction`` of the judged train queries held out (seeded), the dev
    qrels written to ``qrels/dev.tsv`` and named in ``outputs``."""
    train_qrels, dev_qrels = split_dev(qrels, cfg.data.dev_fraction, cfg.seed)
    write_qrels(dev_qrels, stage.dir / "qrels" / "dev.tsv")
    outputs["dev_qrels"] = stage.dir / "qrels" / "dev.tsv"
    logger.info("dev split: %d queries held out of %d train queries", len(dev_qrels), len(qrels))
    return train_qrels, dev_qrels


def finish_table(stage: Stage, rows: list[dict[str, Any]], mining_report, report: dict[str, Any], outputs: dict,
                 num_negatives: int, note: str = "") -> dict[str, str]:
    """Write the mining report, the training table (an error naming the report when it has no row) and
    ``report.json`` (``report`` plus the mining summary and the row count); finish the stage."""
    from datasets import Dataset as HFDataset

    (stage.dir / "mining_report.json").write_text(json.dumps(mining_report.to_dict(per_query=True), indent=1))
    print(mining_report.table())
    if not rows:
        raise RuntimeError(f"data_prep produced no training rows; see {stage.dir / 'mining_report.json'}")
    table_dir = stage.dir / "train_table"
    HFDataset.from_list(rows).save_to_disk(str(table_dir))
    report = {"load": report.pop("load"), "mining": mining_report.to_dict(), **report, "rows": len(rows)}
    (stage.dir / "report.json").write_text(json.dumps(report, indent=2))
    logger.info("training table: %d rows, %d negatives each -> %s%s", len(rows), num_negatives, table_dir, note)
    outputs.update({"train_table": table_dir, "report": stage.dir / "report.json",
                    "mining_report": stage.dir / "mining_report.json"})
    return stage.finish(outputs)


def run_labelfree(cfg, stage: Stage, dataset: Dataset, outputs: dict) -> dict[str, str]:
    """``data.queries: labelfree``: pseudo-queries cut from the corpus, labelled by the fused teacher
    (``data_prep/labelfree.py``). Labelled queries of the dataset, when any, are never trained on: all of the
    train split's judged queries may serve as dev (``data.dev_fraction`` > 0 keeps that share)."""
    from datasets import Dataset as HFDataset

    from embtune.data_prep.labelfree import build_labelfree

    dev_qrels: dict = {}
    if dataset.qrels and cfg.data.dev_fraction > 0:
        _, dev_qrels = split_dev(dataset.qrels, cfg.data.dev_fraction, cfg.seed)
        write_qrels(dev_qrels, stage.dir / "qrels" / "dev.tsv")
        outputs["dev_qrels"] = stage.dir / "qrels" / "dev.tsv"
        logger.info("dev split: %d labelled queries (never trained on in label-free mode)", len(dev_qrels))
    rows, report = build_labelfree(cfg, dataset.corpus, stage.dir)
    table_dir = stage.dir / "train_table"
    if rows:
        HFDataset.from_list(rows).save_to_disk(str(table_dir))
    else:  # no student (report["decision"]): an empty table with the columns, which train does not read
        HFDataset.from_dict({c: [] for c in LABELFREE_COLUMNS}).save_to_disk(str(table_dir))
    full = {"load": dataset.report.to_dict(), "mode": "labelfree", "labelfree": report, "rows": len(rows),
            "dev_queries": len(dev_qrels)}
    (stage.dir / "report.json").write_text(json.dumps(full, indent=2))
    print(labelfree_table(report))
    outputs.update({"train_table": table_dir, "report": stage.dir / "report.json",
                    "corpus_embeddings": report["corpus_embeddings"],
                    "labelfree_report": stage.dir / "labelfree" / "report.json"})
    outputs["probe_set"] = report["probe_set"]
    return stage.finish(outputs, extra={"teacher": report["teacher"], "teacher_choice": report["teacher_choice"],
                                        "decision": report["decision"], "language": report["language"]})


# The label-free table's columns (data_prep/labelfree.py build_labelfree).
LABELFREE_COLUMNS = ("query", "source_id", "source_row", "kind", "candidates", "teacher_scores", "base_scores")


def labelfree_table(report: dict) -> str:
    """The stage report, as printed: the teacher's choice and its evidence, and the pseudo-query counts."""
    choice = report["teacher_choice"]
    lines = [f"label-free data: {report['queries']} pseudo-queries ({report['kinds']}), source {report['source']}, "
             f"teacher top-{report['depth']}",
             f"teacher: dense weight {report['teacher']['dense_weight']:g}, BM25 weight "
             f"{report['teacher']['bm25_weight']:g} ({choice['by']})"]
    if "fused_by_dense_weight" in choice:
        lines.append(f"probe ({choice['queries']} queries {choice['kinds']}, MRR@10): dense alone "
                     f"{choice['dense_alone']}, BM25 alone {choice['bm25_alone']}; by dense weight "
                     + ", ".join(f"{w}: {v}" for w, v in choice["fused_by_dense_weight"].items()))
    if "lexical_check" in choice:
        check = choice["lexical_check"]
        lines.append(f"lexical check (best on the probe: dense weight {check['best_on_probe']:g}; {check['choice']}): "
                     f"{check['why']}")
    language = report["language"]
    lines.append(f"corpus language: {language['language']} ({language['why']}); BM25 tokenises as "
                 f"{language['bm25_language']}; base model: {report['tokenizer_fit']['why']}")
    lines.append(f"decision: {report['decision']['decision']}: {report['decision']['reason']}")
    return "\n".join(lines)


def synthesize_for_training(cfg, corpus, stage_dir: Path):
    """Synthetic queries as the training set: (corpus, queries, qrels, exclude, SyntheticQueries).

    Documents longer than ``chunking.max_tokens`` are chunked first, so the LLM sees (and each query is judged
    against) one chunk; the other chunks of the same document are kept out of that query's negatives.
    """
    from embtune.data_prep.synthetic import synthesize_corpus

    parent = {doc_id: doc_id for doc_id in corpus}
    if cfg.chunking.max_tokens:
        from transformers import AutoTokenizer

        from embtune.data_prep.chunking import chunk_corpus
        from embtune.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.chunking.tokenizer or cfg.train.base_model,
                                                                must_exist=True))
        n_documents = len(corpus)
        corpus, parent = chunk_corpus(corpus, tokenizer, cfg.chunking.max_tokens, cfg.chunking.overlap)
        logger.info("chunking: %d documents -> %d chunks (max %d tokens, overlap %d)", n_documents, len(corpus),
                    cfg.chunking.max_tokens, cfg.chunking.overlap)
    synthetic = synthesize_corpus(cfg, corpus, stage_dir)
    exclude = None
    if cfg.chunking.max_tokens:
        children: dict[str, set[str]] = {}
        for chunk_id, doc_id in parent.items():
            children.setdefault(doc_id, set()).add(chunk_id)
        exclude = {query_id: set().union(*(children[parent[p]] for p in judged))
                   for query_id, judged in synthetic.qrels.items()}
    return corpus, synthetic.queries, synthetic.qrels, exclude, synthetic


def build_teacher(cfg, corpus_texts: list[str]):
    """``mining.teacher``: the label-free hybrid teacher, or a cross-encoder (folder or hub name)."""
    from embtune.data_prep.teacher import HYBRID_TEACHER, HybridTeacher
    from embtune.retrieval.rerank import CrossEncoderScorer

    m = cfg.mining
    if m.teacher == HYBRID_TEACHER:
        return HybridTeacher(corpus_texts, m.model or cfg.train.base_model, cfg.bm25,
                             m.teacher_bm25_weight, batch_size=m.batch_size, max_seq_length=m.max_seq_length)
    return CrossEncoderScorer(m.teacher, batch_size=m.teacher_batch_size, max_length=m.teacher_max_length)


def build_ranking(cfg, corpus, doc_texts, queries, qrels) -> Ranking | None:
    """Candidates for the judged queries under ``mining.method`` (None for ``random``/``none``)."""
    m = cfg.mining
    if m.method not in ("bm25", "dense", "hybrid"):
        return None
    texts = [doc_texts[d] for d in corpus]
    query_texts = [queries[q] for q in candidate_query_ids(qrels)]
    depth = max(m.candidate_depth, m.rank_end) if m.method == "hybrid" else m.rank_end
    bm25 = dense = None
    if cfg.compute.engine == "ray":  # sharded on the cluster: flat gives the same candidates, ivf approximates them
        from embtune.compute.search import bm25_candidates, dense_candidates

        if m.method in ("bm25", "hybrid"):
            scores, indices, score_docs = bm25_candidates(texts, query_texts, depth, cfg.bm25, cfg.compute)
            bm25 = Ranking(indices, scores, score_docs, "bm25", len(texts))  # fusion normalizes over every doc
        if m.method in ("dense", "hybrid"):
            scores, indices, score_docs = dense_candidates(m.model or cfg.train.base_model, texts, query_texts, depth,
                                                           cfg.compute, m.batch_size, m.max_seq_length,
                                                           m.faiss_index, m.ivf_nlist, m.ivf_nprobe)
            dense = Ranking(indices, scores, score_docs, "cosine", len(texts))
    if m.method in ("bm25", "hybrid") and bm25 is None:
        bm25 = bm25_ranking(texts, query_texts, depth, cfg.bm25.backend, build_tokenizer(cfg.bm25, texts),
                            cfg.bm25.k1, cfg.bm25.b)
    if m.method in ("dense", "hybrid") and dense is None:
        from embtune.data_prep.mining import encode_for_mining

        doc_emb, query_emb = encode_for_mining(m.model or cfg.train.base_model, texts, query_texts,
                                               m.batch_size, m.max_seq_length)
        dense = dense_ranking(doc_emb, query_emb, depth, m.faiss_index, m.ivf_nlist, m.ivf_nprobe)
    if m.method == "hybrid":
        return fuse(bm25, dense, m.rank_end, m.fusion, m.rrf_k, m.bm25_weight, m.dense_weight)
    return bm25 if m.method == "bm25" else dense


def chunk_for_training(cfg, corpus, qrels, queries):
    """Chunk the corpus; a positive becomes its best-matching chunk under BM25 (the others are not negatives)."""
    from transformers import AutoTokenizer

    from embtune.data_prep.chunking import chunk_corpus
    from embtune.data_prep.mining import simple_tokenize
    from embtune.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.chunking.tokenizer or cfg.train.base_model,
                                                                must_exist=True))
    chunks, parent = chunk_corpus(corpus, tokenizer, cfg.chunking.max_tokens, cfg.chunking.overlap)
    children: dict[str, list[str]] = {}
    for chunk_id, doc_id in parent.items():
        children.setdefault(doc_id, []).append(chunk_id)
    new_qrels: dict[str, dict[str, int]] = {}
    exclude: dict[str, set[str]] = {}
    for query_id, docs in qrels.items():
        query_terms = set(simple_tokenize(queries[query_id]))
        judged = {}
        for doc_id, relevance in docs.items():
            best = max(children[doc_id], key=lambda c: len(query_terms & set(simple_tokenize(chunks[c]["text"]))))
            judged[best] = relevance
            # The other chunks of a positive document are neither positives nor safe negatives.
            exclude.setdefault(query_id, set()).update(children[doc_id])
        new_qrels[query_id] = judged
    logger.info("chunking: %d documents -> %d chunks (max %d tokens, overlap %d)", len(corpus), len(chunks),
                cfg.chunking.max_tokens, cfg.chunking.overlap)
    return chunks, new_qrels, exclude


# --- the corpus on shards (compute.engine: ray) ---------------------------------------------------------------------

def on_shards(cfg) -> bool:
    """Whether data_prep reads the corpus by row from its file (``compute.engine: ray``) rather than into a dict:
    labelled BEIR data mined by BM25, dense, hybrid or random negatives, without chunking or a teacher. The other
    routes (synthetic or label-free queries, chunking, a cross-encoder teacher) read the corpus into the driver,
    and the log says so."""
    if cfg.compute.engine != "ray":
        return False
    simple = (cfg.data.format == "beir" and cfg.data.queries == "labelled" and not cfg.chunking.max_tokens
              and not cfg.mining.teacher)
    if not simple:
        logger.warning("compute.engine ray: data_prep holds the corpus in this process for this recipe (only "
                       "labelled BEIR data without chunking or a mining teacher is read by row; docs/scale.md)")
    return simple


def parquet_to_beir(folder: str | Path, out: Path) -> Path:
    """``data.format: parquet``: a BEIR folder whose corpus is ``corpus.parquet`` or a ``corpus/`` folder of
    ``.parquet`` parts (columns ``_id``, ``text``, optional ``title``), written as a BEIR folder under ``out``:
    the corpus streamed batch by batch into ``corpus.jsonl`` with its row and id index
    (``embtune.retrieval.docstore.write_store``: a repeated id is an error naming it), the queries and qrels
    copied. Nothing holds the corpus."""
    import shutil

    import pyarrow.parquet as pq

    from embtune.retrieval.docstore import write_store

    folder = Path(folder)
    parts = [folder / "corpus.parquet"] if (folder / "corpus.parquet").is_file() else \
        sorted((folder / "corpus").glob("*.parquet"))
    if not parts:
        raise InputError(f"data.path {folder}: data.format parquet needs corpus.parquet or corpus/*.parquet there")
    for part in parts:
        names = set(pq.ParquetFile(part).schema_arrow.names)
        if not {"_id", "text"} <= names:
            raise InputError(f"{part}: a corpus part needs columns '_id' and 'text' (and optionally 'title'); it "
                             f"has {sorted(names)}")

    def docs():
        for part in parts:
            handle = pq.ParquetFile(part)
            columns = [c for c in ("_id", "title", "text") if c in handle.schema_arrow.names]
            for batch in handle.iter_batches(batch_size=10_000, columns=columns):
                values = batch.to_pydict()
                for i, doc_id in enumerate(values["_id"]):
                    yield {"_id": str(doc_id), "title": str(values.get("title", [""] * (i + 1))[i] or ""),
                           "text": str(values["text"][i] or "")}

    out.mkdir(parents=True, exist_ok=True)
    rows, _ = write_store(docs(), out / "corpus.jsonl")
    for name in ("queries.jsonl", "qrels"):
        source = folder / name
        if source.is_dir():
            shutil.copytree(source, out / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, out / name)
    logger.info("%s: %d Parquet rows -> %s", folder, rows, out / "corpus.jsonl")
    return out


def run_on_shards(cfg, stage: Stage) -> dict[str, str]:
    """Labelled mining with the corpus read by row (``embtune.compute.corpus.CorpusFile``): the candidates come
    from indexes the engine builds on the corpus file's shards (BM25 counts, encoded Parquet shards, an IVF), and
    :func:`mine_negatives` runs, as on the local engine, over the rows it reads: the positives, every candidate and
    a seeded random sample (what ``on_short: random`` and ``method: random`` draw from). Its corpus counts
    (empty and duplicate documents) are over those rows."""
    import random

    import numpy as np

    from embtune.compute.corpus import open_corpus
    from embtune.dataio import LoadReport, load_qrels, load_queries

    data, m = cfg.data, cfg.mining
    folder = Path(data.path)
    if not folder.exists():
        raise InputError(f"data.path {data.path}: no such file or folder (set data.path to your BEIR folder)")
    load = LoadReport()
    corpus = open_corpus(folder / "corpus.jsonl", data.on_error)
    queries = load_queries(folder / "queries.jsonl", data.on_error, load)
    qrels = load_qrels(folder / "qrels" / f"{data.train_split}.tsv", corpus, queries, data.on_error, load)
    logger.info("corpus %s: %d documents, read by row; %d queries, %d judged (%s)", folder / "corpus.jsonl",
                len(corpus), len(queries), len(qrels), load.summary())
    outputs: dict[str, str | Path] = {"eval_dataset": folder}
    train_qrels, dev_qrels = qrels, {}
    if data.dev_fraction > 0:
        train_qrels, dev_qrels = carve_dev(cfg, stage, qrels, outputs)
    texts = corpus.texts(m.include_title)
    query_ids = candidate_query_ids(train_qrels)
    num_negatives = m.num_negatives if m.method != "none" else 0
    ranking = build_ranking_on_shards(cfg, texts, [queries[q] for q in query_ids]) if num_negatives else None

    # The rows mining reads: positives, candidates, and a seeded sample of the corpus to draw random ones from.
    needed = {corpus.row_of(d) for q in query_ids for d in train_qrels[q]}
    if ranking is not None:
        needed.update(int(r) for r in np.unique(ranking.indices) if r >= 0)
    pool = min(len(corpus), max(1000, 4 * len(query_ids) * max(num_negatives, 1)))
    needed.update(random.Random(cfg.seed).sample(range(len(corpus)), pool))
    rows_read = np.asarray(sorted(needed), dtype=np.int64)
    sub_ids = [corpus.ids[int(r)] for r in rows_read]
    sub_texts = dict(zip(sub_ids, (texts[int(r)] for r in rows_read)))
    if ranking is not None:
        ranking = on_rows(ranking, rows_read)
    pairs_only = {"num_negatives": 0} if num_negatives != m.num_negatives else {}
    rows, mining_report = mine_negatives(dict.fromkeys(sub_ids), queries, train_qrels, sub_texts, m, seed=cfg.seed,
                                         ranking=ranking, **pairs_only)
    report = {"load": load.to_dict(), "train_queries": len(train_qrels), "labelled_train_queries": len(train_qrels),
              "dev_queries": len(dev_qrels),
              "corpus": {"documents": len(corpus), "read_by_row": True, "rows_mining_read": len(rows_read)}}
    return finish_table(stage, rows, mining_report, report, outputs, num_negatives,
                        f" (mining read {len(rows_read)} of {len(corpus)} documents)")


def on_rows(ranking: Ranking, rows) -> Ranking:
    """``ranking`` (corpus rows) over a subset of the corpus, ``rows`` ascending: indices become positions in
    ``rows`` (every ranked row must be among them), and ``score_docs`` maps positions back to corpus rows."""
    import numpy as np

    indices = np.where(ranking.indices >= 0, np.searchsorted(rows, ranking.indices), -1)

    def score_docs(query_row: int, positions: np.ndarray) -> np.ndarray:
        return ranking.score_docs(query_row, rows[np.asarray(positions, dtype=np.int64)])

    return Ranking(indices, ranking.scores, score_docs, ranking.score_name, len(rows))


def build_ranking_on_shards(cfg, texts, query_texts: list[str]) -> Ranking | None:
    """:func:`build_ranking` over a corpus file's texts on the engine: BM25 built once on the file's shards, the
    corpus encoded from the file into Parquet shards (the cache eval's base-model encode reuses), and a weighted
    fusion normalized by whole-corpus statistics merged from the shards, as the core ``Retriever`` fuses."""
    from embtune.compute.corpus import ShardedBM25Index
    from embtune.compute.encoding import encode_corpus
    from embtune.compute.search import bm25_index_candidates, dense_score_stats, shard_candidates
    from embtune.retrieval.encoder import encode, load_encoder
    from embtune.retrieval.fusion import ScoreStats

    m = cfg.mining
    if m.method not in ("bm25", "dense", "hybrid"):
        return None
    depth = max(m.candidate_depth, m.rank_end) if m.method == "hybrid" else m.rank_end
    weighted = m.method == "hybrid" and m.fusion == "weighted"
    bm25 = dense = None
    stats: dict[str, list[ScoreStats]] = {}
    if m.method in ("bm25", "hybrid"):
        index = ShardedBM25Index(texts, cfg.bm25, cfg.compute)
        scores, indices, score_docs = bm25_index_candidates(index.sharded, query_texts, depth)
        bm25 = Ranking(indices, scores, score_docs, "bm25", len(texts))
        if weighted:
            stats["sparse"] = index.score_stats(query_texts)
    if m.method in ("dense", "hybrid"):
        model, key = load_encoder(m.model or cfg.train.base_model, m.max_seq_length)
        shards = encode_corpus(model, texts, m.batch_size, cache_key=key, desc="mining corpus", role="document")
        scores, indices, score_docs = shard_candidates(model, shards, query_texts, depth, cfg.compute, m.batch_size,
                                                       m.faiss_index, m.ivf_nlist, m.ivf_nprobe)
        dense = Ranking(indices, scores, score_docs, "cosine", len(texts))
        if weighted:
            query_emb = encode(model, query_texts, m.batch_size, desc="mining query")
            stats["dense"] = [ScoreStats(*map(float, row))
                              for row in dense_score_stats(shards, query_emb, cfg.compute)]
    if m.method == "hybrid":
        return fuse(bm25, dense, m.rank_end, m.fusion, m.rrf_k, m.bm25_weight, m.dense_weight, stats=stats or None)
    return bm25 if m.method == "bm25" else dense
