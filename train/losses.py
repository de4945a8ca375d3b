"""Loss construction from config: sentence-transformers' losses, nothing re-implemented."""

from __future__ import annotations

from typing import Any


def training_columns(tcfg, available: list[str]) -> list[str]:
    """The table columns the loss reads, in the order sentence-transformers expects (anchor, positive, negatives)."""
    wanted = 1 if tcfg.loss == "triplet" else tcfg.num_negatives
    negatives = [f"negative_{i}" for i in range(1, wanted + 1)]
    missing = [c for c in negatives if c not in available]
    if missing:
        have = sorted(c for c in available if c.startswith("negative_") and not c.endswith("_id"))
        raise ValueError(
            f"train.num_negatives={wanted} needs columns {missing}, the table has {have}: "
            "raise mining.num_negatives or lower train.num_negatives"
        )
    return ["query", "positive", *negatives]


def build_loss(model, tcfg) -> Any:
    """MNRL (in-batch + mined negatives), its GradCache form, or TripletLoss; in MatryoshkaLoss when dims are set.

    ``gather_across_devices`` makes MNRL score each process's queries against the documents of every process
    (an all-gather with gradients), so the in-batch negatives are the global batch under DDP.
    MatryoshkaLoss supports the cached losses upstream: it truncates the cached embeddings instead of re-running
    the model per dim.
    """
    from accelerate import PartialState
    from sentence_transformers.sentence_transformer import losses

    gather = tcfg.gather_across_devices and PartialState().num_processes > 1  # one process: nothing to gather
    if tcfg.loss == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=tcfg.mnrl_scale,
                                                   gather_across_devices=gather)
    elif tcfg.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=tcfg.mnrl_scale,
                                                         mini_batch_size=tcfg.mini_batch_size,
                                                         gather_across_devices=gather)
    elif tcfg.loss == "triplet":
        loss = losses.TripletLoss(model, triplet_margin=tcfg.triplet_margin)
    else:  # the config schema already restricts the names; kept for direct callers
        raise ValueError(f"unknown train.loss {tcfg.loss!r}")
    if tcfg.matryoshka_dims:
        dim = model.get_embedding_dimension()
        dims = [d for d in tcfg.matryoshka_dims if d <= dim]
        if dims[0] != dim:
            dims = [dim, *dims]
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
