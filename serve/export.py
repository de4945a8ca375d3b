"""Export stage: the fine-tuned model as a bundle a search service can ship (``serve.app`` serves it).

    <out_dir>/
      model/              SentenceTransformer(path) loads it
      model/README.md     the model card: metrics table, Matryoshka dims, training config
      model/onnx/         model.onnx when export.onnx is true, and the file eval.backend needs (onnx: model.onnx,
                          onnx-int8: model_qint8.onnx): the corpus index is embedded with eval.backend
      index/corpus.faiss  exact inner-product index of the eval corpus ("faiss" in export.targets)
      index/docs.jsonl    one {"_id", "title", "text"} per index row
      vectordb/chroma/    a persistent Chroma collection of the eval corpus ("chroma" in export.targets)
      vectordb/lancedb/   a LanceDB table of the eval corpus ("lancedb" in export.targets)
      vectordb/milvus.db  milvus-lite's folder: a Milvus collection of the eval corpus ("milvus" in export.targets,
                          unless export.milvus.uri names another file or a Milvus server)
      retriever.json      the retrieval system /search serves: eval's recommended row for this model (see below)
      metrics.json        eval/results.json without per-query rows
      manifest.json       dims, metric, corpus hash, versions, which eval row retriever.json is

``retriever.json`` is eval's ``recommended`` spec when its dense member is the exported model (or it has none);
otherwise (eval recommended, say, the base model fused with BM25) the best dense, BM25 or hybrid row of the exported
model, and the log says so.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from embtune.compute.corpus import open_corpus
from embtune.config import to_dict
from embtune.manifest import Stage, versions
from embtune.retrieval.metrics import METRICS
from embtune.retrieval.spec import RetrieverSpec

logger = logging.getLogger(__name__)



def upstream(cfg, name: str) -> dict[str, str]:
    manifest = Path(cfg.run_dir) / name / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"export needs the {name} stage's output: {manifest} is missing")
    return json.loads(manifest.read_text())["outputs"]


def metrics_table(results: dict[str, Any]) -> str:
    lines = ["| model | dim | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, metrics in results.items():
        dims = metrics.get("dims") or {str(metrics.get("dim", "")): metrics}
        for dim, values in sorted(dims.items(), key=lambda kv: -int(kv[0] or 0)):
            lines.append(f"| {name} | {dim} | " + " | ".join(f"{100 * values[m]:.2f}" for m in METRICS) + " |")
    return "\n".join(lines)


def model_card(cfg, metrics: dict[str, Any], dims: list[int]) -> str:
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in cfg.train.bookkeeping_keys}
    train_yaml = yaml.safe_dump({"train": train, "mining": to_dict(cfg.mining)}, sort_keys=False)
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, embtune, matryoshka]
base_model: {cfg.train.base_model}
---

# {cfg.export.model_name}

Fine-tuned from `{cfg.train.base_model}` with [embtune](https://pypi.org/project/embtune/) using
`{cfg.train.loss}`{' inside MatryoshkaLoss' if cfg.train.matryoshka_dims else ''}.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/this/folder", truncate_dim={dims[-1] if dims else 'None'})  # or no truncate_dim
```

## Matryoshka dims
Embeddings can be truncated to any of {dims} and renormalized (cosine similarity).

## Retrieval metrics
Split `{metrics.get('split')}`, {metrics.get('num_queries')} queries over {metrics.get('num_documents')} documents,
computed with pytrec_eval as BEIR/MTEB do (percent).

{metrics_table(metrics.get('results', {}))}

## Training config
```yaml
{train_yaml}```
"""


def stage_config(cfg) -> dict[str, Any]:
    """The config the bundle depends on (its fingerprint): the export section, and the training and mining
    config the model card records (less train's bookkeeping keys, which change no weights)."""
    return {"export": to_dict(cfg.export), "mining": to_dict(cfg.mining), "on_error": cfg.data.on_error,
            "train": {k: v for k, v in to_dict(cfg.train).items() if k not in cfg.train.bookkeeping_keys},
            # the encoder as eval measured it, which the bundle reproduces and records
            "eval": {"max_seq_length": cfg.eval.max_seq_length, "backend": cfg.eval.backend}}


def bundle_spec(results: dict[str, Any], model_dir: str) -> tuple[RetrieverSpec | None, dict[str, Any]]:
    """The spec the bundle serves and where it comes from (``{"row", "ndcg@10", "split", "chosen_by",
    "evidence", "eval_recommended"}``).

    eval's deploy choice (``recommended`` with ``chosen_by``: dev split, label-free probe, tokenizer fit, or the
    default) is served as it is, whichever model its dense member names (the base model when the evidence kept
    it: :func:`bundle_model` exports that one). An older results.json (no ``chosen_by``) serves its recommended row
    when its dense member is the exported model, else the exported model's best row. None (dense at the full dim)
    for a results.json written before eval recorded specs.
    """
    recommended = results.get("recommended") or {}
    if recommended.get("chosen_by") and recommended.get("spec"):
        row = recommended["row"]
        spec = RetrieverSpec.from_dict(recommended["spec"], f"results.json recommended.spec ({row})")
        source = {"row": row, "ndcg@10": recommended.get("ndcg@10"), "split": results.get("split"),
                  "chosen_by": recommended["chosen_by"], "evidence": recommended.get("evidence", {}),
                  "why": recommended.get("why"), "eval_recommended": row}
        logger.info("bundle retriever: %s (%s), chosen by %s", row, spec.describe(), recommended["chosen_by"])
        return spec, source
    specs = {row: RetrieverSpec.from_dict(spec, f"results.json specs.{row}")
             for row, spec in results.get("specs", {}).items()}
    servable = [row for row, spec in specs.items() if spec.rerank is None
                and (spec.dense is None or spec.dense.model == model_dir)]
    if not servable:
        logger.warning("eval recorded no retriever spec for %s: the bundle serves dense search", model_dir)
        return None, {}
    row = recommended.get("row")
    if row not in servable:
        row = max(servable, key=lambda r: results["results"][r]["ndcg@10"])
        logger.warning("eval recommends %s (nDCG@10 %.2f), which searches another model than the exported one; the "
                       "bundle serves %s (%.2f), the best row of the exported model", recommended.get("row"),
                       100 * recommended.get("ndcg@10", 0.0), row, 100 * results["results"][row]["ndcg@10"])
    source = {"row": row, "ndcg@10": results["results"][row]["ndcg@10"], "split": results.get("split"),
              "eval_recommended": recommended.get("row")}
    logger.info("bundle retriever: %s (%s)", row, specs[row].describe())
    return specs[row], source


