"""The label-free label holds corpus row ids exactly past 2**24 rows (where one float32 value no longer can)."""

import torch
from datasets import Dataset

BIG = 1 << 24  # the first integer after which float32 skips odd numbers


def test_row_ids_past_2_24_survive_the_float32_label_and_reach_the_right_passages():
    """A table whose candidates sit past row 2**24: the collator's float32 label gives back every id exactly, and
    the loss scores the passages at those rows (the same loss as on a small corpus holding only them)."""
    from embtune.train.losses import build_query_loss, join_rows, labelfree_dataset

    candidates = [BIG + 1, BIG + 3, BIG + 7, 2 * BIG + 5]
    table = Dataset.from_dict({"query": ["q"], "candidates": [candidates], "teacher_scores": [[0.9, 0.5, 0.2, 0.1]],
                               "base_scores": [[0.8, 0.6, 0.3, 0.2]], "source_row": [BIG + 9]})
    label = torch.tensor(labelfree_dataset(table)["label"])  # what sentence-transformers' collator builds: float32
    assert label.dtype == torch.float32
    k = len(candidates)
    assert join_rows(label[:, :2]).tolist() == [[BIG + 9]]
    assert join_rows(label[:, 2:2 + 2 * k]).tolist() == [candidates]
    assert torch.tensor([float(BIG + 1)]).long().item() == BIG  # one float32 value would have pointed at row 2**24

    small = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])  # (4, 2): the candidates' passages
    big = torch.zeros(2 * BIG + 6, 2)  # (rows, 2), about 270 MB
    big[candidates] = small
    small_table = table.remove_columns(["candidates", "source_row"]).add_column("candidates", [[0, 1, 2, 3]])
    small_label = torch.tensor(labelfree_dataset(small_table)["label"])
    query = torch.tensor([[0.9, 0.3]])

    class Train:  # the train section's loss keys
        loss, query_student_temperature, query_teacher_temperature = "query_kl", 0.05, 0.1
        query_distill_over, query_distill_in_batch = "candidates", True

    expected = build_query_loss(None, Train, small).compute_loss_from_embeddings([query], small_label)
    got = build_query_loss(None, Train, big).compute_loss_from_embeddings([query], label)
    assert float(got) == float(expected)
