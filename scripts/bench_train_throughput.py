"""Training throughput: embtune's recipe vs a plain SentenceTransformerTrainer script, same data, same loss.

    nice -n 15 python scripts/bench_train_throughput.py                       # CPU, seq 128 and 256
    python scripts/bench_train_throughput.py --device cuda --bf16 --seqs 256 --batch-size 64 --steps 30 \
        --out benchmarks/results/train_throughput_gpu.json                    # a GPU (adds MFU)

Rows: SciFact (``../shared/data/beir/scifact`` beside the repo) train queries with their relevant abstract as positive
and a seeded random other abstract as negative (real text, no mining needed), shuffled with ``--seed``.

Both sides train MiniLM (``resolve_model("minilm")``) with MultipleNegativesRankingLoss (scale 20) on
(query, positive, negative) triplets, batch ``--batch-size``, lr 3e-5, max_seq_length ``seq``, no Matryoshka
(``--matryoshka 384,256,128,64`` wraps both in MatryoshkaLoss), no logging, no checkpoint before the last step.
What differs, and nothing else:

- ``plain``: sentence-transformers' defaults: ``BatchSamplers.BATCH_SAMPLER``, the model's own dropout
  (attention dropout 0.1, which keeps PyTorch's SDPA off its fused kernel), no length grouping.
- ``embtune``: the recipe (``train/recipe.py``) with its recommended settings for this size: attention dropout
  0 (``train.attention_dropout``), NO_DUPLICATES batches, checkpoint sealing callback.
- ``embtune_grouped``: the same plus ``train.group_by_length`` (batches of similar length: less padding).

Throughput is triplets per second over steps 2..N (the first step pays for warm-up), timed by the same trainer
callback on every side; variants run interleaved, ``--rounds`` times in rotating order, and the median is kept.
``ratio`` is measured triplets/s over plain's. Because a handful of timed batches is a poor sample of an epoch
once batches are grouped by length (they may all be long or all short), the file also has each side's padded
tokens over the whole of epoch 0 (counted from its own sampler, exact) and ``ratio_projected_epoch``: the
epoch's triplets over (epoch padded tokens x the measured seconds per padded token) — a projection, labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from embtune.manifest import Provenance, Stage  # noqa: E402
from embtune.models import resolve_model  # noqa: E402
from embtune.schema import load_config  # noqa: E402

VARIANTS = ("plain", "plain_same", "embtune", "embtune_grouped")
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM datasheet, dense bf16 tensor cores


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (synchronized on GPU), and the padded tokens each batch carried."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def beir_table(folder: Path, seed: int):
    """(query, positive, random negative) triplets from a BEIR folder's train split."""
    from datasets import Dataset

    from embtune.dataio import document_text, load_corpus, load_qrels, load_queries

    corpus = load_corpus(folder / "corpus.jsonl")
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(folder / "qrels" / "train.tsv", corpus, queries)
    rng = random.Random(seed)
    doc_ids = sorted(corpus)
    rows = {"query": [], "positive": [], "negative_1": []}
    for query_id in sorted(qrels):
        positive = sorted(qrels[query_id])[0]
        negative = rng.choice([d for d in rng.sample(doc_ids, 3) if d not in qrels[query_id]])
        rows["query"].append(queries[query_id])
        rows["positive"].append(document_text(corpus[positive]))
        rows["negative_1"].append(document_text(corpus[negative]))
    return Dataset.from_dict(rows).shuffle(seed=seed)


COLUMNS = ("query", "positive", "negative_1")


