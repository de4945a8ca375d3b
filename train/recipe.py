"""The training recipe: sentence-transformers' trainer on data_prep's table, made distributed by accelerate.

    accelerate launch -m embtune.train configs/scifact_supervised.yaml      # CPU, one GPU, many GPUs, many nodes
    python -m embtune.train configs/scifact_supervised.yaml                 # same, one process

setup() builds the model, the loss, the batch sampler and the trainer from plain config values; train() runs it,
resuming from the newest complete checkpoint in ``<run_dir>/train/checkpoints-<fingerprint>`` if there is one;
cleanup() saves the final model on the main process, logs it to wandb, and writes the stage manifest.

Under N processes each takes ``train.batch_size`` rows per step (the global batch is N x batch_size); with
``train.gather_across_devices`` the loss scores every query against all N x batch_size documents. Checkpoints,
the final model and the dev evaluator run on the main process only (the evaluator's encoding is shared
across processes by sentence-transformers).
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from embtune.config import ConfigError, to_dict
from embtune.manifest import Stage
from embtune.models import resolve_model
from embtune.tracking import configure_reporting, log_data_lineage, log_model_artifact, start_run
from embtune.train.batching import SeededBatchSampler
from embtune.train.checkpoints import SealCheckpoints, last_checkpoint
from embtune.train.losses import QUERY_LOSSES, build_loss, build_query_loss, is_labelfree_table, training_dataset

logger = logging.getLogger(__name__)


def stage_config(cfg) -> dict[str, Any]:
    """The config the trained model depends on (the stage fingerprint): the train section less its bookkeeping
    keys (logging, checkpoint cadence), so changing those reruns nothing and a run resumes from the same checkpoint
    folder. Tracking is its own section, never in it."""
    return {"train": {k: v for k, v in to_dict(cfg.train).items() if k not in cfg.train.bookkeeping_keys},
            "seed": cfg.seed}


def upstream_table(cfg) -> str:
    manifest = Path(cfg.run_dir) / "data_prep" / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no training table: run data_prep first ({manifest} is missing)")
    return json.loads(manifest.read_text())["outputs"]["train_table"]


class Recipe:
    """setup() -> train() -> cleanup(); holds nothing but what those three steps share."""

    def __init__(self, cfg, force: bool = False):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.force = force
        self.table_dir = upstream_table(cfg)
        self.stage = Stage("train", cfg.run_dir, config=stage_config(cfg), inputs={"train_table": self.table_dir})
        self.trainer = None
        self.wandb_run = None
        self.labelfree = False
        # Checkpoints are keyed by the stage fingerprint, so a changed config never resumes a stale run.
        self.checkpoint_dir = self.stage.dir / f"checkpoints-{self.stage.fingerprint()}"

    def setup(self) -> None:
        from datasets import load_from_disk
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.base.sampler import BatchSamplers
        from transformers import set_seed

        t = self.tcfg
        set_seed(self.cfg.seed)
        config_kwargs = {}
        if t.attention_dropout is not None:
            config_kwargs["attention_probs_dropout_prob"] = t.attention_dropout
        model = SentenceTransformer(resolve_model(t.base_model, must_exist=True), device="cpu" if t.use_cpu else None,
                                    config_kwargs=config_kwargs)
        # train.max_seq_length truncates training texts; the saved model keeps the longer of it and the base's own
        # limit, so a model trained on short windows (label-free: 128) still reads whole documents at inference.
        self.saved_max_seq_length = max(t.max_seq_length, model.max_seq_length or 0)
        model.max_seq_length = t.max_seq_length
        table = load_from_disk(self.table_dir)
        train_dataset = training_dataset(table, t, self.corpus_texts() if t.query_distill_documents else None,
                                         seed=self.cfg.seed)
        logger.info("training on %d rows, columns %s", len(train_dataset), train_dataset.column_names)

        if t.group_by_length:
            batch_sampler = partial(SeededBatchSampler, group_by_length=True, avoid_duplicates=t.no_duplicates)
        else:
            batch_sampler = BatchSamplers.NO_DUPLICATES if t.no_duplicates else BatchSamplers.BATCH_SAMPLER
        evaluator = self.dev_evaluator() if t.eval_steps else None

        report_to = configure_reporting(self.cfg.tracking, self.stage.dir)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(self.checkpoint_dir),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler,
            seed=self.cfg.seed,
            data_seed=self.cfg.seed,
            bf16=t.bf16,
            fp16=t.fp16,
            use_cpu=t.use_cpu,
            batch_sampler=batch_sampler,
            torch_compile=t.torch_compile,
            eval_strategy="steps" if evaluator else "no",
            eval_steps=t.eval_steps or None,
            save_strategy="steps" if t.save_steps else "epoch",
            save_steps=t.save_steps or 500,
            save_total_limit=t.save_total_limit,
            logging_steps=t.logging_steps,
            logging_first_step=True,
            report_to=report_to,
            run_name=Path(self.cfg.run_dir).name,
            dataloader_num_workers=t.dataloader_num_workers,
            dataloader_drop_last=False,
            disable_tqdm=False,
        )
        if args.process_index == 0 and "wandb" in report_to:
            # Started before the trainer so its WandbCallback logs the curves into this run, which also holds
            # the whole resolved config and the data lineage. The id follows the fingerprint: a resumed run
            # continues the same wandb run.
            self.wandb_run = start_run(self.cfg, self.stage.dir, "train", run_id=f"train-{self.stage.fingerprint()}",
                                       config=to_dict(self.cfg))
            log_data_lineage(self.wandb_run, Path(self.cfg.run_dir) / "data_prep" / "manifest.json")
        self.trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train_dataset, loss=self.loss(model, table), evaluator=evaluator,
            callbacks=[SealCheckpoints()],
        )

    def loss(self, model, table):
        """The configured loss; a label-free table (data.queries: labelfree) trains the query side against the
        base model's corpus embeddings that data_prep wrote (train.loss query_kl by default, or query_margin_mse)."""
        t = self.tcfg
        self.labelfree = is_labelfree_table(table.column_names)
        if not self.labelfree:
            if t.loss in QUERY_LOSSES:
                raise ValueError(f"train.loss={t.loss} needs a label-free table: set data.queries: labelfree")
            return build_loss(model, t)
        if t.loss not in QUERY_LOSSES:
            logger.info("label-free table: train.loss %s -> query_kl (the label-free distillation loss)", t.loss)
        if t.matryoshka_dims:
            logger.info("label-free distillation trains the full dimension; train.matryoshka_dims is not used")
        import numpy as np

        outputs = self.data_prep_outputs()
        doc_emb = np.load(outputs["corpus_embeddings"])
        if t.loss != "query_fused":
            return build_query_loss(model, t, doc_emb)
        # the deploy weight: the probe-chosen teacher's, which eval's hybrid rows start from
        manifest = json.loads((Path(self.cfg.run_dir) / "data_prep" / "manifest.json").read_text())
        positives = Path(outputs["corpus_embeddings"]).parent / "positive_embeddings.npy"
        if not positives.is_file():
            raise ConfigError("train.loss=query_fused needs the cut passages' embeddings: set labelfree.positives: "
                              "cut and rerun data_prep", "train.loss", self.cfg.source)
        return build_query_loss(model, t, doc_emb, np.load(positives), manifest["teacher"]["dense_weight"])

    def data_prep_outputs(self) -> dict[str, str]:
        return json.loads((Path(self.cfg.run_dir) / "data_prep" / "manifest.json").read_text())["outputs"]

    def corpus_texts(self) -> list[str]:
        """The passages of a label-free table's corpus, in the row order of its embeddings (data_prep wrote both)."""
        outputs = self.data_prep_outputs()
        return json.loads((Path(outputs["corpus_embeddings"]).parent / "doc_texts.json").read_text())

    def dev_evaluator(self):
        """sentence-transformers' IR evaluator on the dev queries data_prep carved from the train split."""
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

        from embtune.dataio import document_text, load_corpus, load_qrels, load_queries

        outputs = self.data_prep_outputs()
        if "dev_qrels" not in outputs:
            raise ConfigError("train.eval_steps needs dev queries: set data.dev_fraction > 0 and rerun data_prep",
                              "train.eval_steps", self.cfg.source)
        folder = Path(outputs["eval_dataset"])
        corpus = load_corpus(folder / "corpus.jsonl", self.cfg.data.on_error)
        queries = load_queries(folder / "queries.jsonl", self.cfg.data.on_error)
        qrels = load_qrels(outputs["dev_qrels"], corpus, queries, self.cfg.data.on_error)
        return InformationRetrievalEvaluator(
            queries={q: queries[q] for q in qrels}, corpus={d: document_text(doc) for d, doc in corpus.items()},
            relevant_docs={q: set(docs) for q, docs in qrels.items()}, name="dev", show_progress_bar=False,
            mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[10, 100], map_at_k=[100])

    def train(self) -> None:
        resume = None
        if self.force:
            # --force means "train again": a finished run's newest checkpoint is its last step, so resuming from it
            # would train 0 steps. The old checkpoints go, so the new run's saves never mix with them.
            if self.trainer.is_world_process_zero() and self.checkpoint_dir.is_dir():
                shutil.rmtree(self.checkpoint_dir)
            logger.info("--force: training from step 0 (checkpoints in %s removed)", self.checkpoint_dir)
        else:
            resume = last_checkpoint(self.checkpoint_dir)
        if resume:
            logger.info("resuming from %s", resume)
        self.trainer.train(resume_from_checkpoint=resume)

    def cleanup(self) -> dict[str, str]:
        model_dir = self.stage.dir / "model"
        if not self.trainer.is_world_process_zero():
            return {}
        self.trainer.model.max_seq_length = self.saved_max_seq_length
        if self.labelfree and self.tcfg.document_side == "base":
            save_asymmetric(self.trainer.model, self.tcfg.base_model, model_dir)
        else:
            self.trainer.model.save(str(model_dir))
        args = self.trainer.args
        extra = {"log_history": list(self.trainer.state.log_history), "world_size": args.world_size,
                 "global_batch_size": args.per_device_train_batch_size * args.world_size
                 * args.gradient_accumulation_steps}
        if self.wandb_run is not None:
            artifact = None
            if self.cfg.tracking.wandb_log_model:
                artifact = log_model_artifact(self.wandb_run, model_dir,
                                              f"model-{Path(self.cfg.run_dir).resolve().name}",
                                              {"fingerprint": self.stage.fingerprint(),
                                               "base_model": self.tcfg.base_model})
            extra["wandb"] = {"id": self.wandb_run.id, "project": self.wandb_run.project,
                              "group": self.wandb_run.group, "dir": str(Path(self.wandb_run.dir).parent),
                              "model_artifact": artifact}
            self.wandb_run.finish()
        return self.stage.finish({"model": model_dir}, extra=extra)


