"""Speed and exactness of embtune.retrieval.bm25.FastBM25 and of bm25s against rank_bm25.BM25Okapi; writes JSON.

bm25s (``method="robertson"``, k1 1.5, b 0.75, float64: the same Okapi formula) runs beside FastBM25 on every
comparison, on the same tokens: its build time, its query rate with its own top-k, and how often its top 10 equals
the reference's (in order, and as a set). Each comparison then says which is faster at equal rankings
(``faster_at_equal_rankings``): bm25s counts only where its top 10 equals rank-bm25's on every timed query, since a
faster different ranking is not a replacement. rank-bm25 raises a negative IDF (a term in more than half the
documents) to ``epsilon`` times the mean IDF, and bm25s has no such floor, so with stopwords kept the two rank
differently.

Full run (the one in benchmarks/results/bm25_speed.json; ~10 minutes on 2 cores):

    nice -n 10 python scripts/bench_bm25_speed.py

Smoke run (seconds):

    python scripts/bench_bm25_speed.py --real-docs 20000 --ref-queries 10 --mine-docs 20000 --mine-queries 200 \
        --out /tmp/bm25_smoke.json

Three corpora, all built from text that is on this machine (deterministic; nothing downloaded):

- ``scifact``: BEIR SciFact ``corpus.jsonl``, each document ``title + " " + text`` (5,183 documents).
- ``realtext``: ``--real-docs`` documents (100,000): the 5,183 SciFact documents, then SciFact abstracts cut into
  windows of 3 consecutive sentences (stride 3), then docstring paragraphs (blank-line separated, whitespace
  normalized, >= 5 words, no ``>>>`` doctest lines) of the Python standard library and of numpy, scipy, sklearn,
  sympy, pandas (in that order; files in sorted path order), exact duplicates dropped, cut at ``--real-docs``.
- ``mine``: ``--mine-docs`` documents (1,000,000) for the mining run, each 2–6 sentences drawn uniformly with
  replacement (numpy ``default_rng(--seed)``) from the pool of all sentences of the SciFact abstracts and of those
  docstring paragraphs: real sentences in synthetic combinations.

Queries: all 1,109 SciFact queries (``queries.jsonl``, the train and test splits). rank-bm25 is timed on the first
``--ref-queries`` of them (file order); the fast path runs on that same subset (agreement, score differences) and
on all queries (throughput). The mining run searches the SciFact queries followed by pool sentences drawn with the
same seed, ``--mine-queries`` in all, top ``--mine-k``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import resource
import sys
import sysconfig
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import bm25s
import numpy as np
import psutil
from rank_bm25 import BM25Okapi

# Run as a file from a checkout (embtune need not be installed): the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.manifest import Provenance
from embtune.retrieval.bm25 import BM25Tokenizer, FastBM25, rank_order

DOCSTRING_PACKAGES = ("numpy", "scipy", "sklearn", "sympy", "pandas")
TOKENIZERS = {
    "simple": BM25Tokenizer(),
    "english": BM25Tokenizer(token_pattern=r"\w+", stopwords="english", stemmer="english"),
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_scifact(folder: Path) -> tuple[list[str], list[str]]:
    """(documents as title + text, query texts) in file order."""
    with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
        docs = [f"{row['title']} {row['text']}" for row in map(json.loads, handle)]
    with open(folder / "queries.jsonl", encoding="utf-8") as handle:
        queries = [row["text"] for row in map(json.loads, handle)]
    return docs, queries


def docstring_paragraphs(root: Path, skipped: dict[str, int]) -> list[str]:
    """Prose paragraphs of every docstring under ``root`` (sorted file order); unparsable files are counted."""
    paragraphs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.relative_to(root).parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            skipped[str(root)] = skipped.get(str(root), 0) + 1
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if not docstring:
                    continue
                for paragraph in re.split(r"\n\s*\n", docstring):
                    words = paragraph.split()
                    if len(words) >= 5 and ">>>" not in paragraph:
                        paragraphs.append(" ".join(words))
    return paragraphs


def collect_real_text(scifact_docs: list[str]) -> dict:
    """The text sources in their fixed order, with counts for the result file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    skipped: dict[str, int] = {}
    sources = {"stdlib": docstring_paragraphs(stdlib, skipped)}
    for package in DOCSTRING_PACKAGES:
        sources[package] = docstring_paragraphs(purelib / package, skipped)
    abstract_sentences = [SENTENCE_END.split(doc) for doc in scifact_docs]
    windows = [" ".join(sentences[i:i + 3]) for sentences in abstract_sentences for i in range(0, len(sentences), 3)]
    return {"scifact_windows": windows, "docstrings": sources, "abstract_sentences": abstract_sentences,
            "unparsable_files": skipped}