def bundle_model(spec: RetrieverSpec | None, model_dir: str) -> str:
    """The model folder the bundle ships: the served spec's dense model (the base model where the evidence kept
    it, or the trained one), ``model_dir`` for a BM25-only spec or none."""
    if spec is None or spec.dense is None or not spec.dense.model:
        return model_dir
    from embtune.models import resolve_model

    return resolve_model(spec.dense.model)


def run(cfg, force: bool = False) -> dict[str, str]:
    model_dir = upstream(cfg, "train")["model"]
    results_file = upstream(cfg, "eval")["results"]
    # Not the stage folder itself: the stage manifest and the bundle manifest would both be manifest.json.
    out_dir = Path(cfg.export.out_dir or Path(cfg.run_dir) / "bundle")
    stage = Stage("export", cfg.run_dir, config=stage_config(cfg), inputs={"model": model_dir, "metrics": results_file})
    if not force and stage.up_to_date():
        return stage.outputs()
    stage.begin()

    from embtune.serve.bundle import MANIFEST_FILE, build_bundle

    results = json.loads(Path(results_file).read_text())
    metrics = {k: v for k, v in results.items() if k != "per_query"}
    dims = sorted({int(d) for d in results["results"].get("finetuned", {}).get("dims", {})}, reverse=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    targets = cfg.export.targets
    corpus = None
    if targets:
        corpus_file = Path(upstream(cfg, "data_prep").get("eval_dataset") or cfg.data.path) / "corpus.jsonl"
        # A dict on the local engine; on Ray the file read by row, streamed into the bundle, encoded by the actors.
        corpus = open_corpus(corpus_file, cfg.data.on_error)
    spec, spec_source = bundle_spec(results, model_dir)
    if bundle_model(spec, model_dir) != model_dir:
        logger.info("the bundle ships %s, the model the chosen retriever searches (%s), not %s",
                    bundle_model(spec, model_dir), spec_source.get("why"), model_dir)
        model_dir = bundle_model(spec, model_dir)
    faiss_docs = corpus.docs() if corpus is not None and "faiss" in targets else None
    if spec is not None and faiss_docs is None and (spec.bm25 is not None or spec.rerank is not None):
        logger.warning("'faiss' is not in export.targets: the bundle has no documents, so it serves no %s",
                       spec.describe())
        spec = None
    # eval.backend != torch: build_bundle writes the model's ONNX file or OpenVINO IR first and embeds the corpus
    # with it. Titles and the token limit as eval read the corpus, so the bundle ranks what eval measured.
    build_bundle(model_dir, faiss_docs, out_dir, dims=dims or None, spec=spec, backend=cfg.eval.backend,
                 include_title=cfg.mining.include_title, max_seq_length=cfg.eval.max_seq_length,
                 index=cfg.export.index.kind, index_factory=cfg.export.index.factory, nprobe=cfg.export.index.nprobe,
                 ef_search=cfg.export.index.ef_search, k_factor=cfg.export.index.k_factor,
                 train_rows=cfg.export.index.train_rows,
                 doc_texts=corpus.texts(cfg.mining.include_title) if faiss_docs is not None else None)
    vector_targets = [t for t in targets if t != "faiss"]
    if vector_targets:
        # chromadb, lancedb and pymilvus load only when a target needs them
        from embtune.serve.vectordb import export_vectordb

        # The source model folder, not the bundle's copy: its cache key finds the corpus embeddings eval wrote.
        export_vectordb(out_dir, model_dir, corpus.rows(), vector_targets, cfg.export.vectordb,
                        name=cfg.export.vectordb.name or cfg.export.model_name, include_title=cfg.mining.include_title,
                        milvus=cfg.export.milvus, doc_texts=corpus.texts(cfg.mining.include_title))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "model" / "README.md").write_text(model_card(cfg, metrics, dims))
    if cfg.export.onnx:
        from embtune.retrieval.onnx import FP32_FILE, ONNX_DIR, export_onnx

        if not (out_dir / "model" / ONNX_DIR / FP32_FILE).is_file():
            export_onnx(out_dir / "model", quantize=False)
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    manifest.update({"base_model": cfg.train.base_model, "metrics_split": results.get("split"), "versions": versions(),
                     "retriever_source": spec_source, "evaluated_with": {"encoder_backend": cfg.eval.backend}})
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    from embtune.tracking import log_export_artifact  # the bundle as a wandb artifact, when tracking.report_to has it

    log_export_artifact(cfg, out_dir)
    logger.info("exported %s (serve it: python -m embtune.serve up --bundle %s)", out_dir, out_dir)
    return stage.finish({"bundle": out_dir})
