"""Loss construction from config: sentence-transformers' losses wherever one exists.

MNRL, CachedMNRL, Triplet, MarginMSE, DistillKL and Matryoshka are sentence-transformers' own. Two pieces are written
here because sentence-transformers has no equivalent: ``QueryDistillLoss`` (the label-free loss: the query side
distils a teacher's list against a *fixed* document index, so no document is re-encoded) and ``WeightedLossSum``
(``mnrl+margin_mse`` style sums over one shared forward pass).

Distillation (``margin_mse``, ``distill_kl``, and ``mnrl+`` either) reads the teacher columns that data_prep
writes when ``mining.teacher`` is set; :func:`training_dataset` turns them into the one ``label`` column the
sentence-transformers collator passes to the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

DISTILL_LOSSES = ("margin_mse", "distill_kl")
QUERY_LOSSES = ("query_kl", "query_margin_mse", "query_fused")
LABELFREE_COLUMNS = ("query", "candidates", "teacher_scores", "base_scores")
FUSED_COLUMNS = ("positive_row", "bm25_z", "bm25_z_positive", "base_cosine_mean",
                 "base_cosine_std")  # labelfree.positives: cut
# The collator turns a label into a float32 tensor, which holds every integer below 2**24 exactly and no more:
# a corpus row id is written as two parts below it (high, low), exact up to 2**48 rows.
ROW_PART = 1 << 24


def split_rows(rows) -> list[float]:
    """Corpus row ids as label values: ``[high parts (n), low parts (n)]``, each part exact in float32.

    ``row = high * 2**24 + low`` with floor division, so -1 (no row) is ``(-1, 2**24 - 1)``.
    """
    rows = [int(r) for r in rows]
    return [float(r // ROW_PART) for r in rows] + [float(r % ROW_PART) for r in rows]


def join_rows(parts: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_rows` on a label slice ``(batch, 2n)``: int64 row ids ``(batch, n)``."""
    n = parts.shape[-1] // 2
    return parts[..., :n].long() * ROW_PART + parts[..., n:].long()


def distillation_part(loss_name: str) -> str | None:
    """``"margin_mse"`` for ``"mnrl+margin_mse"`` or ``"margin_mse"``; None for losses without a teacher."""
    part = loss_name.split("+")[-1]
    return part if part in DISTILL_LOSSES else None


def training_columns(tcfg, available: list[str]) -> list[str]:
    """The table columns the loss reads, in the order sentence-transformers expects (anchor, positive, negatives):
    every negative column data_prep mined (``mining.num_negatives``; the triplet loss takes the first)."""
    mined = 0
    while f"negative_{mined + 1}" in available:
        mined += 1
    wanted = min(1, mined) if tcfg.loss == "triplet" else mined
    if wanted < 1 and (tcfg.loss == "triplet" or tcfg.loss.endswith(("margin_mse", "distill_kl"))):
        raise ValueError(f"train.loss={tcfg.loss} needs mined negatives, and the table has none: set "
                         "mining.num_negatives >= 1 (and a mining.method other than none)")
    return ["query", "positive", *[f"negative_{i}" for i in range(1, wanted + 1)]]