def build_realtext(scifact_docs: list[str], text: dict, n_docs: int) -> tuple[list[str], dict]:
    seen: set[str] = set()
    docs: list[str] = []
    counts: dict[str, int] = {}

    def add(name: str, items: list[str]) -> None:
        for item in items:
            if len(docs) == n_docs:
                break
            if item not in seen:
                seen.add(item)
                docs.append(item)
                counts[name] = counts.get(name, 0) + 1

    add("scifact_documents", scifact_docs)
    add("scifact_3_sentence_windows", text["scifact_windows"])
    for name, paragraphs in text["docstrings"].items():
        add(f"docstrings_{name}", paragraphs)
    if len(docs) < n_docs:
        raise SystemExit(f"--real-docs {n_docs}: only {len(docs)} distinct documents available from the sources")
    digest = hashlib.sha256("\n".join(docs).encode()).hexdigest()[:16]
    return docs, {"n_docs": len(docs), "documents_per_source": counts, "sha256_16": digest}


def sentence_pool(text: dict) -> list[str]:
    pool = [s for sentences in text["abstract_sentences"] for s in sentences]
    for paragraphs in text["docstrings"].values():
        pool.extend(s for paragraph in paragraphs for s in SENTENCE_END.split(paragraph))
    return sorted(set(s for s in pool if len(s.split()) >= 3))  # sorted: independent of set order


class PeakRSS:
    """Samples this process's resident memory every 50 ms (ru_maxrss is a lifetime peak, not a section's)."""

    def __enter__(self) -> "PeakRSS":
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def compare(corpus: str, docs: list[str], queries: list[str], tokenizer_name: str, n_ref: int,
            batch_size: int) -> dict:
    """rank-bm25 vs FastBM25 on one corpus and tokenizer."""
    tokenizer = TOKENIZERS[tokenizer_name]
    started = time.perf_counter()
    doc_tokens = [tokenizer(doc) for doc in docs]
    query_tokens = [tokenizer(query) for query in queries]
    tokenize_s = time.perf_counter() - started

    started = time.perf_counter()
    reference = BM25Okapi(doc_tokens)
    ref_build_s = time.perf_counter() - started
    started = time.perf_counter()
    fast = FastBM25(doc_tokens)
    fast_build_s = time.perf_counter() - started

    subset = query_tokens[:n_ref]
    all_docs = np.arange(len(docs))
    ref_top = np.empty((len(subset), 10), dtype=np.int64)
    ref_top_scores = np.empty((len(subset), 10))
    ref_seconds = 0.0
    max_diff_all_docs = 0.0
    for row, query in enumerate(subset):
        started = time.perf_counter()
        ref_scores = reference.get_scores(query)
        ref_top[row] = rank_order(ref_scores, all_docs, 10)
        ref_seconds += time.perf_counter() - started
        ref_top_scores[row] = ref_scores[ref_top[row]]
        max_diff_all_docs = max(max_diff_all_docs, float(np.abs(fast.get_scores(query) - ref_scores).max()))

    started = time.perf_counter()
    fast_top_scores, fast_top = fast.search(subset, k=10, batch_size=batch_size)
    fast_subset_s = time.perf_counter() - started
    started = time.perf_counter()
    fast.search(query_tokens, k=10, batch_size=batch_size)
    fast_all_k10_s = time.perf_counter() - started
    started = time.perf_counter()
    fast.search(query_tokens, k=100, batch_size=batch_size)
    fast_all_k100_s = time.perf_counter() - started

    started = time.perf_counter()
    other = bm25s.BM25(method="robertson", k1=1.5, b=0.75, dtype="float64")
    other.index(doc_tokens, show_progress=False)
    bm25s_build_s = time.perf_counter() - started
    other_subset_top, _ = other.retrieve(subset, k=10, show_progress=False)
    started = time.perf_counter()
    other.retrieve(query_tokens, k=10, show_progress=False)
    bm25s_all_k10_s = time.perf_counter() - started

    rank_bm25_qps = len(subset) / ref_seconds
    fast_qps = len(query_tokens) / fast_all_k10_s
    bm25s_qps = len(query_tokens) / bm25s_all_k10_s
    bm25s_agreement = float(np.mean(np.all(other_subset_top == ref_top, axis=1)))
    if bm25s_agreement == 1.0 and bm25s_qps > fast_qps:
        faster = "bm25s"
    else:
        faster = "FastBM25"
    result = {
        "corpus": corpus,
        "tokenizer": tokenizer_name,
        "n_docs": len(docs),
        "vocab_size": len(fast.vocab),
        "index_nnz": int(fast.weights.nnz),
        "n_queries_all": len(query_tokens),
        "n_queries_rank_bm25": len(subset),
        "rank_bm25_query_subset": f"first {len(subset)} queries of queries.jsonl (file order)",
        "tokenize_s": round(tokenize_s, 3),
        "rank_bm25_build_s": round(ref_build_s, 3),
        "fast_build_s": round(fast_build_s, 3),
        "rank_bm25_qps": round(rank_bm25_qps, 2),
        "fast_qps": round(fast_qps, 1),
        "fast_qps_k100": round(len(query_tokens) / fast_all_k100_s, 1),
        "fast_qps_same_subset": round(len(subset) / fast_subset_s, 1),
        "ratio": round(fast_qps / rank_bm25_qps, 1),
        "ratio_same_subset": round(len(subset) / fast_subset_s / rank_bm25_qps, 1),
        "top10_agreement": float(np.mean(np.all(fast_top == ref_top, axis=1))),
        "max_abs_score_diff_top10": float(np.abs(fast_top_scores - ref_top_scores).max()),
        "max_abs_score_diff_all_docs": max_diff_all_docs,
        "bm25s_build_s": round(bm25s_build_s, 3),
        "bm25s_qps": round(bm25s_qps, 1),
        "bm25s_top10_agreement": bm25s_agreement,
        "bm25s_top10_set_agreement": float(np.mean([set(a) == set(b) for a, b in zip(other_subset_top, ref_top)])),
        "bm25s_vs_fast_qps": round(bm25s_qps / fast_qps, 2),
        "faster_at_equal_rankings": faster,
    }
    log(json.dumps(result))
    return result


