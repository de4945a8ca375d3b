"""The training recipe: sentence-transformers' trainer on data_prep's table, made distributed by accelerate.

    accelerate launch -m train configs/scifact_supervised.yaml      # CPU, one GPU, many GPUs
    python -m train configs/scifact_supervised.yaml                 # same, one process

setup() builds the model, the loss and the trainer from plain config values; train() runs it, resuming from the
last checkpoint in ``<run_dir>/train/checkpoints`` if one is there; cleanup() saves the final model on the main
process and writes the stage manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from embtune.manifest import Stage
from embtune.models import resolve_model
from train.losses import build_loss, training_dataset
from train.tracking import configure_reporting

logger = logging.getLogger(__name__)


def upstream_table(cfg) -> str:
    import json

    manifest = Path(cfg.run_dir) / "data_prep" / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no training table: run data_prep first ({manifest} is missing)")
    return json.loads(manifest.read_text())["outputs"]["train_table"]


def last_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` folder that holds a complete trainer state, else None."""
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "trainer_state.json").is_file():
            return str(checkpoint)
        logger.warning("checkpoint %s is incomplete (no trainer_state.json); trying an older one", checkpoint)
    return None


class Recipe:
    """setup() -> train() -> cleanup(); holds nothing but what those three steps share."""

    def __init__(self, cfg, force: bool = False):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.force = force
        self.table_dir = upstream_table(cfg)
        self.stage = Stage("train", cfg.run_dir, config={"train": cfg.train}, inputs={"train_table": self.table_dir})
        self.trainer = None
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
        set_seed(t.seed)
        config_kwargs = {}
        if t.attention_dropout is not None:
            config_kwargs["attention_probs_dropout_prob"] = t.attention_dropout
        model = SentenceTransformer(resolve_model(t.base_model), device="cpu" if t.use_cpu else None,
                                    config_kwargs=config_kwargs)
        model.max_seq_length = t.max_seq_length
        table = load_from_disk(self.table_dir)
        train_dataset = training_dataset(table, t)
        logger.info("training on %d rows, columns %s", len(train_dataset), train_dataset.column_names)

        report_to = configure_reporting(t, self.stage.dir)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(self.checkpoint_dir),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler,
            seed=t.seed,
            data_seed=t.seed,
            bf16=t.bf16,
            fp16=t.fp16,
            use_cpu=t.use_cpu,
            batch_sampler=BatchSamplers.NO_DUPLICATES if t.no_duplicates else BatchSamplers.BATCH_SAMPLER,
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
        self.trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train_dataset, loss=build_loss(model, t)
        )

    def train(self) -> None:
        resume = last_checkpoint(self.checkpoint_dir)
        if resume:
            logger.info("resuming from %s", resume)
        self.trainer.train(resume_from_checkpoint=resume)

    def cleanup(self) -> dict[str, str]:
        model_dir = self.stage.dir / "model"
        if not self.trainer.is_world_process_zero():
            return {}
        self.trainer.model.save(str(model_dir))
        history = [row for row in self.trainer.state.log_history]
        return self.stage.finish({"model": model_dir}, extra={"log_history": history})


def run(cfg, force: bool = False) -> dict[str, Any]:
    recipe = Recipe(cfg, force)
    if not force and recipe.stage.up_to_date():
        return recipe.stage.outputs()
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