def training_dataset(table, tcfg, doc_texts: list[str] | None = None, seed: int = 42):
    """The columns the loss reads (:func:`training_columns`), plus a ``label`` column for distillation losses.

    - ``margin_mse``: label = ``margin_mse_scale * (score_positive - score_negative_i)`` for i in 1..k, (k,) per row;
    - ``distill_kl``: label = ``[score_positive, score_negative_1, ..., score_negative_k]``, (k + 1,) per row.
    """
    if is_labelfree_table(table.column_names):
        if tcfg.loss == "query_fused":
            return fused_dataset(table)
        return labelfree_dataset(table, doc_texts, tcfg.query_distill_documents, seed)
    columns = training_columns(tcfg, table.column_names)
    part = distillation_part(tcfg.loss)
    if part is None:
        return table.select_columns(columns)
    negatives = columns[2:]
    score_columns = ["score_positive", *(f"score_{c}" for c in negatives)]
    missing = [c for c in score_columns if c not in table.column_names]
    if missing:
        raise ValueError(f"train.loss={tcfg.loss} needs teacher score columns {missing}; the table has none: set "
                         "mining.teacher (a CrossEncoder folder or hub name) and rerun data_prep")

    def add_label(batch: dict[str, list]) -> dict[str, list]:
        positive = batch["score_positive"]
        if part == "margin_mse":
            labels = [[tcfg.margin_mse_scale * (positive[i] - batch[f"score_{c}"][i]) for c in negatives]
                      for i in range(len(positive))]
        else:
            labels = [[positive[i], *(batch[f"score_{c}"][i] for c in negatives)] for i in range(len(positive))]
        return {"label": labels}

    dataset = table.select_columns(columns + score_columns)
    return dataset.map(add_label, batched=True, remove_columns=score_columns, desc="teacher labels")


def is_labelfree_table(columns: list[str]) -> bool:
    return all(c in columns for c in LABELFREE_COLUMNS)


def labelfree_dataset(table, doc_texts: list[str] | None = None, documents: int = 0, seed: int = 0):
    """``query`` and one ``label`` per row: ``[source row (2), candidate rows (2k), teacher scores (k), base cosines
    (k)]`` (row = a passage's row in the corpus embedding matrix; -1 when the source is unknown), each row id written
    as two values by :func:`split_rows` (high parts, then low parts), so that the collator's float32 tensor keeps
    it exact past 2**24 passages (:func:`join_rows` reads it back).

    With ``documents`` = m > 0 (the symmetric form), each row instead has the texts ``doc_1..doc_m`` of m of its
    candidates (from ``doc_texts``, the corpus in embedding-row order): the teacher's top 2 and m - 2 drawn (seeded)
    from the rest, in rank order; label = ``[source row (2), their rows (2m), candidate rows (2k), teacher scores
    (k)]`` (the whole candidate list: the loss looks up the teacher's score of any passage of the batch in it).
    """
    if documents:
        return symmetric_dataset(table, doc_texts, documents, seed)
    has_source = "source_row" in table.column_names

    def add_label(batch: dict[str, list]) -> dict[str, list]:
        labels = []
        for i in range(len(batch["query"])):
            source = batch["source_row"][i] if has_source else -1
            labels.append([*split_rows([source]), *split_rows(batch["candidates"][i]), *batch["teacher_scores"][i],
                           *batch["base_scores"][i]])
        return {"label": labels}

    dataset = table.map(add_label, batched=True, desc="teacher labels")
    return dataset.select_columns(["query", "label"])


def fused_dataset(table):
    """``query`` and one ``label`` per row for :class:`QueryFusedLoss`: ``[positive row (2), candidate rows (2k),
    BM25 z-scores of the candidates (k), BM25 z-score of the positive (1), the base model's mean and standard
    deviation of the query's cosines over the corpus (2)]`` (rows as :func:`split_rows` writes them; the positive
    row indexes ``labelfree/positive_embeddings.npy``)."""
    missing = [c for c in FUSED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"train.loss=query_fused needs the columns {missing}, which data_prep writes with "
                         "labelfree.positives: cut; set it and rerun data_prep")

    def add_label(batch: dict[str, list]) -> dict[str, list]:
        return {"label": [[*split_rows([p]), *split_rows(rows), *z, z_pos, mean, std]
                          for p, rows, z, z_pos, mean, std in
                          zip(batch["positive_row"], batch["candidates"], batch["bm25_z"], batch["bm25_z_positive"],
                              batch["base_cosine_mean"], batch["base_cosine_std"])]}

    return table.map(add_label, batched=True, desc="fused labels").select_columns(["query", "label"])