def token_lengths(table, seq: int, model: str) -> dict[str, np.ndarray]:
    """Tokens per row and column after truncation to ``seq`` (MiniLM's tokenizer, special tokens included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return {c: np.minimum(seq, [len(ids) for ids in tokenizer(list(table[c]))["input_ids"]]) for c in COLUMNS}


def batch_tokens(batch: list[int], lengths: dict[str, np.ndarray]) -> tuple[int, int]:
    """(padded, real) tokens of a batch: each column padded to its own longest row, as the collator does."""
    padded = sum(int(lengths[c][batch].max()) * len(batch) for c in COLUMNS)
    real = sum(int(lengths[c][batch].sum()) for c in COLUMNS)
    return padded, real


def run_plain(table, seq, args, out_dir, timer, attention_dropout=None):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    config_kwargs = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    model = SentenceTransformer(resolve_model(args.model), device=args.device, config_kwargs=config_kwargs)
    model.max_seq_length = seq
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, learning_rate=3e-5,
        max_steps=args.steps, bf16=args.bf16, use_cpu=args.device == "cpu", report_to="none", seed=args.seed,
        save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=table,
                                         loss=plain_loss(model, args), callbacks=[timer])
    trainer.train()
    return trainer


def plain_loss(model, args):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model)
    return MatryoshkaLoss(model, loss, matryoshka_dims=args.matryoshka) if args.matryoshka else loss


def run_embtune(table_dir, seq, args, run_dir, timer, grouped):
    from embtune.train.recipe import Recipe

    overrides = [f"run_dir={run_dir}", f"data.path={args.data}", "train.loss=mnrl", f"train.base_model={args.model}",
                 f"train.matryoshka_dims=[{','.join(map(str, args.matryoshka))}]", f"train.max_seq_length={seq}",
                 f"train.batch_size={args.batch_size}", "train.learning_rate=3e-5", f"train.max_steps={args.steps}",
                 "tracking.report_to=none", "train.attention_dropout=0.0", f"train.bf16={str(args.bf16).lower()}",
                 f"train.use_cpu={str(args.device == 'cpu').lower()}", f"train.group_by_length={str(grouped).lower()}",
                 f"train.save_steps={args.steps * 10}", "train.logging_steps=1000", f"seed={args.seed}"]
    cfg = load_config(None, overrides)
    Stage("data_prep", run_dir, config={}, inputs={}).finish({"train_table": table_dir})
    recipe = Recipe(cfg, force=True)
    recipe.setup()
    recipe.trainer.add_callback(timer)
    recipe.trainer.args.disable_tqdm = True
    recipe.train()
    return recipe.trainer


def measure(variant, seq, table, table_dir, args, scratch, lengths):
    timer = StepTimer()
    out = scratch / f"{variant}-{seq}-{time.time_ns()}"
    if variant == "plain":
        trainer = run_plain(table, seq, args, out, timer)
    elif variant == "plain_same":  # the plain script with embtune's one speed setting: isolates the recipe's overhead
        trainer = run_plain(table, seq, args, out, timer, attention_dropout=0.0)
    else:
        trainer = run_embtune(table_dir, seq, args, out, timer, grouped=variant == "embtune_grouped")
    timed = timer.times[1:]
    # Epoch 0's batches as this side's own sampler makes them (same seed => the order it trained on).
    batches = [[int(j) for j in b] for b in trainer.get_train_dataloader().batch_sampler]
    step_tokens = [batch_tokens(b, lengths) for b in batches[1:args.steps]]
    epoch_padded = sum(batch_tokens(b, lengths)[0] for b in batches)
    shutil.rmtree(out, ignore_errors=True)
    triplets = sum(len(b) for b in batches[1:args.steps])
    padded = sum(t[0] for t in step_tokens)
    seconds_per_token = sum(timed) / padded
    return {"seconds": sum(timed), "steps": len(timed), "triplets": triplets,
            "triplets_per_s": triplets / sum(timed), "padded_tokens": padded,
            "real_tokens": sum(t[1] for t in step_tokens), "padded_tokens_per_s": padded / sum(timed),
            "epoch_padded_tokens": epoch_padded, "epoch_triplets": sum(len(b) for b in batches),
            # The timed steps are a handful of batches; with length grouping those can be all-long or all-short,
            # so the epoch figure is also projected from the measured seconds per padded token.
            "projected_epoch_triplets_per_s": sum(len(b) for b in batches) / (epoch_padded * seconds_per_token),
            "trainer": trainer}


def train_flops(trainer, padded_tokens: int, seq_tokens_sq: float) -> float:
    """6 x non-embedding parameters per padded token (forward + backward) plus attention scores and values."""
    model = trainer.model[0].auto_model
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    return 6 * params * padded_tokens + 12 * layers * hidden * seq_tokens_sq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent
                                              / "shared" / "data" / "beir" / "scifact"))
    parser.add_argument("--dataset", choices=["scifact", "pydoc"], default="scifact",
                        help="pydoc: the demo's stdlib docstrings, whose lengths vary widely (where length grouping "
                             "applies); scifact: abstracts, nearly all truncated at seq")
    parser.add_argument("--seqs", default="128,256")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="minilm", help="the MiniLM to train: a folder or an embtune.models alias")
    parser.add_argument("--matryoshka", default="",
                        help="e.g. 384,256,128,64: MNRL inside MatryoshkaLoss on both sides")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    provenance = Provenance.start()
    args.matryoshka = [int(d) for d in args.matryoshka.split(",") if d]
    if args.device == "cpu":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    seqs = [int(s) for s in args.seqs.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.dataset == "pydoc":
        from embtune.data_prep.pydoc_corpus import build_pydoc_beir

        args.data = str(build_pydoc_beir(scratch / "pydoc", seed=args.seed))
    table = beir_table(Path(args.data), args.seed)
    table_dir = scratch / "table"
    table.save_to_disk(str(table_dir))

    samples: dict[int, dict[str, list[dict]]] = {s: {v: [] for v in VARIANTS} for s in seqs}
    lengths = {seq: token_lengths(table, seq, args.model) for seq in seqs}
    for round_index in range(args.rounds):
        for seq in seqs:
            shift = round_index % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]  # rotate who goes first
            for variant in order:
                result = measure(variant, seq, table, table_dir, args, scratch, lengths[seq])
                trainer = result.pop("trainer")
                if args.device != "cpu":
                    result["flops"] = train_flops(trainer, result["padded_tokens"], 0.0)
                samples[seq][variant].append(result)
                print(f"round {round_index} seq {seq} {variant}: {result['triplets_per_s']:.2f} triplets/s", flush=True)

    results = {}
    for seq in seqs:
        rows = {}
        for variant in VARIANTS:
            runs = samples[seq][variant]
            rows[variant] = {
                "triplets_per_s_median": statistics.median(r["triplets_per_s"] for r in runs),
                "triplets_per_s_runs": [round(r["triplets_per_s"], 3) for r in runs],
                "padded_tokens_per_s_median": statistics.median(r["padded_tokens_per_s"] for r in runs),
                "padding_fraction_timed_steps": round(1 - runs[0]["real_tokens"] / runs[0]["padded_tokens"], 3),
                "epoch_padded_tokens": runs[0]["epoch_padded_tokens"],
                "projected_epoch_triplets_per_s_median": statistics.median(
                    r["projected_epoch_triplets_per_s"] for r in runs)}
            if args.device != "cpu":
                achieved = statistics.median(r["flops"] / r["seconds"] for r in runs)
                rows[variant]["achieved_tflops"] = round(achieved / 1e12, 2)
                rows[variant]["mfu_vs_h100_bf16_dense"] = round(achieved / H100_BF16_DENSE_FLOPS, 4)
        plain = rows["plain"]["triplets_per_s_median"]
        plain_epoch = rows["plain"]["projected_epoch_triplets_per_s_median"]
        same = rows["plain_same"]["triplets_per_s_median"]
        for variant in ("embtune", "embtune_grouped"):
            rows[variant]["ratio"] = round(rows[variant]["triplets_per_s_median"] / plain, 3)
            # Same settings on both sides (attention dropout 0): what the recipe itself costs or saves.
            rows[variant]["ratio_same_settings"] = round(rows[variant]["triplets_per_s_median"] / same, 3)
            rows[variant]["ratio_projected_epoch"] = round(
                rows[variant]["projected_epoch_triplets_per_s_median"] / plain_epoch, 3)
        results[str(seq)] = rows

    payload = {
        "benchmark": "train_throughput",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "niceness": os.nice(0),
        **provenance.record(),
        "device": args.device,
        "gpu": "none lent to this run" if args.device == "cpu" else __import__("torch").cuda.get_device_name(),
        "settings": {"model": "minilm (all-MiniLM-L6-v2)", "batch_size": args.batch_size, "steps": args.steps,
                     "timed_steps": args.steps - 1, "rounds": args.rounds, "bf16": args.bf16,
                     "loss": f"MNRL in MatryoshkaLoss {args.matryoshka}" if args.matryoshka else "MNRL",
                     "rows": f"{args.dataset} train: {len(table)} (query, positive, random negative) triplets"},
        "differences": {"plain": "sentence-transformers defaults (BATCH_SAMPLER, model dropout incl. attention 0.1)",
                        "plain_same": "plain, but attention dropout 0 like embtune (ratio_same_settings divides by it)",
                        "embtune": "recipe: attention_dropout=0, NO_DUPLICATES, sealed checkpoints",
                        "embtune_grouped": "recipe as above + group_by_length"},
        "bars": {"ratio_cpu": ">= 1.0", "ratio_length_grouped": ">= 1.3"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
