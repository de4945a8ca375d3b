"""Length-grouped batches, which sentence-transformers' trainer lacks, resumable exactly.

sentence-transformers' trainer builds its own DataLoader and ignores transformers' ``group_by_length``
(``LengthGroupedSampler`` is only used by ``transformers.Trainer._get_train_sampler``, which it overrides), so
length grouping lives here as a ``DefaultBatchSampler`` the trainer accepts through ``batch_sampler=``.

The order of batches depends only on ``seed + epoch`` (as upstream's ``NoDuplicatesBatchSampler``), never on
the global RNG: a run resumed from a checkpoint in epoch k replays epoch k's order, and the trainer skips the
batches it already trained on.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler


class SeededBatchSampler(DefaultBatchSampler):
    """Shuffled batches, optionally grouped by length and free of duplicate texts within a batch.

    Args:
        dataset: the training table (text columns; label columns named in ``valid_label_columns`` are ignored).
        batch_size: rows per batch.
        drop_last: drop a final batch smaller than ``batch_size``.
        valid_label_columns, generator: accepted for the trainer's interface; the order uses its own generator.
        seed: the order of epoch e is a function of ``seed + e`` only.
        group_by_length: shuffle, cut into groups of ``group_batches * batch_size`` rows, sort each group by text
            length, and shuffle the resulting batches: each batch holds rows of similar length, so the collator
            pads less, while the order of batches stays random.
        avoid_duplicates: never put a row in a batch that already holds one of its texts (any column), as
            ``NoDuplicatesBatchSampler`` does; a row that collides goes first into the next batch.
        group_batches: how many batches a length-sorted group spans (transformers' ``LengthGroupedSampler`` uses 50).
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0, group_by_length: bool = False,
                 avoid_duplicates: bool = False, group_batches: int = 64) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        self.num_rows = len(dataset)
        self.group_by_length = group_by_length
        self.avoid_duplicates = avoid_duplicates
        self.group_batches = group_batches
        columns = [c for c in dataset.column_names if c not in set(valid_label_columns or [])]
        texts = [dataset[c] for c in columns]  # one list per column, read once
        # Characters stand in for tokens: computed once without a tokenizer, and monotone enough for sorting.
        self.lengths = np.zeros(self.num_rows, dtype=np.int64)
        for column in texts:
            self.lengths += np.fromiter((len(str(v)) for v in column), dtype=np.int64, count=self.num_rows)
        self.values = [set(map(str, row)) for row in zip(*texts)] if avoid_duplicates else None

    def order(self, epoch: int) -> np.ndarray:
        """The row order of an epoch before it is cut into batches."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_rows, generator=generator).numpy()
        if not self.group_by_length:
            return order
        group = self.batch_size * self.group_batches
        return np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                               for chunk in np.split(order, range(group, self.num_rows, group))])

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
        queue = deque(int(i) for i in self.order(epoch))
        batches: list[list[int]] = []
        while queue:
            batch: list[int] = []
            seen: set[str] = set()
            collided: list[int] = []
            while queue and len(batch) < self.batch_size:
                index = queue.popleft()
                if self.values is not None:
                    if not seen.isdisjoint(self.values[index]):
                        collided.append(index)
                        continue
                    seen |= self.values[index]
                batch.append(index)
            queue.extendleft(reversed(collided))  # collided rows lead the next batch, in their order
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        if self.group_by_length:  # sorted groups would otherwise run long-to-short through the epoch
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.batch_size
        return (self.num_rows + self.batch_size - 1) // self.batch_size


def padded_tokens(batches: list[list[int]], lengths: np.ndarray) -> int:
    """Sum over batches of batch size x longest row: what padding to the batch maximum costs."""
    return int(sum(len(b) * lengths[b].max() for b in batches if b))