def symmetric_dataset(table, doc_texts: list[str], documents: int, seed: int):
    """See :func:`labelfree_dataset` (``documents`` > 0)."""
    rng = np.random.default_rng(seed)

    def add_documents(batch: dict[str, list]) -> dict[str, list]:
        columns: dict[str, list] = {f"doc_{j}": [] for j in range(1, documents + 1)}
        labels = []
        sources = batch["source_row"] if "source_row" in batch else [-1] * len(batch["query"])
        for rows, scores, source in zip(batch["candidates"], batch["teacher_scores"], sources):
            k = len(rows)
            rest = rng.choice(np.arange(2, k), size=min(documents - 2, max(k - 2, 0)), replace=False) if k > 2 else []
            picked = [*range(min(2, k)), *sorted(int(i) for i in rest)]
            picked += [picked[-1]] * (documents - len(picked))  # a short list repeats its last candidate
            for j, position in enumerate(picked, 1):
                columns[f"doc_{j}"].append(doc_texts[rows[position]])
            labels.append([*split_rows([source]), *split_rows(rows[position] for position in picked),
                           *split_rows(rows), *map(float, scores)])
        return {**columns, "label": labels}

    dataset = table.map(add_documents, batched=True, desc="candidate passages")
    return dataset.select_columns(["query", *(f"doc_{j}" for j in range(1, documents + 1)), "label"])


