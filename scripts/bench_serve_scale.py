"""`python -m embtune.serve up` on a bundle of 10M synthetic vectors: start-up, RSS, /search latency, recall@10.

    python scripts/bench_serve_scale.py                                  # 10M -> benchmarks/results/serve_scale.json
    python scripts/bench_serve_scale.py --vectors 200000 --out /tmp/s.json --work /tmp/ss_small   # a quick look

What is measured is the serving plumbing (the memory-mapped index, the on-disk documents, start-up, RSS) and the
recall of the approximate index, not retrieval quality: the passages are synthetic and their vectors are drawn,
not encoded (encoding 10M passages on this machine's 2 cores would take days).

The vectors: a seeded two-level mixture in MiniLM's own space, so that /search's queries (encoded by the bundle's
model, as the server encodes any query) land among the documents as real queries do. ``--topics`` short texts of
words from the model's vocabulary are encoded (the topic centres); each topic has ``--subtopics`` centres drawn
around it, and each document is a subtopic centre plus isotropic noise, L2-normalized. A query is a topic's text
with two more words. Cluster structure matters for an IVF index (isotropic noise is its worst case); the result
file records each level's spread and the query's cosine to its 1st and 10th exact neighbour, to compare with real
corpora's.

Exact top-10 (the reference for recall@10) is computed while the vectors are generated: each shard's inner products
with the 100 query embeddings, merged across shards, over the same vectors the index stores.

Steps: build the bundle (``build_bundle`` with ``embeddings=`` the generated shards, ``index=ivf_pq``; skipped with
``--reuse`` when the bundle and its reference exist), start ``python -m embtune.serve up`` as a subprocess, time
until /health answers, read the server's RSS from /proc, send the queries one at a time (one warm-up pass, then the
measured pass), score recall of the served top-10 against the exact top-10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import bench_command  # noqa: E402

from embtune.manifest import Provenance  # noqa: E402
from embtune.models import resolve_model  # noqa: E402

DIM = 384


def vocabulary_words(model_dir: str, rng: np.random.Generator, n: int = 6000) -> list[str]:
    """Whole, alphabetic words of the model's WordPiece vocabulary (no subword pieces, no short ones)."""
    words = [w.strip() for w in open(Path(model_dir) / "vocab.txt")]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) >= 4]
    return list(rng.choice(words, size=min(n, len(words)), replace=False))


class Mixture:
    """The seeded two-level mixture (see the module docstring) and shards drawn from it."""

    def __init__(self, topic_emb: np.ndarray, subtopics: int, sub_spread: float, noise: float, seed: int) -> None:
        self.topics = topic_emb  # (topics, dim), unit norm
        rng = np.random.default_rng(seed)
        n_topics = len(topic_emb)
        centres = np.repeat(topic_emb, subtopics, axis=0)  # (topics * subtopics, dim)
        centres += sub_spread * rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(DIM)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.noise, self.seed, self.n_topics = noise, seed, n_topics

    def draw(self, rows: int, seed: int) -> np.ndarray:
        """(rows, dim) float32 unit vectors."""
        rng = np.random.default_rng(seed)
        which = rng.integers(0, len(self.centres), rows)
        out = rng.standard_normal((rows, DIM), dtype=np.float32)
        out *= self.noise / np.sqrt(DIM)
        out += self.centres[which]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