def save_asymmetric(student, base_model: str, model_dir: Path) -> None:
    """Save a Router model: the trained modules on the query route, the base model's on the document route, plus
    ``DOCUMENT_SIDE_FILE`` naming the base (so eval and serve reuse the base model's corpus embeddings).
    ``encode_query`` / ``encode_document`` (or ``embtune.retrieval.encoder.encode(..., role=)``) pick the route;
    plain ``encode`` takes the document route."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.router import Router

    from embtune.retrieval.encoder import DOCUMENT_SIDE_FILE

    base = SentenceTransformer(resolve_model(base_model), device="cpu")
    router = Router.for_query_document(query_modules=[student[i] for i in range(len(student))],
                                       document_modules=[base[i] for i in range(len(base))])
    SentenceTransformer(modules=[router], device="cpu").save(str(model_dir))
    (model_dir / DOCUMENT_SIDE_FILE).write_text(json.dumps({"document_model": resolve_model(base_model)}))


def labelfree_decision(cfg) -> dict[str, Any] | None:
    """data_prep's label-free decision (``{"train", "decision", "reason"}``), None for other modes."""
    manifest = Path(cfg.run_dir) / "data_prep" / "manifest.json"
    return json.loads(manifest.read_text()).get("decision") if manifest.is_file() else None


def run(cfg, force: bool = False) -> dict[str, Any]:
    recipe = Recipe(cfg, force)
    if not force and recipe.stage.up_to_date():
        return recipe.stage.outputs()
    recipe.stage.begin()
    decision = labelfree_decision(cfg)
    if decision is not None and not decision["train"]:
        # The corpus's evidence says a student cannot pay (data_prep/labelfree.py decide): the model is the base.
        logger.info("no training: %s", decision["reason"])
        return recipe.stage.finish({"model": resolve_model(cfg.train.base_model)},
                                   extra={"trained": False, "reason": decision["reason"]})
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
