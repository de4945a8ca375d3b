"""Answer-level RAG check: does better retrieval give answers that cite the right passage and stay faithful?

For a seeded sample of judged queries, each retriever (the base and the fine-tuned model, same sample) takes the
top ``k`` passages (optionally reranked by a CrossEncoder); the ``llm`` section's model (the same client and
config as query synthesis; ``llm.endpoint: local`` = the embedded SmolLM2) answers from them, citing passages as
``[1]``..``[k]``; then the same model, as a judge, rates from 1 to 5 whether the answer is supported by the
passages it cites. Per query and retriever:

- ``gold_in_context``: a gold passage (qrels relevance > 0) is among the k given to the LLM (no LLM involved);
- ``cited``: the answer cites at least one valid passage number;
- ``cites_gold``: the answer cites a gold passage;
- ``faithfulness``: the judge's score mapped to [0, 1] ((score - 1) / 4), judged against the cited passages
  (all k when the answer cites none); None when the judge's reply has no score.

Base vs fine-tuned is a paired comparison on the same queries (sign-flip randomization test on the per-query
outcome; exact McNemar for the binary ones). Answers and judgements go through ``embtune.llm.client.generate_all``
and its JSONL cache, so a rerun sends no request it already made; identical prompts are sent once.

    python -m embtune.eval.rag configs/scifact_rag.yaml --finetuned runs/x/train/model --out rag.json

Writes ``<run_dir>/eval/rag.json`` (or ``--out``): setup, per-retriever rates, the comparison, tokens, wall time,
and per-query records (query, retrieved ids, gold ids, answer, citations, judge reply).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from embtune.compute.encoding import encode_corpus
from embtune.dataio import document_text, load_corpus, load_qrels, load_queries
from embtune.llm.client import ChatRequest, generate_all
from embtune.manifest import Provenance
from embtune.models import resolve_model
from embtune.retrieval.encoder import encode

logger = logging.getLogger(__name__)

ANSWER_SYSTEM = ("You answer using only the numbered passages you are given. Cite the passages that support each "
                 "statement by their number in square brackets, like [1] or [2]. If the passages do not contain "
                 "the answer, say so.")
ANSWER_USER = ("Passages:\n{passages}\n\nQuery: {query}\n\nStart with the number of the passage that answers the "
               "query, in brackets, then answer in one or two sentences using only the passages (if the query is "
               "a claim, say whether the passages support or refute it).")
JUDGE_SYSTEM = ("You check whether an answer is supported by the passages it is based on. Reply with one integer "
                "from 1 to 5 and nothing else. 5: every statement in the answer is supported by the passages. "
                "3: some statements are supported, some are not. 1: the answer is not supported by the passages "
                "or contradicts them.")
JUDGE_USER = "Passages:\n{passages}\n\nAnswer:\n{answer}\n\nScore (1-5):"
# One worked example each: small models (SmolLM2-135M) otherwise echo the query without citing, and number
# their judgements like list items ("1. The answer is correct.").
EXAMPLE_PASSAGES = ["Vitamin D supplementation did not reduce the incidence of fractures in a trial of 25,871 adults.",
                    "Regular aerobic exercise lowered resting blood pressure by 4 to 9 mmHg in adults with "
                    "hypertension."]
EXAMPLE_QUERY = "Aerobic exercise reduces blood pressure in hypertensive adults."
EXAMPLE_ANSWER = ("[2] Supported: regular aerobic exercise lowered resting blood pressure by 4 to 9 mmHg in adults "
                  "with hypertension [2].")
# (answer, passage numbers it is judged against, score): one supported, one not, so the score is not just copied.
EXAMPLE_JUDGEMENTS = [("[1] Vitamin D prevents fractures in adults.", [1], "1"),
                      ("[2] Aerobic exercise lowered blood pressure in adults with hypertension.", [2], "5")]

_BRACKET = re.compile(r"\[([^\[\]]{1,60})\]")
_NUMBER_OR_RANGE = re.compile(r"(\d+)\s*(?:[-\u2013]\s*(\d+))?")
_SCORE_PATTERNS = [
    re.compile(r"(?i)\b(?:score|rating|rated|rate)\b[^0-9\n]{0,20}?(?<![\d.])([1-5])(?:\.\d+)?(?!\d)"),
    re.compile(r"(?<![\d.])([1-5])(?:\.\d+)?\s*(?:/\s*5|out\s+of\s+5)\b", re.I),
    re.compile(r"(?<![\d.\w])([1-5])(?![\d\w]|\.\d|\s*/\s*\d{2})"),
]
_SCORE_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def parse_citations(answer: str, k: int) -> tuple[list[int], int]:
    """Passage numbers cited as ``[2]``, ``[1, 3]``, ``[1-3]``, ``[Passage 2]``; returns (valid 1..k in order of
    first citation, count of out-of-range numbers)."""
    cited: list[int] = []
    invalid = 0
    for group in _BRACKET.findall(answer):
        for start, end in _NUMBER_OR_RANGE.findall(group):
            low = int(start)
            high = int(end) if end else low
            numbers = range(low, high + 1) if 0 <= high - low <= k else [low, high]
            for number in numbers:
                if 1 <= number <= k:
                    if number not in cited:
                        cited.append(number)
                else:
                    invalid += 1
    return cited, invalid


def parse_judge_score(reply: str) -> int | None:
    """The 1-5 score in a judge's reply (``4``, ``Score: 5/5``, ``I'd rate it 3 out of 5``, ``**Rating:** 2``,
    ``four``); None when there is none (``10``, ``0``, empty, refusals)."""
    text = reply.strip()
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    word = re.search(r"(?i)\b(one|two|three|four|five)\b", text)
    return _SCORE_WORDS[word.group(1).lower()] if word else None


def format_passages(passages: list[tuple[int, str]], max_chars: int) -> str:
    """``[n] text`` lines; each text cut to ``max_chars`` characters (at a word boundary when possible)."""
    lines = []
    for number, text in passages:
        text = " ".join(text.split())
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
        lines.append(f"[{number}] {text}")
    return "\n".join(lines)


def answer_messages(query: str, passages: list[str], max_chars: int) -> list[dict[str, str]]:
    """System prompt, one worked example, then the query with its numbered passages."""
    example = format_passages(list(enumerate(EXAMPLE_PASSAGES, start=1)), max_chars)
    numbered = format_passages(list(enumerate(passages, start=1)), max_chars)
    return [{"role": "system", "content": ANSWER_SYSTEM},
            {"role": "user", "content": ANSWER_USER.format(passages=example, query=EXAMPLE_QUERY)},
            {"role": "assistant", "content": EXAMPLE_ANSWER},
            {"role": "user", "content": ANSWER_USER.format(passages=numbered, query=query)}]


def judge_messages(answer: str, passages: list[tuple[int, str]], max_chars: int) -> list[dict[str, str]]:
    """System prompt, two worked examples (unsupported: 1, supported: 5), then the answer and its passages."""
    messages = [{"role": "system", "content": JUDGE_SYSTEM}]
    for example_answer, numbers, score in EXAMPLE_JUDGEMENTS:
        example = format_passages([(n, EXAMPLE_PASSAGES[n - 1]) for n in numbers], max_chars)
        messages += [{"role": "user", "content": JUDGE_USER.format(passages=example, answer=example_answer)},
                     {"role": "assistant", "content": score}]
    return messages + [{"role": "user", "content": JUDGE_USER.format(passages=format_passages(passages, max_chars),
                                                          answer=answer.strip())}]


# --- paired comparison --------------------------------------------------------------------------------------------

def sign_flip_test(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Two-sided paired randomization (sign-flip) test of mean(b - a) = 0, exact when 2**n <= resamples.

    Used when ``eval.significance`` (the eval sweep's paired bootstrap) is not available; same null hypothesis.
    """
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (n,)
    nonzero = diff[np.abs(diff) > 1e-12]
    observed = abs(diff.mean()) if len(diff) else 0.0
    if len(nonzero) == 0:
        p_value = 1.0
    elif 2 ** len(nonzero) <= resamples:
        signs = ((np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1) * 2 - 1  # (2^m, m)
        means = np.abs((signs * nonzero).sum(axis=1) / len(diff))
        p_value = float(np.mean(means >= observed - 1e-12))
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice([-1.0, 1.0], size=(resamples, len(nonzero)))  # (resamples, m)
        means = np.abs((signs * nonzero).sum(axis=1) / len(diff))
        p_value = float((np.sum(means >= observed - 1e-12) + 1) / (resamples + 1))
    return {"n": int(len(diff)), "a_mean": float(np.mean(a)) if len(diff) else None,
            "b_mean": float(np.mean(b)) if len(diff) else None, "diff": float(diff.mean()) if len(diff) else None,
            "p_value": p_value, "wins": int((diff > 1e-12).sum()), "ties": int((np.abs(diff) <= 1e-12).sum()),
            "losses": int((diff < -1e-12).sum()), "method": "two-sided paired sign-flip randomization test"}


def paired_compare(a: list[float], b: list[float], resamples: int, seed: int, binary: bool = False) -> dict[str, Any]:
    """B vs A on the same queries: eval.significance.paired_test when present, else :func:`sign_flip_test`;
    binary outcomes also get the exact McNemar p-value (binomial test on the discordant pairs)."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a_arr) < 2:
        return {"n": int(len(a_arr)), "p_value": None, "note": "fewer than 2 paired queries"}
    try:
        from embtune.eval.significance import paired_test  # the eval sweep's bootstrap CI + randomization test

        result = paired_test(a_arr, b_arr, resamples=resamples, seed=seed)
    except ImportError:
        result = sign_flip_test(a_arr, b_arr, resamples=resamples, seed=seed)
    if binary:
        from scipy.stats import binomtest

        b_only, a_only = int(((b_arr > 0) & (a_arr == 0)).sum()), int(((a_arr > 0) & (b_arr == 0)).sum())
        result["mcnemar_exact_p"] = (float(binomtest(b_only, b_only + a_only, 0.5).pvalue)
                                     if b_only + a_only else 1.0)
        result["discordant"] = {"only_b": b_only, "only_a": a_only}
    return result


# --- the check ----------------------------------------------------------------------------------------------------

def sample_queries(qrels: dict[str, dict[str, int]], size: int, seed: int) -> list[str]:
    """A seeded sample of judged query ids (all of them when ``size`` is 0 or larger than the split)."""
    judged = sorted(q for q, docs in qrels.items() if any(r > 0 for r in docs.values()))
    if not size or size >= len(judged):
        return judged
    return sorted(random.Random(seed).sample(judged, size))


def retrieve(model_path: str, doc_ids: list[str], doc_texts: list[str], query_texts: list[str], k: int,
             rerank: str = "", candidates: int = 20, batch_size: int = 64) -> list[list[str]]:
    """Each query's top-``k`` doc ids from the core's ``Retriever`` (exact search over the model's embeddings, then,
    optionally, the CrossEncoder ``rerank`` rescoring the first ``candidates``), as eval and serve retrieve.

    Documents are encoded by the document role and queries by the query role, so an asymmetric model (a
    label-free Router) retrieves through its query route."""
    from embtune.retrieval.encoder import cache_key, load_encoder
    from embtune.retrieval.fusion import ranked
    from embtune.retrieval.spec import DenseSpec, RerankSpec, Retriever, RetrieverSpec

    model, _ = load_encoder(model_path)
    key = cache_key(resolve_model(model_path), model.max_seq_length, role="document")
    # (n_docs, dim), or the Ray engine's shards
    doc_emb = encode_corpus(model, doc_texts, batch_size, cache_key=key, desc="corpus", role="document")
    query_emb = encode(model, query_texts, batch_size, desc="query", role="query")  # (n_queries, dim)
    spec = RetrieverSpec(dense=DenseSpec(model=model_path, dim=int(doc_emb.shape[1])),
                         rerank=RerankSpec(model=rerank, top_k=candidates) if rerank else None)
    run = Retriever(spec, doc_ids, doc_texts, doc_emb).search(query_texts, query_emb, k)
    return [ranked(run[str(i)], k) for i in range(len(query_texts))]


def run_rag(cfg, retrievers: dict[str, str], out_path: str | Path | None = None,
            command: str | None = None) -> dict[str, Any]:
    """Run the check for ``retrievers`` (name -> SentenceTransformer path; compared in order: first = A, second
    = B) on the split's seeded sample and write the JSON report; returns it."""
    from embtune.eval.run import eval_inputs

    rag = cfg.eval.rag
    started = time.time()
    # the commit and tree state the run starts from, the command, machine, load and versions: as a benchmark file
    provenance = Provenance.start(command or shlex.join([sys.executable.rsplit("/", 1)[-1], "-m",
                                                         "embtune.eval.rag", *sys.argv[1:]]))
    split = rag.split or cfg.eval.split
    inputs = eval_inputs(replace(cfg, eval=replace(cfg.eval, split=split)))
    corpus = load_corpus(inputs["corpus"], cfg.data.on_error)
    queries = load_queries(inputs["queries"], cfg.data.on_error)
    qrels = load_qrels(inputs["qrels"], corpus, queries, cfg.data.on_error)
    query_ids = sample_queries(qrels, rag.sample_size, cfg.seed)
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d], cfg.mining.include_title) for d in doc_ids]  # as eval read them
    text_of = dict(zip(doc_ids, doc_texts))
    query_texts = [queries[q] for q in query_ids]
    logger.info("RAG check on split '%s': %d sampled queries, k=%d, retrievers %s", split, len(query_ids), rag.k,
                ", ".join(retrievers))

    retrieved: dict[str, list[list[str]]] = {}
    for name, path in retrievers.items():
        retrieved[name] = retrieve(path, doc_ids, doc_texts, query_texts, rag.k, rag.rerank, rag.rerank_candidates,
                                   cfg.eval.batch_size)

    cache_path = Path(rag.cache_file or Path(cfg.run_dir) / "eval" / "rag_llm_cache.jsonl")
    llm_answer = replace(cfg.llm, temperature=rag.temperature, max_tokens=rag.answer_max_tokens)
    llm_judge = replace(cfg.llm, temperature=rag.temperature, max_tokens=rag.judge_max_tokens)
    answer_requests = [ChatRequest(id=f"{name}/{qid}", messages=answer_messages(
                           queries[qid], [text_of[d] for d in retrieved[name][i]], rag.max_passage_chars))
                       for name in retrievers for i, qid in enumerate(query_ids)]
    answers = generate_all(answer_requests, llm_answer, cache_path)

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in retrievers}
    judge_requests: list[ChatRequest] = []
    for request, result in zip(answer_requests, answers.results):
        name, qid = request.id.split("/", 1)
        ids = retrieved[name][query_ids.index(qid)]
        gold = {d for d, rel in qrels[qid].items() if rel > 0}
        # Ids only, no dataset text: reports get committed, and the dataset's text must not be copied into them.
        record: dict[str, Any] = {"query_id": qid, "retrieved": ids, "gold": sorted(gold),
                                  "gold_in_context": any(d in gold for d in ids), "answer": result.text,
                                  "answer_error": result.error}
        if result.text is not None:
            cited, invalid = parse_citations(result.text, len(ids))
            record.update(cited=[ids[n - 1] for n in cited], cited_numbers=cited, invalid_citations=invalid,
                          cites_gold=any(ids[n - 1] in gold for n in cited))
            judged = [(n, text_of[ids[n - 1]]) for n in cited] or list(enumerate((text_of[d] for d in ids), 1))
            judge_requests.append(ChatRequest(id=request.id, messages=judge_messages(result.text, judged,
                                                                                     rag.max_passage_chars)))
        records[name].append(record)
    judgements = generate_all(judge_requests, llm_judge, cache_path)
    by_id = {r.id: r for r in judgements.results}
    for name in retrievers:
        for record in records[name]:
            verdict = by_id.get(f"{name}/{record['query_id']}")
            score = parse_judge_score(verdict.text) if verdict is not None and verdict.text is not None else None
            record["judge_reply"] = verdict.text if verdict is not None else None
            record["judge_score"] = score
            record["faithfulness"] = (score - 1) / 4 if score is not None else None

    summary = {name: summarize(rows) for name, rows in records.items()}
    names = list(retrievers)
    comparison = {}
    if len(names) == 2:
        a, b = (records[n] for n in names)
        comparison = {"a": names[0], "b": names[1]}
        for outcome in ("cites_gold", "gold_in_context", "faithfulness"):
            pairs = [(x.get(outcome), y.get(outcome)) for x, y in zip(a, b)
                     if x.get(outcome) is not None and y.get(outcome) is not None]
            comparison[outcome] = paired_compare([float(x) for x, _ in pairs], [float(y) for _, y in pairs],
                                                 rag.resamples, cfg.seed, binary=outcome != "faithfulness")

    runs = [answers.stats, judgements.stats]
    report = {
        "benchmark": "rag_check",
        "date": time.strftime("%Y-%m-%d"),
        "split": split,
        "sample_size": len(query_ids),
        "seed": cfg.seed,
        "k": rag.k,
        "rerank": rag.rerank or None,
        "retrievers": retrievers,
        "llm": {"endpoint": cfg.llm.endpoint or "(OPENAI_BASE_URL / api.openai.com)",
                "model": cfg.llm.model or ("SmolLM2-135M-Instruct (embedded)" if cfg.llm.endpoint == "local" else ""),
                "temperature": rag.temperature, "answer_max_tokens": rag.answer_max_tokens,
                "judge_max_tokens": rag.judge_max_tokens, "cache_file": str(cache_path)},
        "results": summary,
        "comparison": comparison,
        "tokens": {
            # all answers used, cached ones included (what the run would cost from scratch) ...
            "prompt": sum(r.prompt_tokens for run in (answers, judgements) for r in run.results),
            "completion": sum(r.completion_tokens for run in (answers, judgements) for r in run.results),
            # ... and what this invocation actually requested
            "prompt_this_run": sum(s.prompt_tokens for s in runs),
            "completion_this_run": sum(s.completion_tokens for s in runs),
        },
        "llm_requests": {"answers": answers.stats.to_dict(), "judgements": judgements.stats.to_dict()},
        "wall_s": round(time.time() - started, 1),
        **provenance.record(),
        "per_query": records,
    }
    out = Path(out_path or Path(cfg.run_dir) / "eval" / "rag.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_summary(report)
    logger.info("wrote %s", out)
    return report


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    answered = [r for r in rows if r.get("answer") is not None]
    scores = [r["faithfulness"] for r in answered if r.get("faithfulness") is not None]

    def rate(key: str, among: list[dict[str, Any]]) -> float | None:
        return round(float(np.mean([bool(r.get(key)) for r in among])), 4) if among else None

    return {
        "queries": len(rows),
        "answered": len(answered),
        "answer_failed": len(rows) - len(answered),
        "gold_in_context_rate": rate("gold_in_context", rows),
        "citation_rate": round(float(np.mean([bool(r["cited_numbers"]) for r in answered])), 4) if answered else None,
        "cites_gold_rate": rate("cites_gold", answered),
        "cites_gold_given_gold_in_context": rate("cites_gold", [r for r in answered if r["gold_in_context"]]),
        "invalid_citations": sum(r.get("invalid_citations", 0) for r in answered),
        "faithfulness_mean": round(float(np.mean(scores)), 4) if scores else None,
        "judge_scored": len(scores),
        "judge_unparsed": len(answered) - len(scores),
    }


def print_summary(report: dict[str, Any]) -> None:
    print(f"RAG check, split '{report['split']}', {report['sample_size']} queries, k={report['k']}")
    print(f"{'retriever':<12}{'gold in ctx':>12}{'cited':>8}{'cites gold':>12}{'faithful':>10}{'unparsed':>10}")
    for name, s in report["results"].items():
        def pct(v):
            return f"{100 * v:.1f}" if v is not None else "-"
        print(f"{name:<12}{pct(s['gold_in_context_rate']):>12}{pct(s['citation_rate']):>8}"
              f"{pct(s['cites_gold_rate']):>12}{pct(s['faithfulness_mean']):>10}{s['judge_unparsed']:>10}")
    for outcome, test in report["comparison"].items():
        if isinstance(test, dict):
            print(f"  {outcome}: diff {test.get('diff')}, p={test.get('p_value')}"
                  + (f", McNemar p={test['mcnemar_exact_p']:.3g}" if "mcnemar_exact_p" in test else ""))


def main(argv: list[str] | None = None) -> int:
    """``python -m embtune.eval.rag CONFIG [key=value ...] [--base PATH] [--finetuned PATH] [--out FILE]``."""
    from embtune.cli import describe_class, describe_sections, exit_code, parse_config_args
    from embtune.config import InputError
    from embtune.eval.run import upstream
    from embtune.sections.eval import RAGConfig

    parser = argparse.ArgumentParser(
        prog="python -m embtune.eval.rag", description=__doc__.split("\n\n")[0],
        epilog="Config keys (override any with section.key=value):\n[eval.rag]\n"
        + "\n".join(describe_class(RAGConfig, "eval.rag")) + describe_sections(["llm"]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.rag.sample_size=30")
    parser.add_argument("--base", help="base model (default: train.base_model)")
    parser.add_argument("--finetuned", help="fine-tuned model folder (default: the train stage's model)")
    parser.add_argument("--out", help="report path (default: <run_dir>/eval/rag.json)")
    args, cfg = parse_config_args(parser, argv)
    if cfg is None:
        return 2
    def work():
        retrievers = {"base": resolve_model(args.base or cfg.train.base_model, must_exist=True)}
        finetuned = args.finetuned or upstream(cfg, "train").get("model")
        if finetuned:
            if not Path(finetuned).is_dir():
                raise InputError(f"--finetuned {finetuned}: no such model folder (give the train stage's "
                                 "<run_dir>/train/model, or leave --finetuned out)")
            retrievers["finetuned"] = finetuned
        else:
            logger.warning("no fine-tuned model (no train manifest in %s, no --finetuned): checking the base model "
                           "only", cfg.run_dir)
        command = shlex.join(["python", "-m", "embtune.eval.rag", *(argv if argv is not None else sys.argv[1:])])
        run_rag(cfg, retrievers, args.out, command=command)

    return exit_code(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
