"""The cross-encoder teacher recipe: sentence-transformers' CrossEncoderTrainer on data_prep's table.

    python -m embtune.train.cross_encoder configs/scifact_teacher.yaml            # CPU or one GPU
    accelerate launch -m embtune.train.cross_encoder configs/scifact_teacher.yaml # many GPUs

No cross-encoder ships offline here, so embtune trains its own teacher: ``CrossEncoder(base_model, num_labels=1)``
keeps the base checkpoint's BERT weights (a sentence-transformer folder works) and adds a fresh one-logit head,
trained on the same (query, positive, negative_1..k) rows the bi-encoder uses (``cross_encoder.loss``: ``bce`` on
labelled pairs, or ``mnrl`` with in-batch negatives). The model is saved to ``<run_dir>/cross_encoder/model``
and is a valid ``mining.teacher``.

setup() builds the model, the dataset, the loss and the trainer from plain config values; train() runs it;
cleanup() saves the model on the main process and writes the stage manifest.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from embtune.manifest import Stage
from embtune.models import resolve_model
from embtune.train.recipe import upstream_table

logger = logging.getLogger(__name__)


def pair_dataset(table, num_negatives: int):
    """(query, document, label) rows: each positive labelled 1 and each of its first ``num_negatives`` negatives 0.

    A query with several positives shares its negatives across rows; each (query, negative) pair is kept once.
    """
    from datasets import Dataset

    queries, documents, labels = [], [], []
    seen: set[tuple[str, str]] = set()
    negatives = [f"negative_{n}" for n in range(1, num_negatives + 1)]
    missing = [c for c in negatives if c not in table.column_names]
    if missing:
        raise ValueError(f"cross_encoder.num_negatives={num_negatives} needs columns {missing}: raise "
                         "mining.num_negatives or lower cross_encoder.num_negatives")
    for row in table.select_columns(["query", "positive", *negatives]):
        for column, label in [("positive", 1.0), *((c, 0.0) for c in negatives)]:
            pair = (row["query"], row[column])
            if pair in seen:
                continue
            seen.add(pair)
            queries.append(pair[0])
            documents.append(pair[1])
            labels.append(label)
    return Dataset.from_dict({"query": queries, "document": documents, "label": labels})


class CrossEncoderRecipe:
    """setup() -> train() -> cleanup() for a cross-encoder on the mined table."""

    def __init__(self, cfg, force: bool = False):
        self.cfg = cfg
        self.ccfg = cfg.cross_encoder
        self.table_dir = upstream_table(cfg)
        self.stage = Stage("cross_encoder", cfg.run_dir, config={"cross_encoder": cfg.cross_encoder, "seed": cfg.seed},
                           inputs={"train_table": self.table_dir})
        self.trainer = None
        self.checkpoint_dir = self.stage.dir / f"checkpoints-{self.stage.fingerprint()}"

    def setup(self) -> None:
        from datasets import load_from_disk
        from sentence_transformers.base.sampler import BatchSamplers
        from sentence_transformers.cross_encoder import (
            CrossEncoder,
            CrossEncoderTrainer,
            CrossEncoderTrainingArguments,
            losses,
        )
        from transformers import set_seed

        c = self.ccfg
        set_seed(self.cfg.seed)
        model = CrossEncoder(resolve_model(c.base_model, must_exist=True), num_labels=1, max_length=c.max_length,
                             device="cpu" if c.use_cpu else None)
        table = load_from_disk(self.table_dir)
        if c.loss == "bce":
            dataset = pair_dataset(table, c.num_negatives)
            positives = sum(dataset["label"])
            # Weight positives up to the negatives' count, so the head is not pushed towards "irrelevant".
            pos_weight = (len(dataset) - positives) / max(positives, 1)
            import torch

            loss = losses.BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(pos_weight))
            sampler = BatchSamplers.BATCH_SAMPLER
        else:
            negatives = [f"negative_{n}" for n in range(1, c.num_negatives + 1)]
            dataset = table.select_columns(["query", "positive", *negatives])
            loss = losses.MultipleNegativesRankingLoss(model, num_negatives=c.num_negatives)
            sampler = BatchSamplers.NO_DUPLICATES
        logger.info("cross-encoder training on %d rows (%s), columns %s", len(dataset), c.loss, dataset.column_names)
        args = CrossEncoderTrainingArguments(
            output_dir=str(self.checkpoint_dir),
            num_train_epochs=c.epochs,
            max_steps=c.max_steps,
            per_device_train_batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            warmup_ratio=c.warmup_ratio,
            weight_decay=c.weight_decay,
            seed=self.cfg.seed,
            data_seed=self.cfg.seed,
            bf16=c.bf16,
            use_cpu=c.use_cpu,
            batch_sampler=sampler,
            save_strategy="no",
            logging_steps=c.logging_steps,
            logging_first_step=True,
            report_to=c.report_to,
            dataloader_drop_last=False,
        )
        self.trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss)

    def train(self) -> None:
        self.trainer.train()

    def cleanup(self) -> dict[str, str]:
        if not self.trainer.is_world_process_zero():
            return {}
        model_dir = self.stage.dir / "model"
        self.trainer.model.save_pretrained(str(model_dir))
        history = list(self.trainer.state.log_history)
        return self.stage.finish({"model": model_dir}, extra={"log_history": history})


def run(cfg, force: bool = False) -> dict[str, Any]:
    recipe = CrossEncoderRecipe(cfg, force)
    if not force and recipe.stage.up_to_date():
        return recipe.stage.outputs()
    recipe.stage.begin()
    recipe.setup()
    recipe.train()
    return recipe.cleanup()


def main(argv: list[str] | None = None) -> int:
    from embtune.cli import stage_main

    return stage_main("train.cross_encoder", run, ["cross_encoder"], argv)


if __name__ == "__main__":
    sys.exit(main())
