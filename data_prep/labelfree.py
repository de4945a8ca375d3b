"""Label-free distillation data (``data.queries: labelfree``): a corpus alone in, a teacher-labelled table out.

    corpus -> probe: choose the teacher's dense/BM25 weight without labels (inverse cloze)
           -> pseudo-queries cut from a seeded sample of passages (title + sentences)
           -> teacher: base dense top-depth + BM25 top-depth, weighted fusion (the core's normalization)
           -> <stage>/train_table (query, candidates, teacher_scores, base_scores)
              + <stage>/labelfree/corpus_embeddings.npy (the base model's, the student's fixed document side)

The teacher is the fused retriever of the retrieval core (``embtune.retrieval.fusion.weighted_fuse`` over the base
model's cosine and stemmed BM25), the same fusion eval measures and serve serves. On SciFact it is well above the base
model (benchmarks/results/scifact_labelfree.json); distilling it moves that value into a dense-only model.

**Choosing the teacher without labels.** A fixed weight is not right for every corpus (BM25 is useless for some,
the dense model for others), and queries cut verbatim from a passage favour BM25, which matches them word for
word. The probe therefore asks the inverse-cloze question (Lee et al., 2019): a sentence (or a title) is cut out
of its passage, and each fusion weight must find the passage *without that sentence* among the whole corpus. The
weight with the best MRR@10 is the teacher's; weights 0 and 1 (BM25 alone, dense alone) are candidates, so on the
probe the teacher is never below its best member. A weight that adds BM25 must pass the probe's lexical check
(``embtune.retrieval.probe.lexical_check``: it beats the dense model alone on the probe queries that share the
fewest terms with their passage too), so that verbatim overlap alone cannot pull the teacher off the dense model.
The probe's table is written into the stage report.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embtune.dataio import document_text
from embtune.retrieval.fusion import DEFAULT_NORMALIZATION, weighted_fuse
from embtune.retrieval.language import count_words, crop_words, split_sentences
from embtune.retrieval.probe import ClozeProbe, lexical_check
from embtune.retrieval.spec import replace_rows, row_vectors

logger = logging.getLogger(__name__)

__all__ = ["split_sentences", "cut_queries", "probe_teacher", "decide", "build_labelfree", "FusedTeacher"]


@dataclass
class PseudoQuery:
    text: str
    source: str  # the passage id it was cut from
    kind: str  # "title" or "sentence"


def cut_queries(corpus: dict[str, dict[str, str]], documents: int, sentences_per_document: int, titles: bool,
                min_words: int, max_words: int, seed: int, span_words: tuple[int, int] | None = None,
                exclude: set[str] | frozenset[str] = frozenset()) -> list[PseudoQuery]:
    """Pseudo-queries from a seeded sample of ``documents`` passages (0 = all): the title, when there is one, and up
    to ``sentences_per_document`` sentences of ``min_words``..``max_words`` words, drawn at random. With
    ``span_words`` (lo, hi), each sentence is cut down to a random run of lo..hi consecutive words of it (kind
    ``"span"``): shorter, like a query, and no longer a whole sentence of its passage. Passages in ``exclude`` (the
    probe's, which judge the student after training) give no query. Sentences and words are counted in any script
    (``embtune.retrieval.language``)."""
    rng = random.Random(seed)
    doc_ids = [d for d in corpus if d not in exclude]
    if documents and documents < len(doc_ids):
        chosen = set(rng.sample(sorted(doc_ids), documents))
        doc_ids = [d for d in doc_ids if d in chosen]
    out: list[PseudoQuery] = []
    seen: set[str] = set()
    for doc_id in doc_ids:
        doc = corpus[doc_id]
        title = (doc.get("title") or "").strip()
        if titles and title and count_words(title) >= 2 and title.lower() not in seen:
            seen.add(title.lower())
            out.append(PseudoQuery(title, doc_id, "title"))
        sentences = [s for s in split_sentences(doc.get("text") or "") if min_words <= count_words(s) <= max_words]
        for sentence in rng.sample(sentences, min(sentences_per_document, len(sentences))):
            kind = "sentence"
            if span_words:
                sentence, kind = crop(sentence, *span_words, rng), "span"
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                out.append(PseudoQuery(sentence, doc_id, kind))
    return out


def crop(sentence: str, low: int, high: int, rng: random.Random) -> str:
    """A random run of ``low``..``high`` consecutive words of ``sentence`` (all of it when it is shorter)."""
    return crop_words(sentence, low, high, rng)


class FusedTeacher:
    """The base dense model + BM25 over one corpus, searched by the core's ``Retriever``: its member runs carry the
    whole-corpus statistics that ``weighted_fuse`` (the core's one formula) normalizes with, at any dense weight.

    Args:
        doc_ids / doc_texts: the corpus (BM25 statistics and the dense index cover all of it).
        doc_emb: (n_docs, dim) normalized base-model embeddings of ``doc_texts``.
        model: the base SentenceTransformer (encodes queries, by the query role).
        bm25_cfg: the top-level ``bm25`` section (tokenizer, k1, b).
    """

    def __init__(self, doc_ids: list[str], doc_texts: list[str], doc_emb: np.ndarray, model, bm25_cfg,
                 batch_size: int = 64) -> None:
        from embtune.retrieval.spec import DenseSpec, FusionSpec, RetrieverSpec

        self.doc_ids = doc_ids
        self.doc_texts = doc_texts
        self.doc_emb = doc_emb
        self.model = model
        self.batch_size = batch_size
        self.bm25_cfg = bm25_cfg
        self.spec = RetrieverSpec(dense=DenseSpec(dim=int(doc_emb.shape[1])), bm25=bm25_cfg,
                                  fusion=FusionSpec(method="weighted"))
        self.bm25 = self.index(doc_texts)

    def index(self, doc_texts: list[str]):
        """The core's BM25 index (``bm25`` section) over ``doc_texts``, e.g. the probe's corpus with cut passages."""
        from embtune.retrieval.spec import BM25Index

        return BM25Index(doc_texts, self.bm25_cfg)

    def runs(self, query_texts: list[str], depth: int, doc_emb: np.ndarray | None = None, bm25=None):
        """(dense run, BM25 run, query embeddings): each query's top ``depth`` under each member, query ids
        ``"0".."n-1"``, doc ids the corpus'; the runs carry whole-corpus statistics (``MemberRun``).
        ``doc_emb`` / ``bm25`` replace the corpus' embeddings and BM25 index (the probe's cut passages)."""
        from embtune.retrieval.encoder import encode
        from embtune.retrieval.spec import Retriever

        query_emb = encode(self.model, query_texts, self.batch_size, desc="pseudo-queries",
                           role="query")  # (n_queries, dim)
        retriever = Retriever(self.spec, self.doc_ids, self.doc_texts, self.doc_emb if doc_emb is None else doc_emb,
                              bm25=bm25 or self.bm25)
        dense, sparse = retriever.member_runs(query_texts, query_emb, depth)
        return dense, sparse, query_emb

    @staticmethod
    def labels(fused: dict[str, float], candidates: list[str]) -> list[float]:
        """The teacher's scores of one query's ``candidates``, min-max rescaled over them to [0, 1]: the fused score
        is a weighted sum of z-scores (any range), and ``train.query_teacher_temperature`` is set for [0, 1]."""
        values = np.array([fused[d] for d in candidates], dtype=np.float64)
        span = values.max() - values.min() if len(values) else 0.0
        scaled = (values - values.min()) / span if span > 0 else np.ones_like(values)
        return [round(float(v), 6) for v in scaled]


def bring_teacher(cfg, query_texts: list[str], fused: dict, doc_text: dict[str, str], depth: int,
                  report: dict[str, Any]) -> dict:
    """``labelfree.teacher``: a cross-encoder scores each query's top ``depth`` under the fused teacher, alone or
    fused with it (``labelfree.teacher_weight``; ``data_prep.teacher.rescore_candidates``); recorded in ``report``."""
    from embtune.data_prep.teacher import rescore_candidates
    from embtune.retrieval.rerank import CrossEncoderScorer

    lf = cfg.labelfree
    scorer = CrossEncoderScorer(lf.teacher, batch_size=lf.teacher_batch_size, max_length=lf.teacher_max_length)
    report["teacher"].update({"cross_encoder": scorer.name_or_path, "cross_encoder_weight": lf.teacher_weight,
                              "candidates": f"the fusion's top {depth}"})
    return rescore_candidates(scorer, query_texts, fused, doc_text, depth, lf.teacher_weight)


def probe_teacher(teacher: FusedTeacher, probe: ClozeProbe, doc_texts: list[str], weights: list[float],
                  depth: int = 100, cache_key: str | None = None) -> dict[str, Any]:
    """Measure every dense weight on the inverse-cloze probe (``embtune.retrieval.probe``) and choose the
    teacher's: BM25 and the dense index are rebuilt over the corpus with the probe passages cut. Returns the MRR@10
    of every weight, of each member alone, the choice and the counts; ``choice`` None when there is no probe query."""
    from embtune.retrieval.encoder import encode

    if not len(probe):
        return {"queries": 0, "choice": None,
                "reason": "no passage long enough to cut a probe query from (3 sentences, or a title of 2 words)"}
    position = {d: i for i, d in enumerate(teacher.doc_ids)}
    texts = probe.corpus_texts(teacher.doc_ids, doc_texts)
    cut_ids = list(probe.cut_texts)
    doc_emb = replace_rows(teacher.doc_emb, [position[d] for d in cut_ids],
                           encode(teacher.model, [probe.cut_texts[d] for d in cut_ids], teacher.batch_size,
                                  cache_key=cache_key, desc="probe passages"))
    bm25 = teacher.index(texts)
    dense, sparse, _ = teacher.runs(probe.queries, depth, doc_emb=doc_emb, bm25=bm25)
    fused = {w: weighted_fuse(dense, sparse, w, depth) for w in weights}
    mrr = {f"{w:g}": probe.mrr(fused[w]) for w in weights}
    # The lexical check (embtune.retrieval.probe): a weight that adds BM25 must also beat the dense model alone on
    # the probe queries sharing the fewest terms with their passage; dense alone always passes.
    low = probe.least_lexical(bm25.tokenizer)
    dense_low = probe.mrr(dense, only=low)
    mrr_low = {f"{w:g}": probe.mrr(fused[w], only=low) for w in weights}
    passing = [w for w in weights if w >= 1 or lexical_check(mrr_low[f"{w:g}"], dense_low, len(low))["passes"]]
    unchecked = max(weights, key=lambda w: (mrr[f"{w:g}"], w))  # ties go to the denser teacher (the student's side)
    best = max(passing or [1.0], key=lambda w: (mrr.get(f"{w:g}", -1.0), w))
    if f"{best:g}" not in mrr:  # dense alone was not among probe_weights
        mrr[f"{best:g}"], mrr_low[f"{best:g}"] = probe.mrr(dense), dense_low
    check = lexical_check(mrr_low[f"{unchecked:g}"], dense_low, len(low))
    return {"queries": len(probe), "kinds": probe.counts(),
            "metric": "MRR@10 of the passage the query was cut out of (the query's text removed from it)",
            "dense_alone": probe.mrr(dense), "bm25_alone": probe.mrr(sparse), "fused_by_dense_weight": mrr,
            "least_lexical": {"queries": len(low), "dense_alone": dense_low, "fused_by_dense_weight": mrr_low},
            "lexical_check": {"best_on_probe": unchecked, **check,
                              "choice": "kept" if best == unchecked else f"dense weight {best:g} instead"},
            "choice": best, "choice_mrr": mrr[f"{best:g}"]}


def decide(reads: bool, fit_why: str, probe: dict[str, Any], min_headroom: float) -> dict[str, Any]:
    """Whether training can pay, from the corpus's own evidence: ``{"train", "decision", "reason"}``.

    - the base model cannot read the corpus (tokenizer fit): ``bm25``, no student;
    - the probe could not measure (no passage to cut a query from): ``base``, no student (no evidence);
    - the probe's teacher is less than ``min_headroom`` MRR@10 points above the dense model alone: ``base``, no
      student (the student gains a fraction of that headroom, and where it is small it can lose: issue 19's
      corpora and benchmarks/results/labelfree_corpora.json);
    - otherwise ``train``. What ships is chosen after training, on the same probe (eval).
    """
    if not reads:
        return {"train": False, "decision": "bm25",
                "reason": f"the base model cannot read this corpus ({fit_why}): BM25 is the teacher and the shipped "
                          "retriever, and no student is trained"}
    if not probe.get("queries"):
        return {"train": False, "decision": "base",
                "reason": f"the probe could not measure ({probe.get('reason')}): with no evidence that training "
                          "pays, the base model is kept"}
    headroom = round(probe["choice_mrr"] - probe["dense_alone"], 2)
    if headroom < min_headroom:
        return {"train": False, "decision": "base", "headroom": headroom,
                "reason": f"probe: the teacher (dense weight {probe['choice']:g}) finds the cut passage at MRR@10 "
                          f"{probe['choice_mrr']} against {probe['dense_alone']} for the dense model alone "
                          f"(+{headroom} < labelfree.min_headroom {min_headroom:g}): too little to distil, the "
                          "base model is kept"}
    return {"train": True, "decision": "train", "headroom": headroom,
            "reason": f"probe: the teacher (dense weight {probe['choice']:g}) finds the cut passage at MRR@10 "
                      f"{probe['choice_mrr']} against {probe['dense_alone']} for the dense model alone "
                      f"(+{headroom} >= labelfree.min_headroom {min_headroom:g}): a student is trained"}


def build_labelfree(cfg, corpus: dict[str, dict[str, str]], stage_dir: Path) -> tuple[list[dict[str, Any]], dict]:
    """Rows ``{query, candidates, teacher_scores, base_scores}`` (none when the decision is not to train) and the
    report; writes the corpus embeddings and the probe set (``labelfree/probe.json``, read by eval)."""
    import dataclasses

    from embtune.compute.encoding import encode_corpus
    from embtune.retrieval.bm25 import resolve_language
    from embtune.retrieval.encoder import load_encoder, save_matrix
    from embtune.retrieval.language import detect_language, reads_corpus, tokenizer_fit

    lf = cfg.labelfree
    include_title = cfg.mining.include_title
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d], include_title) for d in doc_ids]
    out = stage_dir / "labelfree"
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"documents_in_corpus": len(doc_ids)}

    # The corpus's language: BM25's tokenisation (bm25.language: auto) and what the base model must read.
    language = detect_language(doc_texts)
    bm25_settings = dataclasses.replace(cfg.bm25, language=resolve_language(cfg.bm25, doc_texts))
    report["language"] = {**language, "bm25_language": bm25_settings.language}
    model, key = load_encoder(cfg.train.base_model, cfg.eval.max_seq_length)
    sample = random.Random(cfg.seed).sample(doc_texts, min(lf.fit_documents, len(doc_texts)))
    fit = tokenizer_fit(model.tokenizer, sample, model.max_seq_length)
    reads, fit_why = reads_corpus(fit, lf.max_unknown_share, lf.max_single_letter_share)
    report["tokenizer_fit"] = {**fit, "reads": reads, "why": fit_why}
    logger.info("corpus language: %s (%s); BM25 tokenises as %s; base model %s: %s", language["language"],
                language["why"], bm25_settings.language, "reads it" if reads else "CANNOT read it", fit_why)

    # (n_docs, dim), or on the Ray engine the ShardSet that the teacher searches shard by shard
    doc_emb = encode_corpus(model, doc_texts, cfg.mining.batch_size, cache_key=key, desc="corpus", role=None)
    save_matrix(doc_emb, out / "corpus_embeddings.npy")
    (out / "doc_ids.json").write_text(json.dumps(doc_ids))
    (out / "doc_texts.json").write_text(json.dumps(doc_texts))  # what was embedded (symmetric training reads it)
    teacher = FusedTeacher(doc_ids, doc_texts, doc_emb, model, bm25_settings, cfg.mining.batch_size)

    n_probe = min(lf.probe_queries, max(1, int(lf.probe_max_share * len(corpus))))
    probe_set = ClozeProbe.build(corpus, n_probe, lf.min_words, lf.max_words, cfg.seed, include_title)
    probe_set.save(out / "probe.json")
    probe = probe_teacher(teacher, probe_set, doc_texts, lf.probe_weights, cache_key=key)
    decision = decide(reads, fit_why, probe, lf.min_headroom)
    if decision["decision"] == "bm25":
        dense_weight, by = 0.0, "tokenizer fit: the base model cannot read the corpus"
    elif lf.dense_weight is not None:
        dense_weight, by = lf.dense_weight, "labelfree.dense_weight (set in the recipe)"
    elif probe["choice"] is None:
        dense_weight, by = 1.0, f"no probe ({probe['reason']}): the dense model alone"
    else:
        dense_weight, by = probe["choice"], "inverse-cloze probe (no labels)"
    report["teacher_choice"] = {"by": by, **probe}
    report["teacher"] = {"dense": cfg.train.base_model, "bm25": bm25_settings.language,
                         "fusion": f"weighted ({DEFAULT_NORMALIZATION})", "dense_weight": dense_weight,
                         "bm25_weight": round(1 - dense_weight, 4)}
    report["decision"] = decision
    logger.info("teacher: dense weight %.2f (%s; probe MRR@10 %s, dense alone %s, BM25 alone %s)", dense_weight, by,
                probe.get("choice_mrr"), probe.get("dense_alone"), probe.get("bm25_alone"))
    logger.info("label-free decision: %s", decision["reason"])

    queries = []
    if lf.query_source in ("cut", "both"):
        queries += cut_queries(corpus, lf.documents, lf.sentences_per_document, lf.titles, lf.min_words,
                               lf.max_words, cfg.seed, tuple(lf.span_words) or None, exclude=set(probe_set.targets))
    if lf.query_source in ("llm", "both") and decision["train"]:
        written, report["llm"] = llm_queries(cfg, corpus, set(probe_set.targets), out)
        queries += written
    report.update({"queries": len(queries), "probe_passages_held_out": len(probe_set.targets),
                   "kinds": {k: sum(q.kind == k for q in queries) for k in ("title", "sentence", "span", "llm")},
                   "source": lf.source, "depth": lf.depth, "corpus_embeddings": str(out / "corpus_embeddings.npy"),
                   "probe_set": str(out / "probe.json")})
    if decision["train"] and not queries:
        decision.update(train=False, decision="base", reason="no pseudo-query could be cut from the corpus (no "
                        f"title, no sentence of {lf.min_words}..{lf.max_words} words): the base model is kept")
    if not decision["train"]:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return [], report
    logger.info("labelfree: %d pseudo-queries cut from %d passages (%d probe passages held out)", len(queries),
                len({q.source for q in queries}), len(probe_set.targets))
    depth = lf.depth + 1  # one more, for the source passage that "drop" removes
    pool = max(depth, 100)  # each member's candidate list before fusion (eval's hybrid depth)
    dense, sparse, query_emb = teacher.runs([q.text for q in queries], pool)
    fused = weighted_fuse(dense, sparse, dense_weight, pool)
    if lf.teacher:  # a teacher you bring rescores the fusion's candidates
        fused = bring_teacher(cfg, [q.text for q in queries], fused, dict(zip(doc_ids, doc_texts)), depth, report)
    position = {d: i for i, d in enumerate(doc_ids)}
    rows = []
    source_ranks = []
    kept = []  # the queries that give a row (an LLM query whose passage the teacher misses gives none)
    round_trip = lf.round_trip_k if lf.query_source != "cut" else 0
    from embtune.retrieval.fusion import ranked

    for i, query in enumerate(tqdm_iter(queries, "teacher labels")):
        top = ranked(fused[str(i)], None)
        rank = top.index(query.source) if query.source in top[:depth] else depth
        if query.kind == "llm" and round_trip and rank >= round_trip:
            continue
        source_ranks.append(rank)
        kept.append(query)
        # A cut query is its passage's own words: "drop" takes the passage out. An LLM query is not: its passage
        # is the answer, a candidate like any other, unless the loss holds it apart as the positive.
        if (lf.source == "drop") if query.kind != "llm" else (lf.positives == "cut"):
            top = [d for d in top if d != query.source]
        top = top[: lf.depth]
        rows_idx = [position[d] for d in top]
        base = (row_vectors(doc_emb, rows_idx) @ query_emb[i]).tolist()  # the base student's cosines of them
        labels = FusedTeacher.labels(fused[str(i)], top)
        if query.kind == "llm" and lf.llm_answer != "teacher" and query.source in top:
            if lf.llm_answer == "dense_first":
                labels = FusedTeacher.labels(dict(zip(top, base)), top)
            labels[top.index(query.source)] = round(max(labels) + 0.1, 6)
        rows.append({"query": query.text, "source_id": query.source, "source_row": position[query.source],
                     "kind": query.kind,
                     "candidates": rows_idx, "teacher_scores": labels,
                     "base_scores": [round(s, 6) for s in base]})
        if lf.positives == "cut":  # the base model's corpus statistics of this query (query_fused_stats: base),
            stats = dense.stats[str(i)]  # those the teacher's fusion normalized its cosines with
            rows[-1].update(base_cosine_mean=round(stats.mean, 6), base_cosine_std=round(stats.std, 6))
    if round_trip:
        report["llm_round_trip"] = {"k": round_trip, "written": sum(q.kind == "llm" for q in queries),
                                    "kept": sum(q.kind == "llm" for q in kept)}
        logger.info("labelfree: %d of %d LLM queries kept (the teacher ranks their passage in its top %d)",
                    report["llm_round_trip"]["kept"], report["llm_round_trip"]["written"], round_trip)
    queries = kept
    report["rows"] = len(rows)
    if not rows:
        decision.update(train=False, decision="base", reason="no pseudo-query is left: every LLM query's passage "
                        f"missed the teacher's top {round_trip} (labelfree.round_trip_k): the base model is kept")
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return [], report
    if lf.positives == "cut":
        cut_positives(rows, queries, corpus, teacher, model, key, include_title, out, cfg.mining.batch_size, report)
    ranks = np.array(source_ranks)
    report["source_rank_under_teacher"] = {"top1": round(float((ranks == 0).mean()), 4),
                                           f"top{lf.depth}": round(float((ranks < lf.depth).mean()), 4)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return rows, report


def llm_queries(cfg, corpus: dict[str, dict[str, str]], exclude: set[str], out: Path
                ) -> tuple[list[PseudoQuery], dict[str, Any]]:
    """``labelfree.query_source: llm``: queries written by the ``llm`` section's model through the LLM client, for
    a seeded sample of ``llm.documents`` passages (0 = all) outside ``exclude`` (the probe's), cleaned as synthetic
    queries are (``data_prep/synthesize.py``). The round trip is the teacher's (``build_labelfree``), so none is
    run here. Answers are cached in ``labelfree/llm_cache.jsonl`` (or ``llm.cache_file``): a rerun asks for none."""
    import dataclasses

    from embtune.data_prep.synthesize import synthesize
    from embtune.data_prep.synthetic import select_passages

    llm = dataclasses.replace(cfg.llm, round_trip="none")
    chosen = select_passages([d for d in corpus if d not in exclude], llm.documents, cfg.seed)
    texts = [document_text(corpus[d], True) for d in chosen]  # the writer reads the title too
    result = synthesize(chosen, texts, llm, Path(llm.cache_file) if llm.cache_file else out / "llm_cache.jsonl")
    queries = [PseudoQuery(row["query"], row["doc_id"], "llm") for row in result.rows]
    logger.info("labelfree: the LLM wrote %d queries for %d passages", len(queries), len(chosen))
    return queries, {"passages": len(chosen), "queries": len(queries), "failed": len(result.failures),
                     **{k: result.report[k] for k in ("answers", "cleaning")}}


def cut_passage(doc: dict[str, str], query: PseudoQuery, include_title: bool) -> str:
    """The passage ``query`` was cut from, without it (the title gone for a title query, else the sentence):
    the inverse-cloze positive, a pair as real as the probe's."""
    if query.kind == "llm":  # written, not cut: the whole passage is its positive
        return document_text(doc, include_title)
    if query.kind == "title":
        return document_text({"text": doc.get("text") or ""}, include_title)
    text = (doc.get("text") or "").replace(query.text, " ", 1)
    return document_text({**doc, "text": " ".join(text.split())}, include_title)


def cut_positives(rows: list[dict[str, Any]], queries: list[PseudoQuery], corpus: dict[str, dict[str, str]],
                  teacher: FusedTeacher, model, cache_key: str, include_title: bool, out: Path, batch_size: int,
                  report: dict[str, Any]) -> None:
    """``labelfree.positives: cut``: what ``train.loss: query_fused`` reads, added to each row in place.

    - ``labelfree/positive_embeddings.npy`` (n_rows, dim): the base model's embedding of each query's passage
      with the query cut out (row i for table row i; the student's fixed positive, as the corpus embeddings are its
      fixed negatives);
    - ``bm25_z`` (k) and ``bm25_z_positive``: BM25's score of each candidate and of the cut passage as z-scores
      over the query's scores on the whole corpus, the ``corpus_zscore`` normalization the deployed fusion applies
      (``embtune.retrieval.fusion``), so the loss can add BM25's share of the hybrid score as a constant.
    """
    from embtune.retrieval.encoder import encode, save_matrix

    texts = [cut_passage(corpus[q.source], q, include_title) for q in queries]
    save_matrix(encode(model, texts, batch_size, cache_key=cache_key, desc="cut passages"),
                out / "positive_embeddings.npy")  # (n_rows, dim)
    for i, (row, query, text) in enumerate(zip(rows, queries, texts)):
        row["positive_row"] = i
        row["bm25_z"], mean, std = bm25_zscores(teacher.bm25, query.text, row["candidates"])
        row["bm25_z_positive"] = round((teacher.bm25.score_outside(query.text, text) - mean) / std, 5)
    z = np.array([r["bm25_z_positive"] for r in rows])
    top = np.array([max(r["bm25_z"]) for r in rows])
    report["cut_positives"] = {"rows": len(rows), "bm25_z_positive_median": round(float(np.median(z)), 3),
                               "bm25_beats_positive_share": round(float((top > z).mean()), 4)}


def bm25_zscores(bm25, query: str, rows: list[int]) -> tuple[list[float], float, float]:
    """BM25's scores of corpus ``rows`` for ``query`` as z-scores over the query's scores on the whole corpus (the
    ``corpus_zscore`` normalization the deployed fusion applies), with that mean and standard deviation."""
    scores = bm25.all_scores(query)  # (n_docs,) float64
    mean, std = float(scores.mean()), float(scores.std()) or 1.0
    return [round((float(scores[r]) - mean) / std, 5) for r in rows], mean, std


def tqdm_iter(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, mininterval=2.0, disable=len(items) < 1000)