class GeneratedShards:
    """``ShardSet``-like: ``num_rows`` vectors in shards of ``shard_rows``, each drawn with its own seed; iterating
    also keeps the exact top-``k`` of ``queries`` over every shard seen (the recall reference)."""

    def __init__(self, mixture: Mixture, num_rows: int, shard_rows: int, queries: np.ndarray, k: int = 10) -> None:
        self.mixture, self.num_rows, self.shard_rows, self.dim = mixture, num_rows, shard_rows, DIM
        self.queries, self.k = queries, k
        self.top_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.top_rows = np.full((len(queries), k), -1, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.dim

    def __iter__(self):
        for start in range(0, self.num_rows, self.shard_rows):
            rows = min(self.shard_rows, self.num_rows - start)
            vectors = self.mixture.draw(rows, seed=self.mixture.seed + 1 + start // self.shard_rows)
            scores = self.queries @ vectors.T  # (n_queries, rows)
            scores = np.concatenate([self.top_scores, scores], axis=1)
            rows_all = np.concatenate([self.top_rows, np.broadcast_to(np.arange(start, start + rows),
                                                                      (len(self.queries), rows))], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
            self.top_scores = np.take_along_axis(scores, order, axis=1)
            self.top_rows = np.take_along_axis(rows_all, order, axis=1)
            print(f"  shard {start // self.shard_rows + 1}/{-(-self.num_rows // self.shard_rows)}", flush=True)
            yield start, [], vectors


def documents(num_rows: int, topics: list[str], mixture_seed: int):
    """Synthetic passages, one per vector row: ``doc-<row>`` and a short text (what /search returns)."""
    for row in range(num_rows):
        yield {"_id": f"doc-{row}", "text": f"synthetic passage {row} of the serve scale benchmark"}


def rss_gb(pid: int, field: str = "VmRSS") -> float:
    """A /proc memory figure in GB: VmRSS (all resident pages, the mapped index file pages its searches touched
    included), RssAnon (the process's own memory) or RssFile (resident pages of mapped files)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def build(args, work: Path) -> dict:
    from embtune.retrieval.encoder import encode
    from embtune.serve.bundle import _load_model, build_bundle

    model_dir = resolve_model("minilm", must_exist=True)
    rng = np.random.default_rng(args.seed)
    words = vocabulary_words(model_dir, rng)
    topic_texts = [" ".join(rng.choice(words, size=6, replace=False)) for _ in range(args.topics)]
    query_topics = rng.choice(args.topics, size=args.queries, replace=False)
    query_texts = [f"{topic_texts[t]} {' '.join(rng.choice(words, size=2))}" for t in query_topics]
    model = _load_model(Path(model_dir), "torch")
    started = time.perf_counter()
    topic_emb = encode(model, topic_texts, 64, role="document")  # (topics, dim)
    # The server's query route (Bundle.encode): the reference searches with the vector /search will search with.
    query_emb = encode(model, query_texts, 64, role="query")  # (queries, dim)
    encode_s = time.perf_counter() - started
    mixture = Mixture(np.asarray(topic_emb, np.float32), args.subtopics, args.sub_spread, args.noise, args.seed)
    shards = GeneratedShards(mixture, args.vectors, args.shard_rows, np.asarray(query_emb, np.float32))
    bundle = work / "bundle"
    started = time.perf_counter()
    build_bundle(model_dir, documents(args.vectors, topic_texts, args.seed), bundle, index="ivf_pq",
                 index_factory=args.factory, nprobe=args.nprobe, k_factor=args.k_factor,
                 embeddings=shards, train_sample=mixture.draw(args.train_rows, seed=args.seed + 10 ** 6))
    build_s = time.perf_counter() - started
    reference = {"query_texts": query_texts, "exact_top10": shards.top_rows.tolist(),
                 "exact_scores": shards.top_scores.tolist(), "encode_topics_and_queries_s": round(encode_s, 1),
                 "build_bundle_s": round(build_s, 1),
                 "cosine_to_neighbour": {"1st": float(shards.top_scores[:, 0].mean()),
                                         "10th": float(shards.top_scores[:, 9].mean())}}
    (work / "reference.json").write_text(json.dumps(reference))
    return reference


def wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before /health answered")
        try:
            response = httpx.get(url + "/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"/health did not answer within {timeout_s} s")


def serve_and_measure(args, work: Path, reference: dict) -> dict:
    import httpx

    bundle = work / "bundle"
    url = f"http://127.0.0.1:{args.port}"
    log = open(work / "server.log", "w")
    # A cold start: the index file's pages are dropped from the page cache (this file only, our own), as on a
    # server that has not just written the bundle. Otherwise every page fault also maps the neighbouring pages the
    # cache holds (the kernel's fault-around), and the server's RSS counts most of the file after 100 queries.
    fd = os.open(bundle / "index" / "corpus.faiss", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "embtune.serve", "up", "--bundle", str(bundle),
                             f"serve.port={args.port}", "serve.threads=1", "serve.cache_size=0"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        health = wait_for_health(url, proc, timeout_s=600)
        startup_s = time.perf_counter() - started
        rss_start = rss_gb(proc.pid)
        queries = reference["query_texts"]
        latencies, served = [], []
        with httpx.Client(base_url=url, timeout=60) as client:
            for query in queries:  # warm-up: the first touch of each query's lists reads them from disk
                client.post("/search", json={"query": query, "k": 10}).raise_for_status()
            for query in queries:
                t = time.perf_counter()
                response = client.post("/search", json={"query": query, "k": 10})
                latencies.append((time.perf_counter() - t) * 1000)
                response.raise_for_status()
                served.append([int(hit["id"].removeprefix("doc-")) for hit in response.json()["hits"]])
            health_after = client.get("/health").json()
        rss_end = rss_gb(proc.pid)
        rss_split = {"rss_anon_gb": round(rss_gb(proc.pid, "RssAnon"), 3),
                     "rss_file_gb": round(rss_gb(proc.pid, "RssFile"), 3)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    exact = reference["exact_top10"]
    recall = float(np.mean([len(set(s) & set(e)) / 10 for s, e in zip(served, exact)]))
    return {"startup_s": round(startup_s, 2), "rss_gb": round(max(rss_start, rss_end), 3),
            "rss_gb_at_start": round(rss_start, 3), "rss_gb_after_queries": round(rss_end, 3),
            "rss_after_queries": rss_split,
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "recall@10": round(recall, 4), "server_reported": {k: health_after.get(k) for k in ("startup", "index")},
            "health_at_start": {k: health.get(k) for k in ("startup", "index", "index_size")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=10_000_000)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--topics", type=int, default=2048)
    parser.add_argument("--subtopics", type=int, default=32)
    parser.add_argument("--sub-spread", type=float, default=0.8, help="subtopic centres' noise norm around a topic")
    parser.add_argument("--noise", type=float, default=0.5, help="a document's noise norm around its subtopic")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--factory", default="IVF256,PQ48,Refine(SQ8)")
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--k-factor", type=float, default=32.0)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--work", default="/tmp/embtune_serve_scale", help="scratch folder for the bundle")
    parser.add_argument("--reuse", action="store_true", help="serve the bundle already in --work")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_scale.json"))
    args = parser.parse_args(argv)
    provenance = Provenance.start()
    work = Path(args.work)
    if not args.reuse:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        reference = build(args, work)
    else:  # the search settings are retuned in the manifest; the index is not rebuilt
        from embtune.serve.bundle import retune_bundle

        reference = json.loads((work / "reference.json").read_text())
        retune_bundle(work / "bundle", nprobe=args.nprobe, k_factor=args.k_factor)
    measured = serve_and_measure(args, work, reference)
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    bundle_bytes = {p.name: p.stat().st_size for p in (work / "bundle" / "index").iterdir() if p.is_file()}
    out = {"benchmark": "serve_scale", "command": bench_command(sys.argv), "vectors": manifest["num_docs"],
           "index": manifest["index"], **measured,
           "targets": {"startup_s": 60, "rss_gb": 4, "p50_ms": 50, "recall@10": 0.9},
           "bundle_bytes": bundle_bytes,
           "build": {k: reference[k] for k in ("encode_topics_and_queries_s", "build_bundle_s")},
           "data": {"what": "synthetic: vectors drawn from a seeded two-level mixture around MiniLM embeddings of "
                            "vocabulary-word topics (see the script's docstring); measures the plumbing (start-up, "
                            "RSS, latency) and the index's recall, not retrieval quality",
                    "topics": args.topics, "subtopics": args.subtopics, "sub_spread": args.sub_spread,
                    "noise": args.noise, "queries": args.queries, "seed": args.seed,
                    "query_cosine_to_exact_neighbour": reference["cosine_to_neighbour"]},
           "settings": {"serve": {"threads": 1, "cache_size": 0}, "in_flight": 1, "warmup_pass": True},
           "note": args.note}
    out.update(provenance.record())
    from benchlib import write_result  # noqa: E402

    write_result(args.out, out)
    print(json.dumps({k: out[k] for k in ("vectors", "startup_s", "rss_gb", "p50_ms", "p99_ms", "recall@10")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