class QueryDistillLoss(nn.Module):
    """Distil a teacher's ranking of each query's candidates into the query side of a bi-encoder.

    The document side is fixed: the base model's corpus embeddings (``doc_embeddings``), so a step encodes queries
    only (short texts: cheap on CPU) and the corpus is encoded once. sentence-transformers' DistillKLDivLoss and
    MarginMSELoss encode every candidate passage in every step instead; this is their query-side form.

    - ``kl``: ``KL(softmax(teacher / teacher_temperature) || softmax(student cosine / student_temperature))`` over
      the k candidates, or with ``over="corpus"`` the student's softmax normalized over the whole corpus (minus the
      query's source passage, which is neither a candidate nor a negative).
    - ``margin_mse``: MSE between the student's and the teacher's candidate scores, each centered per query, the
      teacher's first rescaled to the base model's score range on the same candidates (min-max onto [min, max] of
      the base cosines): MarginMSE over every pair of candidates, on the student's scale.

    Args:
        model: the SentenceTransformer being trained (its output must be comparable with ``doc_embeddings``).
        doc_embeddings: (n_docs, dim) normalized corpus embeddings.
        objective: ``"kl"`` or ``"margin_mse"``.

    Inputs: one text column (the query); label (batch, 2 + 4k) from :func:`labelfree_dataset`. Symmetric form
    (``train.query_distill_documents`` m > 0, ``kl`` only): columns query, doc_1..doc_m, label (batch, 2 + 2m + 3k);
    the student encodes the passages too, so its document side trains. With ``in_batch`` each query's softmax runs
    over every passage of the batch (batch x m, as MNRL's in-batch negatives): the teacher's score of another query's
    passage is its fused score for this query where the passage is among this query's k candidates, else 0 (the
    bottom of the per-query min-max scale: outside both members' top lists); the query's own source passage, where
    the teacher did not score it, is left out. Without it, the softmax runs over the query's own m passages only.
    """

    def __init__(self, model, doc_embeddings: torch.Tensor, objective: str = "kl", student_temperature: float = 0.05,
                 teacher_temperature: float = 0.1, over: str = "candidates", in_batch: bool = True) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("doc_embeddings", doc_embeddings, persistent=False)  # (n_docs, dim)
        self.objective = objective
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.over = over
        self.in_batch = in_batch

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        # the query alone; the symmetric form's candidate columns in one merged forward pass
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        query = torch.nn.functional.normalize(embeddings[0], dim=-1)  # (batch, dim)
        if len(embeddings) > 1:  # symmetric: the candidates were encoded by the student
            return self.symmetric(query, embeddings[1:], labels)
        k = (labels.shape[1] - 2) // 4
        source = join_rows(labels[:, :2])[:, 0]  # (batch,)
        rows = join_rows(labels[:, 2:2 + 2 * k])  # (batch, k)
        teacher = labels[:, 2 + 2 * k:2 + 3 * k]  # (batch, k)
        docs = self.doc_embeddings.to(query.device)
        student = torch.einsum("bd,bkd->bk", query, docs[rows])  # (batch, k) cosines
        if self.objective == "margin_mse":
            base = labels[:, 2 + 3 * k:]  # (batch, k)
            t_low, t_span = teacher.min(1, keepdim=True).values, teacher.max(1, keepdim=True).values
            t_span = (t_span - t_low).clamp_min(1e-6)
            b_low = base.min(1, keepdim=True).values
            b_span = base.max(1, keepdim=True).values - b_low
            target = b_low + (teacher - t_low) / t_span * b_span  # (batch, k) on the base cosines' scale
            return torch.nn.functional.mse_loss(student - student.mean(1, keepdim=True),
                                                target - target.mean(1, keepdim=True))
        if self.over == "corpus":
            everything = query @ docs.T / self.student_temperature  # (batch, n_docs)
            known = source >= 0
            everything[known, source[known]] = float("-inf")  # the source is no negative
            log_norm = torch.logsumexp(everything, dim=1, keepdim=True)  # (batch, 1)
            return self.kl(teacher, student, log_norm)
        return self.kl(teacher, student)

    def symmetric(self, query: torch.Tensor, columns: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        m = len(columns)
        docs = torch.nn.functional.normalize(torch.stack(columns, dim=1), dim=-1)  # (batch, m, dim)
        teacher, unscored = in_batch_teacher(labels, m)
        if not self.in_batch:  # each query's own m passages: the diagonal blocks (all among its candidates)
            own = torch.arange(len(query), device=query.device)
            student = torch.einsum("bd,bmd->bm", query, docs)  # (batch, m) cosines
            return self.kl(teacher.reshape(len(query), len(query), m)[own, own], student)
        student = query @ docs.reshape(-1, docs.shape[-1]).T  # (batch, batch * m) cosines
        student = student.masked_fill(unscored, -1e4 * self.student_temperature)
        teacher = teacher.masked_fill(unscored, -1e4 * self.teacher_temperature)
        return self.kl(teacher, student)

    def kl(self, teacher: torch.Tensor, student: torch.Tensor, log_norm: torch.Tensor | None = None) -> torch.Tensor:
        """KL(teacher softmax || student softmax) per row, averaged; ``log_norm`` (batch, 1) normalizes the student
        (default: over the same row's scores)."""
        target = torch.softmax(teacher / self.teacher_temperature, dim=1)  # (batch, k)
        if log_norm is None:
            log_norm = torch.logsumexp(student / self.student_temperature, dim=1, keepdim=True)
        log_student = student / self.student_temperature - log_norm
        return (target * (torch.log(target.clamp_min(1e-12)) - log_student)).sum(1).mean()


def in_batch_teacher(labels: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, unscored), each (batch, batch * m), from symmetric labels (:func:`labelfree_dataset`): the
    teacher's score of every passage of the batch for every query (its score among the query's candidates, else 0),
    and where a passage is the query's own source that the teacher did not score (left out of the softmax)."""
    k = (labels.shape[1] - 2 - 2 * m) // 3
    source = join_rows(labels[:, :2])[:, 0]  # (batch,)
    rows = join_rows(labels[:, 2:2 + 2 * m]).reshape(-1)  # (batch * m,) the batch's passages, query by query
    candidates = join_rows(labels[:, 2 + 2 * m:2 + 2 * m + 2 * k])  # (batch, k)
    scores = labels[:, 2 + 2 * m + 2 * k:]  # (batch, k), >= 0
    found = candidates[:, :, None] == rows[None, None, :]  # (batch, k, batch * m)
    teacher = (found * scores[:, :, None]).amax(dim=1)
    unscored = (rows[None, :] == source[:, None]) & ~found.any(dim=1)
    return teacher, unscored


