"""Encode a corpus on Ray Data into Parquet shards of fixed row ranges; a rerun encodes only the missing shards.

    ds = ray.data.from_items(<one item per missing shard>)
    ds.map_batches(ShardEncoder, concurrency=workers, num_cpus=threads_per_worker, num_gpus=gpus_per_worker)

Ray's own text-embedding pattern (``read_json`` -> ``map_batches`` -> ``write_parquet``) streams blocks whose
boundaries Ray picks, so after a crash nothing tells which rows are done. Here the unit is a shard: rows
``[start, start + shard_rows)`` of the corpus, planned by the driver without reading the texts (line offsets of a
JSONL file, row counts of Parquet files), read by the actor that encodes it, and written to a temporary file that
is renamed into place once complete. A shard's file present means done; an actor that dies mid-shard is restarted
by Ray Data and the shard is encoded again from the start, and a driver that dies leaves only whole files behind.

Shard files live under the embedding cache, ``<cache>/<key>[_<backend tag>]_<corpus hash>.shards<shard_rows>/``:
the same key and backend tag as :func:`embtune.retrieval.encoder.encode`'s ``.npy`` file, the corpus hash being that
function's text hash for texts in memory and the file's content hash for a corpus file. Each file is
``<start, 12 digits>.parquet`` with columns ``row`` (int64, the corpus row), ``doc_id`` (string) and ``vector``
(fixed-size list of float32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from embtune.compute import ComputeConfig, active
from embtune.retrieval.encoder import LOADED_AS, cache_dir, encode_batch

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".parquet"
MANIFEST = "shards.json"
# Tests only: a directory where a file ``kill-<start>`` makes the actor that encodes that shard kill itself
# (SIGKILL, once) after encoding it and before writing it, and a file ``slow`` makes every shard take 0.2 s longer.
FAULT_DIR_ENV = "EMBTUNE_FAULT_DIR"


def connect(compute: ComputeConfig) -> None:
    """Join the cluster ``compute.address`` names, or start one in this process; no-op when Ray is up already."""
    import ray

    if ray.is_initialized():
        return
    if compute.address:
        logger.info("joining the Ray cluster at %s", compute.address)
        ray.init(address=compute.address, log_to_driver=False)
    else:
        start_local()


def start_local(num_cpus: int | None = None, object_store_mb: int = 0, env_vars: dict[str, str] | None = None) -> None:
    """Start a Ray cluster inside this process whose workers import this copy of embtune (not another install)."""
    import ray

    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 1024 * 1024 or None, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path, **(env_vars or {})}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts shards


@dataclass
class ShardSet:
    """A corpus's embeddings as Parquet shards (see the module docstring); the driver holds only this index."""

    directory: Path
    starts: list[int]  # first row of each shard, ascending
    rows: list[int]  # rows per shard
    dim: int
    encoded: list[int] = field(default_factory=list)  # starts of the shards this run encoded (the rest were cached)
    # Corpus row -> a vector that replaces the stored one (the probe's passages with their query cut out): a few
    # rows, kept by the driver and applied wherever a shard is read.
    overrides: dict[int, np.ndarray] = field(default_factory=dict)
    # The engine that searches these shards (the one that encoded them); None: the process's (``compute.active``).
    compute: ComputeConfig | None = None

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim), as the matrix's: callers that only read the dimension need not know which they hold."""
        return self.num_rows, self.dim

    def with_rows(self, rows: Sequence[int], vectors: np.ndarray) -> "ShardSet":
        """A view of these shards with some rows' vectors replaced (the files are not touched)."""
        view = ShardSet(self.directory, self.starts, self.rows, self.dim, list(self.encoded), dict(self.overrides),
                        self.compute)
        view.overrides.update({int(row): np.asarray(vector, dtype=np.float32) for row, vector in zip(rows, vectors)})
        return view

    def dense_index(self, dim: int, precision: str):
        """The core ``Retriever``'s dense member over these shards, searched shard by shard on the engine
        (:class:`embtune.compute.search.ShardedDenseIndex`)."""
        from embtune.compute.search import ShardedDenseIndex  # search imports this module

        return ShardedDenseIndex(self, dim, precision, self.compute or active())

    def shard_overrides(self, start: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows within the shard, vectors) of the overrides that fall in the shard beginning at ``start``; None
        when none does."""
        if not self.overrides:
            return None
        end = start + self.rows[self.starts.index(start)]
        mine = sorted(row for row in self.overrides if start <= row < end)
        if not mine:
            return None
        return np.asarray(mine, dtype=np.int64) - start, np.stack([self.overrides[row] for row in mine])

    def path(self, start: int) -> Path:
        return self.directory / f"{start:012d}{SHARD_SUFFIX}"

    def read(self, start: int) -> tuple[list[str], np.ndarray]:
        """(doc ids, vectors (rows, dim) float32) of the shard that begins at ``start``, overrides applied."""
        ids, vectors = read_shard_file(self.path(start))
        return ids, apply_overrides(vectors, self.shard_overrides(start))

    def __iter__(self) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(start, doc ids, vectors) of each shard, in row order."""
        for start in self.starts:
            yield (start, *self.read(start))

    def matrix(self) -> np.ndarray:
        """All vectors (n, dim) float32, in row order: what ``encode`` returns (the driver then holds them all)."""
        return np.concatenate([vectors for _, _, vectors in self]) if self.starts else np.zeros((0, self.dim),
                                                                                                 np.float32)

    def ids(self, rows: np.ndarray) -> list[str]:
        """The doc ids of some corpus rows, in the order given; reads only the ``doc_id`` column of their shards."""
        import pyarrow.parquet as pq

        rows = np.asarray(rows, dtype=np.int64)
        out = [""] * len(rows)
        bounds = np.asarray(self.starts, dtype=np.int64)
        shard_of = np.searchsorted(bounds, rows, side="right") - 1
        for shard in np.unique(shard_of):
            ids = pq.read_table(self.path(int(bounds[shard])), columns=["doc_id"]).column("doc_id").to_pylist()
            for position in np.flatnonzero(shard_of == shard):
                out[position] = ids[int(rows[position] - bounds[shard])]
        return out

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of some corpus rows (n, dim), in the order given; reads only the shards that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        bounds = np.asarray(self.starts, dtype=np.int64)
        shard_of = np.searchsorted(bounds, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mine = shard_of == shard
            _, vectors = self.read(int(bounds[shard]))
            out[mine] = vectors[rows[mine] - bounds[shard]]
        return out


def apply_overrides(vectors: np.ndarray, overrides: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if overrides is None:
        return vectors
    vectors = vectors.copy()
    vectors[overrides[0]] = overrides[1]
    return vectors


def read_shard_file(path: Path) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks()
    dim = vectors.type.list_size
    return table.column("doc_id").to_pylist(), vectors.flatten().to_numpy().reshape(-1, dim)


def write_shard_file(path: Path, start: int, doc_ids: Sequence[str], vectors: np.ndarray) -> None:
    """Write to a temporary name, then rename: a file at ``path`` is always a whole shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (rows, dim)
    table = pa.table({
        "row": pa.array(np.arange(start, start + len(vectors), dtype=np.int64)),
        "doc_id": pa.array(list(doc_ids), type=pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
    })
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# --- where a shard's texts come from ------------------------------------------------------------------------------

def plan_texts(texts: Sequence[str], shard_rows: int, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Shards of texts held by the driver (``encode`` of a list): each item carries its texts."""
    return [{"start": start, "rows": min(shard_rows, len(texts) - start),
             "source": json.dumps({"kind": "texts", "texts": list(texts[start:start + shard_rows]),
                                   "ids": None if ids is None else list(ids[start:start + shard_rows])})}
            for start in range(0, len(texts), shard_rows)]


def plan_jsonl(path: str | Path, shard_rows: int) -> tuple[list[dict[str, Any]], str]:
    """Shards of a BEIR ``corpus.jsonl`` by byte range, and the file's content hash, in one streaming pass.

    Blank lines are skipped (as ``embtune.dataio.load_corpus`` does); a row is a non-blank line.
    """
    path = Path(path)
    digest = hashlib.sha256()
    items, offset, start, rows, shard_offset = [], 0, 0, 0, 0
    with open(path, "rb") as handle:
        for line in handle:
            digest.update(line)
            if line.strip():
                if rows == shard_rows:
                    items.append(_jsonl_item(path, start, rows, shard_offset, offset))
                    start, rows, shard_offset = start + rows, 0, offset
                rows += 1
            offset += len(line)
    if rows:
        items.append(_jsonl_item(path, start, rows, shard_offset, offset))
    return items, digest.hexdigest()[:16]


def _jsonl_item(path: Path, start: int, rows: int, begin: int, end: int) -> dict[str, Any]:
    return {"start": start, "rows": rows,
            "source": json.dumps({"kind": "jsonl", "path": str(path.resolve()), "offset": begin,
                                  "length": end - begin})}


def plan_parquet(files: Sequence[str | Path], shard_rows: int, id_column: str = "_id",
                 text_columns: Sequence[str] = ("title", "text")) -> tuple[list[dict[str, Any]], str]:
    """Shards of Parquet files (row counts from their footers; a shard never spans two files), and a hash of the
    files' contents."""
    import pyarrow.parquet as pq

    from embtune.manifest import hash_path

    items, start = [], 0
    digest = hashlib.sha256()
    for file in map(Path, files):
        digest.update(hash_path(file).encode())
        total = pq.ParquetFile(file).metadata.num_rows
        for offset in range(0, total, shard_rows):
            rows = min(shard_rows, total - offset)
            items.append({"start": start, "rows": rows, "source": json.dumps(
                {"kind": "parquet", "path": str(file.resolve()), "offset": offset, "length": rows,
                 "id_column": id_column, "text_columns": list(text_columns)})})
            start += rows
    return items, digest.hexdigest()[:16]


def plan_corpus(corpus: str | Path | Sequence[str | Path], shard_rows: int) -> tuple[list[dict[str, Any]], str]:
    """Shards of a corpus file the driver does not read: a BEIR ``corpus.jsonl`` (:func:`plan_jsonl`) or Parquet
    file(s) with ``_id``, ``title`` and ``text`` columns (:func:`plan_parquet`); and the corpus's content hash."""
    files = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    if len(files) == 1 and str(files[0]).endswith(".jsonl"):
        return plan_jsonl(files[0], shard_rows)
    return plan_parquet(files, shard_rows)


def read_rows(items: list[dict[str, Any]], rows: Sequence[int]) -> tuple[list[str], list[str]]:
    """(doc ids, texts) of some corpus rows, in the order given, read from the shards that hold them (a shard's
    byte range or Parquet slice): what a stage needs of the texts (a mined negative's, a hit's) without the
    corpus in memory."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray([item["start"] for item in items], dtype=np.int64)
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    ids: list[str] = [""] * len(rows)
    texts: list[str] = [""] * len(rows)
    for shard in np.unique(shard_of):
        item = items[int(shard)]
        shard_ids, shard_texts = read_source(json.loads(item["source"]), item["start"])
        for position in np.flatnonzero(shard_of == shard):
            local = int(rows[position] - item["start"])
            ids[position], texts[position] = shard_ids[local], shard_texts[local]
    return ids, texts


def read_source(source: dict[str, Any], start: int) -> tuple[list[str], list[str]]:
    """(doc ids, texts) of one shard; texts as ``embtune.dataio.document_text`` builds them (title + " " + text, or
    the text alone for a source with ``"include_title": false``)."""
    from embtune.dataio import document_text

    kind = source["kind"]
    if kind == "texts":
        texts = source["texts"]
        ids = source["ids"] or [str(start + i) for i in range(len(texts))]
        return ids, texts
    if kind == "jsonl":
        with open(source["path"], "rb") as handle:
            handle.seek(source["offset"])
            chunk = handle.read(source["length"])
        ids, texts = [], []
        for number, line in enumerate(filter(bytes.strip, chunk.splitlines())):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source['path']}: row {start + number}: not JSON ({error})") from None
            ids.append(str(row["_id"]))
            texts.append(document_text({"title": str(row.get("title") or ""), "text": str(row.get("text") or "")},
                                       source.get("include_title", True)))
        return ids, texts
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source["path"], columns=[source["id_column"], *source["text_columns"]])
        table = table.slice(source["offset"], source["length"])
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        ids = [str(i) for i in columns[source["id_column"]]]
        fields = source["text_columns"]
        texts = [document_text({"title": str(columns[fields[0]][i] or ""), "text": str(columns[fields[1]][i] or "")})
                 if len(fields) == 2 else str(columns[fields[0]][i] or "") for i in range(len(ids))]
        return ids, texts
    raise ValueError(f"unknown shard source kind {kind!r}")


# --- the actor ----------------------------------------------------------------------------------------------------

class ShardEncoder:
    """A Ray Data actor: loads the encoder once, then encodes and writes whole shards (one per call)."""

    def __init__(self, loaded_as: dict[str, Any], directory: str, role: str | None, batch_size: int, threads: int,
                 gpus: float) -> None:
        import torch

        from embtune.retrieval.encoder import load_encoder

        torch.set_num_threads(threads)
        device = "cuda" if gpus > 0 and loaded_as["backend"] == "torch" else "cpu"
        self.model, _ = load_encoder(loaded_as["model_name"], loaded_as["max_seq_length"], device=device,
                                     backend=loaded_as["backend"], threads=threads,
                                     model_file=loaded_as.get("model_file", ""))
        self.directory = Path(directory)
        self.role = role
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"start": [], "rows": [], "seconds": []}
        for start, source in zip(batch["start"], batch["source"]):
            began = time.perf_counter()
            start = int(start)
            ids, texts = read_source(json.loads(source), start)
            vectors = encode_batch(self.model, texts, self.batch_size, self.role)  # (rows, dim)
            _maybe_fail(start)
            write_shard_file(self.directory / f"{start:012d}{SHARD_SUFFIX}", start, ids, vectors)
            out["start"].append(start)
            out["rows"].append(len(texts))
            out["seconds"].append(time.perf_counter() - began)
        return out


def _maybe_fail(start: int) -> None:
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    if (Path(fault_dir) / "slow").exists():
        time.sleep(0.2)
    marker = Path(fault_dir) / f"kill-{start}"
    try:
        marker.unlink()  # once: the restarted actor encodes this shard through
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


# --- the driver ---------------------------------------------------------------------------------------------------

def encode_items(loaded_as: dict[str, Any], items: list[dict[str, Any]], directory: Path, compute: ComputeConfig,
                 dim: int, role: str | None = None, desc: str = "corpus") -> ShardSet:
    """Encode the shards among ``items`` whose file is missing, on Ray; the :class:`ShardSet` of all of them."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    shards = ShardSet(directory, [i["start"] for i in items], [i["rows"] for i in items], dim, compute=compute)
    missing = [item for item in items if not shards.path(item["start"]).is_file()]
    logger.info("%s: %d rows in %d shards of %d under %s; %d cached, %d to encode", desc, shards.num_rows,
                len(items), compute.shard_rows, directory, len(items) - len(missing), len(missing))
    if missing:
        import ray.data

        connect(compute)
        dataset = ray.data.from_items(missing, override_num_blocks=len(missing))
        dataset = dataset.map_batches(
            ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=compute.workers),
            num_cpus=compute.threads_per_worker,
            num_gpus=compute.gpus_per_worker or None,
            fn_constructor_kwargs={"loaded_as": loaded_as, "directory": str(directory), "role": role,
                                   "batch_size": compute.batch_size, "threads": compute.threads_per_worker,
                                   "gpus": compute.gpus_per_worker})
        with tqdm(total=len(missing), desc=f"encoding {desc} shards", unit="shard", file=sys.stderr) as progress:
            for row in dataset.iter_rows():
                shards.encoded.append(int(row["start"]))
                progress.update(1)
        not_written = [i["start"] for i in missing if not shards.path(i["start"]).is_file()]
        if not_written:  # Ray Data reported every shard done: a file that is not there is a bug, not a retry
            raise RuntimeError(f"{directory}: shards starting at rows {not_written[:5]} were reported encoded "
                               "but have no file")
    (directory / MANIFEST).write_text(json.dumps({"rows": shards.num_rows, "shards": len(items), "dim": dim,
                                                  "shard_rows": compute.shard_rows, "encoder": loaded_as}) + "\n")
    return shards


def shard_directory(stem: str, shard_rows: int) -> Path:
    return cache_dir() / f"{stem}.shards{shard_rows}"


def encode_texts(model, texts: Sequence[str], stem: str, compute: ComputeConfig, role: str | None = None,
                 desc: str = "corpus", ids: Sequence[str] | None = None) -> ShardSet:
    """``encode`` on Ray: texts the driver holds, under the cache entry ``stem`` (``encoder.cache_stem``)."""
    loaded_as = vars(model)[LOADED_AS]
    items = plan_texts(texts, compute.shard_rows, ids)
    return encode_items(loaded_as, items, shard_directory(stem, compute.shard_rows), compute,
                        model.get_embedding_dimension(), role, desc)


def encode_corpus(model_name: str, corpus: str | Path | Sequence[str | Path], compute: ComputeConfig,
                  backend: str = "torch", max_seq_length: int = 0, role: str | None = None) -> ShardSet:
    """Encode a corpus file on Ray without the driver reading its texts: a BEIR ``corpus.jsonl``, or Parquet
    file(s) with ``_id``, ``title`` and ``text`` columns. The driver loads the encoder once for its cache key."""
    from embtune.retrieval.encoder import load_encoder

    model, key = load_encoder(model_name, max_seq_length, device="cpu", backend=backend)
    files = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    items, corpus_hash = plan_corpus(files, compute.shard_rows)
    tag = getattr(model, "cache_tag", "")
    stem = f"{key}{'_' + tag if tag else ''}_{corpus_hash}"
    return encode_items(vars(model)[LOADED_AS], items, shard_directory(stem, compute.shard_rows), compute,
                        model.get_embedding_dimension(), role, desc=Path(files[0]).name)