def mine(pool: list[str], scifact_queries: list[str], n_docs: int, n_queries: int, k: int, seed: int,
         tokenizer_name: str, batch_size: int) -> dict:
    """FastBM25 alone on a large corpus of real sentences in seeded combinations: build and top-k search."""
    rng = np.random.default_rng(seed)
    sentences_per_doc = rng.integers(2, 7, size=n_docs)  # 2..6
    offsets = np.concatenate([[0], np.cumsum(sentences_per_doc)])
    sentence_ids = rng.integers(0, len(pool), size=int(offsets[-1]))
    extra_queries = rng.integers(0, len(pool), size=max(0, n_queries - len(scifact_queries)))
    queries = (scifact_queries + [pool[i] for i in extra_queries])[:n_queries]
    tokenizer = TOKENIZERS[tokenizer_name]

    def documents():
        for doc in range(n_docs):
            yield " ".join(pool[i] for i in sentence_ids[offsets[doc]:offsets[doc + 1]])

    with PeakRSS() as memory:
        started = time.perf_counter()
        # Tokenizing is streamed into the index: the token lists of 1M documents are never all in memory.
        index = FastBM25(tokenizer.tokenize_many(documents()))
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        query_tokens = [tokenizer(query) for query in queries]
        scores, indices = index.search(query_tokens, k=k, batch_size=batch_size)
        search_s = time.perf_counter() - started
    result = {
        "corpus": f"{n_docs} documents of 2-6 pool sentences (seed {seed}); pool of {len(pool)} distinct sentences",
        "tokenizer": tokenizer_name,
        "n_docs": n_docs,
        "n_tokens": int(index.doc_len.sum()),
        "vocab_size": len(index.vocab),
        "index_nnz": int(index.weights.nnz),
        "n_queries": len(queries),
        "queries": f"{min(n_queries, len(scifact_queries))} SciFact queries + {len(extra_queries)} pool sentences",
        "k": k,
        "batch_size": batch_size,
        "build_s_including_tokenize": round(build_s, 1),
        "search_s": round(search_s, 1),
        "search_qps": round(len(queries) / search_s, 1),
        "total_s": round(build_s + search_s, 1),
        "rss_before_gb": round(memory.start / 2**30, 2),
        "peak_rss_gb": round(memory.peak / 2**30, 2),
        "peak_rss_increase_gb": round((memory.peak - memory.start) / 2**30, 2),
        "index_matrix_gb": round((index.weights.data.nbytes + index.weights.indices.nbytes
                                  + index.weights.indptr.nbytes) / 2**30, 2),
        "queries_with_k_positive_scores": int(np.sum(scores[:, -1] > 0)),
        "result_checksum": hashlib.sha256(indices.tobytes()).hexdigest()[:16],
    }
    log(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scifact", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beir" / "scifact",
                        help="BEIR SciFact folder (corpus.jsonl, queries.jsonl)")
    parser.add_argument("--real-docs", type=int, default=100_000, help="size of the realtext corpus")
    parser.add_argument("--ref-queries", type=int, default=100, help="queries rank-bm25 is timed on")
    parser.add_argument("--tokenizers", default="simple,english",
                        help=f"comma-separated, for the rank-bm25 comparisons; of {sorted(TOKENIZERS)}")
    parser.add_argument("--mine-docs", type=int, default=1_000_000, help="size of the mining corpus (0 = skip)")
    parser.add_argument("--mine-queries", type=int, default=10_000)
    parser.add_argument("--mine-k", type=int, default=100)
    parser.add_argument("--mine-tokenizer", default="english", choices=sorted(TOKENIZERS))
    parser.add_argument("--batch-size", type=int, default=256, help="FastBM25.search batch_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bm25_speed.json"))
    args = parser.parse_args(argv)
    for name in args.tokenizers.split(","):
        if name not in TOKENIZERS:
            parser.error(f"--tokenizers: unknown tokenizer {name!r}; expected some of {sorted(TOKENIZERS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    provenance = Provenance.start()
    started = time.perf_counter()
    scifact_docs, scifact_queries = read_scifact(args.scifact)
    log("collecting docstrings")
    text = collect_real_text(scifact_docs)
    realtext_docs, realtext_info = build_realtext(scifact_docs, text, args.real_docs)
    realtext_info["unparsable_python_files_skipped"] = text["unparsable_files"]

    comparisons = []
    for tokenizer_name in args.tokenizers.split(","):
        for corpus, docs in (("scifact", scifact_docs), ("realtext", realtext_docs)):
            log(f"comparing on {corpus} ({len(docs)} docs), tokenizer {tokenizer_name}")
            comparisons.append(compare(corpus, docs, scifact_queries, tokenizer_name, args.ref_queries,
                                       args.batch_size))
    del realtext_docs

    mining = None
    if args.mine_docs:
        pool = sentence_pool(text)
        del text
        log(f"mining: {args.mine_docs} docs from {len(pool)} sentences")
        mining = mine(pool, scifact_queries, args.mine_docs, args.mine_queries, args.mine_k, args.seed,
                      args.mine_tokenizer, args.batch_size)
        mining["sentence_pool_sha256_16"] = hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]

    largest = max(c["n_docs"] for c in comparisons)
    result = {
        "benchmark": "bm25_speed",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "niceness": os.nice(0),
        **provenance.record(packages=("scipy", "PyStemmer", "psutil", "bm25s",
                                      *("scikit-learn" if name == "sklearn" else name for name in DOCSTRING_PACKAGES))),
        "bm25_params": {"k1": 1.5, "b": 0.75, "epsilon": 0.25},
        "tie_break": "score descending (rounded to 9 decimals), then document index ascending",
        "tokenizers": {name: TOKENIZERS[name].describe() for name in TOKENIZERS},
        "corpora": {
            "scifact": {"n_docs": len(scifact_docs), "document": "title + ' ' + text"},
            "realtext": realtext_info,
        },
        "queries": f"{len(scifact_queries)} SciFact queries (queries.jsonl: train + test)",
        "comparisons": comparisons,
        "mining": mining,
        "bars": {
            "ratio_at_largest_corpus": min(c["ratio"] for c in comparisons if c["n_docs"] == largest),
            "ratio_ge_100_with_identical_top10": all(
                c["ratio"] >= 100 and c["top10_agreement"] == 1.0 for c in comparisons
                if c["n_docs"] == largest),
            "mining_total_le_600s": None if mining is None else mining["total_s"] <= 600,
        },
        # Where bm25s ranks as rank-bm25 does and answers faster, it should replace FastBM25 there.
        "faster_at_equal_rankings": {f"{c['corpus']}/{c['tokenizer']}": c["faster_at_equal_rankings"]
                                     for c in comparisons},
        "ru_maxrss_gb_whole_run": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "wall_s_whole_run": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)  # the previous run kept under other_runs
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