class QueryFusedLoss(nn.Module):
    """Train the query side as the dense half of the hybrid it will ship in: the loss sees the fused score.

    Each pseudo-query's candidates (the fused teacher's top k, its uncut source left out) and its positive (the
    source passage with the query cut out, embedded by the base model: an inverse-cloze pair) are scored as the
    deployed weighted fusion scores them (``embtune.retrieval.fusion``, ``corpus_zscore``)::

        fused = w * (cosine - mean) / std + (1 - w) * z_bm25

    with the mean and standard deviation of the student's cosines over the whole fixed corpus index (computed in
    the step, so differentiable, as serve computes them per query), and BM25's z-scores precomputed by data_prep.
    The loss is the cross-entropy of the positive among them (``fused / temperature``). BM25's share is a constant:
    where it already ranks the positive first the gradient is small, where it ranks a wrong passage high the
    student must outscore it, so the student learns what BM25 does not give.

    Args:
        model: the SentenceTransformer being trained.
        doc_embeddings: (n_docs, dim) normalized base-model corpus embeddings (the index the student is fused over).
        positive_embeddings: (n_rows, dim) normalized base-model embeddings of each row's cut passage.
        dense_weight: w, the deploy weight (the probe-chosen teacher's).
        temperature: divides the fused logits.
        stats: "student": mean and std of the student's own cosines (what serve computes); "base": the base
            model's, constants per query, so the student cannot raise its z-scores (its share of the hybrid) by
            narrowing its spread over the corpus: it must move the candidates' cosines themselves.

    Inputs: one text column (the query); label (batch, 5 + 3k) from :func:`fused_dataset`.
    """

    def __init__(self, model, doc_embeddings: torch.Tensor, positive_embeddings: torch.Tensor, dense_weight: float,
                 temperature: float = 1.0, stats: str = "base") -> None:
        super().__init__()
        self.model = model
        self.register_buffer("doc_embeddings", doc_embeddings, persistent=False)  # (n_docs, dim)
        self.register_buffer("positive_embeddings", positive_embeddings, persistent=False)  # (n_rows, dim)
        self.dense_weight = dense_weight
        self.temperature = temperature
        self.stats = stats

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def fused_scores(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + k) fused scores: the positive first, then the candidates."""
        query = torch.nn.functional.normalize(embeddings[0], dim=-1)  # (batch, dim)
        k = (labels.shape[1] - 5) // 3
        positive = join_rows(labels[:, :2])[:, 0]  # (batch,)
        rows = join_rows(labels[:, 2:2 + 2 * k])  # (batch, k)
        bm25 = torch.cat([labels[:, 2 + 3 * k:3 + 3 * k], labels[:, 2 + 2 * k:2 + 3 * k]], dim=1)  # (batch, 1 + k)
        docs = self.doc_embeddings.to(query.device)
        if self.stats == "base":
            mean, std = labels[:, -2:-1], labels[:, -1:].clamp_min(1e-6)
        else:
            everything = query @ docs.T  # (batch, n_docs): the corpus statistics the deployed fusion normalizes by
            mean = everything.mean(1, keepdim=True)
            std = everything.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)  # numpy's std, as ScoreStats
        cosine = torch.cat([(query * self.positive_embeddings.to(query.device)[positive]).sum(-1, keepdim=True),
                            torch.einsum("bd,bkd->bk", query, docs[rows])], dim=1)  # (batch, 1 + k)
        return self.dense_weight * (cosine - mean) / std + (1.0 - self.dense_weight) * bm25

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        fused = self.fused_scores(embeddings, labels) / self.temperature  # (batch, 1 + k)
        target = torch.zeros(len(fused), dtype=torch.long, device=fused.device)  # the positive is column 0
        return torch.nn.functional.cross_entropy(fused, target)


class WeightedLossSum(nn.Module):
    """``sum_i weight_i * loss_i`` on one batch, with the columns embedded once.

    sentence-transformers trains several losses only as one loss per dataset (a dict of losses keyed by dataset
    name); it has no sum of losses over the same rows. Each part must implement
    ``compute_loss_from_embeddings(embeddings, labels)`` (MNRL ignores the labels; MarginMSE/DistillKL read them).
    Returns a tensor, not a dict of components, so that MatryoshkaLoss can wrap it.

    Args:
        model: the SentenceTransformer being trained.
        parts: (loss, weight) pairs.
    """

    def __init__(self, model, parts: list[tuple[nn.Module, float]]) -> None:
        super().__init__()
        self.model = model
        self.parts = nn.ModuleList(loss for loss, _ in parts)
        self.weights = [weight for _, weight in parts]

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)  # [query, positive, negative_1..k], each (batch, dim)
        return sum(weight * loss.compute_loss_from_embeddings(embeddings, labels)
                   for loss, weight in zip(self.parts, self.weights))


def build_query_loss(model, tcfg, doc_embeddings, positive_embeddings=None,
                     dense_weight: float | None = None) -> nn.Module:
    """The label-free loss: ``query_kl`` (also when train.loss is another name), ``query_margin_mse``, or
    ``query_fused`` (which needs the cut passages' embeddings and the deploy weight)."""
    if tcfg.loss == "query_fused":
        return QueryFusedLoss(model, torch.as_tensor(doc_embeddings, dtype=torch.float32),
                              torch.as_tensor(positive_embeddings, dtype=torch.float32), dense_weight,
                              tcfg.query_fused_temperature, tcfg.query_fused_stats)
    return QueryDistillLoss(model, torch.as_tensor(doc_embeddings, dtype=torch.float32),
                            objective="margin_mse" if tcfg.loss == "query_margin_mse" else "kl",
                            student_temperature=tcfg.query_student_temperature,
                            teacher_temperature=tcfg.query_teacher_temperature, over=tcfg.query_distill_over,
                            in_batch=tcfg.query_distill_in_batch)


def build_loss(model, tcfg) -> Any:
    """MNRL (in-batch + mined negatives), its GradCache form, TripletLoss, MarginMSE, DistillKL or MNRL + a
    distillation loss; in MatryoshkaLoss when dims are set.

    ``gather_across_devices`` makes MNRL score each process's queries against the documents of every process
    (an all-gather with gradients), so the in-batch negatives are the global batch under DDP.
    MatryoshkaLoss supports the cached losses upstream: it truncates the cached embeddings instead of re-running
    the model per dim.
    """
    from accelerate import PartialState
    from sentence_transformers.sentence_transformer import losses

    gather = tcfg.gather_across_devices and PartialState().num_processes > 1  # one process: nothing to gather
    distill = None
    if distillation_part(tcfg.loss) == "margin_mse":
        distill = losses.MarginMSELoss(model)  # dot product = cosine on a normalized model
    elif distillation_part(tcfg.loss) == "distill_kl":
        # Student scores on MNRL's scale (cosine * mnrl_scale), teacher logits at their own temperature.
        distill = losses.DistillKLDivLoss(model, student_temperature=1 / tcfg.mnrl_scale,
                                          teacher_temperature=tcfg.distill_teacher_temperature)
    if tcfg.loss == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=tcfg.mnrl_scale,
                                                   gather_across_devices=gather)
    elif tcfg.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=tcfg.mnrl_scale,
                                                         mini_batch_size=tcfg.mini_batch_size,
                                                         gather_across_devices=gather)
    elif tcfg.loss == "triplet":
        loss = losses.TripletLoss(model, triplet_margin=tcfg.triplet_margin)
    elif tcfg.loss in DISTILL_LOSSES:
        loss = distill
    elif tcfg.loss.startswith("mnrl+") and distill is not None:
        mnrl = losses.MultipleNegativesRankingLoss(model, scale=tcfg.mnrl_scale, gather_across_devices=gather)
        loss = WeightedLossSum(model, [(mnrl, 1.0),
                                       (distill, tcfg.distill_weight)])
    else:  # the config schema already restricts the names; kept for direct callers
        raise ValueError(f"unknown train.loss {tcfg.loss!r}")
    if tcfg.matryoshka_dims:
        dim = model.get_embedding_dimension()
        dims = [d for d in tcfg.matryoshka_dims if d <= dim]
        if dims[0] != dim:
            dims = [dim, *dims]
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
