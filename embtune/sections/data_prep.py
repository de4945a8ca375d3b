"""Config sections owned by the data_prep stage: ``data``, ``chunking`` and ``mining``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal


@dataclass
class DataConfig:
    """Where the corpus, queries and qrels come from.

    ``format``:
      - ``beir``: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``);
      - ``parquet``: a BEIR folder whose corpus is Parquet (``corpus.parquet`` or ``corpus/*.parquet``, columns
        ``_id``, ``text``, optional ``title``): data_prep streams it once into a JSONL store that the Ray engine
        reads by row (docs/scale.md);
      - ``files``: a folder of your own ``.txt`` / ``.md`` / ``.rst`` / ``.html`` documents (``path``, ``glob``);
      - ``table``: a CSV, TSV, Parquet or JSONL file of documents (``id_column``, ``text_column``, ``title_column``);
      - ``hf``: a ``datasets`` dataset, saved with ``save_to_disk`` or a hub name (``split``, same column keys);
      - ``jsonl``: a JSONL file of pairs (``pairs_file``, with ``query``/``positive`` fields);
      - ``hf_disk``: a ``datasets`` table of pairs saved with ``save_to_disk`` (``pairs_file``), same columns;
      - ``pydoc``: the embedded demo corpus, built offline from the Python standard library's docstrings.
    ``files``, ``table`` and ``hf`` bring documents only (data_prep/sources.py): ``queries: auto`` then takes the
    label-free route.
    """

    # beir | parquet | files | table | hf read your corpus; jsonl | hf_disk read (query, positive) pairs; pydoc is
    # the demo.
    format: Literal["beir", "parquet", "files", "table", "hf", "jsonl", "hf_disk", "pydoc"] = "beir"
    # The BEIR folder (beir), the documents folder (files), the table file (table), or a saved dataset or hub name.
    path: str = ""
    pairs_file: str = ""
    train_split: str = "train"
    glob: str = "**/*"  # files: which files under data.path are read (recursive; .txt .md .rst .html)
    # table / hf: the columns holding each document's id, text and (optional, "" = none) title.
    id_column: str = "id"
    text_column: str = "text"
    title_column: str = ""
    split: str = "train"  # hf: the dataset split holding the documents
    # Where training queries come from: ``labelled`` (the dataset's train split), ``synthetic`` (written by the
    # LLM of the ``llm`` section for the corpus' passages; the dataset's labelled queries are then used only for
    # the dev split and eval), ``labelled+synthetic`` (the train split's pairs and the LLM's queries in one
    # table: a small labelled set plus questions in the users' own words; docs/synthesis.md) or ``labelfree``
    # (pseudo-queries cut from the corpus, labelled by a fused dense + BM25 teacher: section ``labelfree``,
    # docs/labelfree.md; needs only ``corpus.jsonl``). ``auto``: labelfree for files / table / hf and for a BEIR
    # folder with a corpus alone (no queries to train on), else labelled.
    queries: Literal["auto", "labelled", "synthetic", "labelled+synthetic", "labelfree"] = "auto"
    # Queries carved out of the train split (seeded) to choose settings on; never the test split.
    dev_fraction: float = 0.0
    on_error: Literal["raise", "skip"] = "raise"
    # pydoc demo corpus size limits
    max_documents: int = 0

    # One seed per recipe: the top-level ``seed`` (dev split, samples, mining, training).
    moved_keys: ClassVar[dict[str, str]] = {"seed": "seed"}

    def __post_init__(self) -> None:
        # Resolved where the recipe is built, so every stage (and every fingerprint) sees the route taken.
        if self.queries == "auto":
            self.queries = "labelfree" if self.format in ("files", "table", "hf") or self._corpus_alone() else \
                "labelled"

    def _corpus_alone(self) -> bool:
        """A BEIR folder with a corpus (corpus.jsonl, or Parquet for format parquet) and neither queries.jsonl nor
        qrels/: nothing labelled to train on."""
        folder = Path(self.path) if self.format in ("beir", "parquet") and self.path else None
        corpus = folder is not None and ((folder / "corpus.jsonl").is_file() if self.format == "beir" else
                                         (folder / "corpus.parquet").is_file() or (folder / "corpus").is_dir())
        return bool(corpus and not (folder / "queries.jsonl").exists() and not (folder / "qrels").exists())

    def validate(self) -> None:
        what = {"beir": "a BEIR folder", "parquet": "a BEIR folder with corpus.parquet",
                "files": "a folder of documents", "table": "a CSV/TSV/Parquet/JSONL file",
                "hf": "a saved dataset folder or a hub dataset name"}
        if self.format in what and not self.path:
            raise ValueError(f"data.path must name {what[self.format]} when data.format is '{self.format}' "
                             "(`embtune init DIR` writes a recipe for a folder or file)")
        if self.format in ("files", "table", "hf") and self.queries in ("labelled", "labelled+synthetic"):
            raise ValueError(f"data.queries={self.queries} needs labelled queries, which data.format "
                             f"'{self.format}' does not have: use labelfree (or auto) or synthetic")
        if self.format in ("table", "hf") and not (self.id_column and self.text_column):
            raise ValueError("data.id_column and data.text_column must name the table's id and text columns")
        if self.format in ("jsonl", "hf_disk") and not self.pairs_file:
            raise ValueError(f"data.pairs_file must be set when data.format is '{self.format}'")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError("data.dev_fraction must be in [0, 1)")


@dataclass
class ChunkingConfig:
    """Split long documents into token windows before mining/training (0 = off)."""

    max_tokens: int = 0
    overlap: int = 32
    tokenizer: str = ""  # defaults to train.base_model's tokenizer

    def validate(self) -> None:
        if self.max_tokens and self.overlap >= self.max_tokens:
            raise ValueError("chunking.overlap must be smaller than chunking.max_tokens")


@dataclass
class MiningConfig:
    """Hard-negative mining: retrieve candidates, apply false-negative guards, pick negatives (see docs/mining.md).

    Guard scores are the retriever's own: BM25 scores for ``bm25``, cosine similarity for ``dense`` and for
    ``hybrid`` (a fused RRF score is rank-based and a weighted one mixes two scales, so neither can be compared with
    a positive's score). ``random`` draws guarded documents uniformly. ``data_prep.mining.mine_negatives`` takes
    this section.
    """

    method: Literal["bm25", "dense", "hybrid", "random", "none"] = "bm25"
    num_negatives: int = 1
    # 0-based rank window [rank_start, rank_end) over the retriever's ranking that negatives are drawn from.
    rank_start: int = 0
    rank_end: int = 100
    sampling: Literal["top", "random"] = "top"
    # Title + text is what is indexed for BM25 and what the model sees as a document.
    include_title: bool = True
    # A query whose window runs short: fill with random guarded documents (counted), or drop the query (counted).
    on_short: Literal["random", "drop"] = "random"

    # BM25 (method bm25 or hybrid) is the top-level ``bm25`` section, shared with eval and serve.

    # Dense: the encoder ("" = train.base_model), embeddings cached on disk by model and corpus hash.
    model: str = ""
    batch_size: int = 64
    max_seq_length: int = 0  # 0 = the model's own
    faiss_index: Literal["flat", "ivf"] = "flat"
    ivf_nlist: int = 0  # 0 = 4 * sqrt(documents)
    ivf_nprobe: int = 16

    # Hybrid: each retriever returns candidate_depth documents (0 = rank_end), fused by the core's RRF or its
    # weighted formula (embtune.retrieval.fusion; dense share dense_weight / (dense_weight + bm25_weight)).
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = 60
    bm25_weight: float = 0.5
    dense_weight: float = 0.5
    candidate_depth: int = 0

    # False-negative guards (None = off). A candidate is dropped when score >= positive score - |positive score|
    # * margin (within margin of the positive, whatever the score's sign), or when score > max_score.
    margin: float | None = None
    max_score: float | None = None

    # Teacher: a CrossEncoder (folder or hub name) scoring (query, positive) and (query, negative_i); adds the
    # columns score_positive, score_negative_1..k. Its guards drop a candidate whose teacher score is
    # > teacher score of the positive - teacher_margin, or > teacher_max_score.
    # "hybrid" instead selects the label-free teacher data_prep.teacher.HybridTeacher: the core's fusion of the dense
    # mining model (mining.model or train.base_model) and BM25 at 1 : teacher_bm25_weight, on the cosine's scale.
    teacher: str = ""
    teacher_bm25_weight: float = 1.0
    teacher_batch_size: int = 32
    teacher_max_length: int = 512
    teacher_margin: float | None = None
    teacher_max_score: float | None = None
    # Audit: this many kept negatives (seeded sample) are compared with their positive under the teacher.
    audit_size: int = 200
    audit_threshold: float | None = None  # also count audited negatives whose teacher score is >= this
    # A random draw (sampling: random, random fills, the audit sample) is seeded by the recipe's ``seed``.
    moved_keys: ClassVar[dict[str, str]] = {"seed": "seed"}

    def validate(self) -> None:
        if self.num_negatives < 0:
            raise ValueError("mining.num_negatives must be >= 0")
        if not 0 <= self.rank_start < self.rank_end:
            raise ValueError("mining.rank_start must be >= 0 and < mining.rank_end")
        if self.margin is not None and not 0.0 <= self.margin < 1.0:
            raise ValueError(f"mining.margin must be in [0, 1) (or null to turn it off), got {self.margin}")
        if self.method == "hybrid" and (self.bm25_weight < 0 or self.dense_weight < 0
                                        or self.bm25_weight + self.dense_weight <= 0):
            raise ValueError("mining.bm25_weight and mining.dense_weight must be >= 0 and not both 0")
        if self.candidate_depth and self.candidate_depth < self.rank_end:
            raise ValueError("mining.candidate_depth must be 0 or >= mining.rank_end")
        if (self.teacher_margin is not None or self.teacher_max_score is not None) and not self.teacher:
            raise ValueError("mining.teacher_margin / mining.teacher_max_score need mining.teacher to be set")
        if self.teacher_bm25_weight < 0:
            raise ValueError(f"mining.teacher_bm25_weight must be >= 0, got {self.teacher_bm25_weight}")
        if self.ivf_nprobe < 1 or self.ivf_nlist < 0:
            raise ValueError("mining.ivf_nprobe must be >= 1 and mining.ivf_nlist >= 0")


@dataclass
class LabelFreeConfig:
    """Label-free distillation data (``data.queries: labelfree``, docs/labelfree.md).

    Pseudo-queries are cut from the corpus (a passage's title and some of its sentences); the teacher is the fused
    ``dense_weight * dense + (1 - dense_weight) * BM25`` retriever over per-query min-max scores (the fusion eval
    measures and serve serves) and labels each query's top ``depth`` candidates with its scores.
    """

    # Passages to cut queries from (seeded sample: seed); 0 = every passage. The cap bounds the run on a large
    # corpus (up to ~50k queries, ~25 min of query-side training on 2 CPU cores); a smaller corpus gives all of it.
    documents: int = 10000
    # Where the pseudo-queries come from: "cut" (titles and sentences cut from passages), "llm" (one query per
    # passage written by the ``llm`` section's model, for a seeded sample of ``llm.documents`` passages), or "both".
    query_source: Literal["cut", "llm", "both"] = "cut"
    # The round trip of an LLM-written query: kept only when the teacher ranks its passage in its top this many
    # (0 keeps every one). The ``llm`` section's own round_trip keys are for data.queries: synthetic.
    round_trip_k: int = 10
    # How an LLM query's passage, its answer, is labelled: "teacher", as the teacher ranks it, like any candidate;
    # "first": its label is set a tenth of the teacher's range above the teacher's top candidate, so the student
    # learns the teacher's ranking of the rest and that the answer comes first. "dense_first": the same over the
    # base model's own cosines instead of the teacher's scores (the teacher still picks the candidates and runs the
    # round trip), so what the student learns beyond the base model is the answers, not BM25's half of the teacher.
    llm_answer: Literal["teacher", "first", "dense_first"] = "teacher"
    # Sentences cut per passage (besides its title, when ``titles`` and the passage has one).
    sentences_per_document: int = 4
    titles: bool = True
    # A sentence becomes a query only with this many words (shorter ones say little, longer ones are paragraphs).
    min_words: int = 6
    max_words: int = 40
    # [lo, hi]: each sentence cut down to a random run of lo..hi consecutive words (a shorter, query-like span);
    # [] = whole sentences.
    span_words: list[int] = field(default_factory=list)
    # The passage a query was cut from contains it verbatim: "drop" removes it from the query's candidates (the
    # teacher then teaches which *other* passages answer it), "keep" leaves it where the teacher ranks it.
    source: Literal["drop", "keep"] = "drop"
    # "cut": each pseudo-query also gets its passage with the query cut out (the inverse-cloze positive, as the
    # probe cuts it), encoded by the base model, and every candidate's BM25 z-score over the corpus: what
    # train.loss query_fused reads. "none": the fused teacher's labels alone (query_kl / query_margin_mse).
    positives: Literal["none", "cut"] = "none"
    # Candidates per query that the teacher scores (and the loss sees).
    depth: int = 32
    # The teacher's dense weight; null = chosen per corpus without labels by the inverse-cloze probe below.
    dense_weight: float | None = None
    # Probe: queries cut from passages whose text the probe removes from the passage (a sentence, or the title),
    # so that neither retriever can match the query verbatim; each candidate weight fuses dense and BM25 and the
    # one that finds the passage best (MRR@10) is the teacher's.
    probe_queries: int = 600
    # At most this share of the passages becomes probe passages (held out of pseudo-query cutting), so that a small
    # corpus keeps passages to train on.
    probe_max_share: float = 0.25
    probe_weights: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                                1.0])
    # Never lose (docs/labelfree.md, "The decision"): a student is trained only when the probe's teacher beats the
    # dense model alone by this many MRR@10 points; below it the base model is kept.
    min_headroom: float = 5.0
    # After training, a student row ships only when it beats the same row built on the base model, on the probe,
    # by this many MRR@10 points.
    min_student_gain: float = 1.0
    # Tokenizer fit, on this many seeded passages: above either share the base model cannot read the corpus, and
    # BM25 becomes the teacher and the shipped retriever (no student).
    fit_documents: int = 200
    max_unknown_share: float = 0.05
    max_single_letter_share: float = 0.5
    # A teacher you bring (docs/labelfree.md, "Bringing a teacher"): a CrossEncoder folder or hub name that scores
    # each pseudo-query's candidates (the fused teacher's top depth + 1); "" = the probe-chosen fusion alone.
    teacher: str = ""
    # The cross-encoder's share of the label: weight * z(cross-encoder) + (1 - weight) * z(fusion), z-scores over
    # the candidates; 1 = the cross-encoder alone.
    teacher_weight: float = 1.0
    teacher_batch_size: int = 32
    teacher_max_length: int = 512

    def validate(self) -> None:
        if self.documents < 0 or self.sentences_per_document < 0:
            raise ValueError("labelfree.documents and labelfree.sentences_per_document must be >= 0")
        if self.query_source != "llm" and not self.titles and self.sentences_per_document == 0:
            raise ValueError("labelfree: no query source: set titles: true or sentences_per_document > 0")
        if not 0 < self.min_words <= self.max_words:
            raise ValueError("labelfree.min_words must be > 0 and <= labelfree.max_words")
        if self.span_words and not (len(self.span_words) == 2 and 0 < self.span_words[0] <= self.span_words[1]):
            raise ValueError(f"labelfree.span_words must be [] or [lo, hi] with 0 < lo <= hi, got {self.span_words}")
        if self.round_trip_k < 0:
            raise ValueError(f"labelfree.round_trip_k must be >= 0 (0: keep every LLM query), got {self.round_trip_k}")
        if self.depth < 2:
            raise ValueError(f"labelfree.depth must be >= 2, got {self.depth}")
        if self.positives == "cut" and self.source != "drop":
            raise ValueError("labelfree.positives: cut needs labelfree.source: drop (the uncut source passage holds "
                             "the query verbatim: it is neither the positive nor a negative)")
        if self.dense_weight is not None and not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(f"labelfree.dense_weight must be in [0, 1] (or null: chosen per corpus), "
                             f"got {self.dense_weight}")
        if not 0.0 < self.probe_max_share < 1.0:
            raise ValueError(f"labelfree.probe_max_share must be in (0, 1), got {self.probe_max_share}")
        if self.min_headroom < 0 or self.min_student_gain < 0 or self.fit_documents < 1:
            raise ValueError("labelfree.min_headroom and labelfree.min_student_gain must be >= 0, "
                             "labelfree.fit_documents >= 1")
        if not 0.0 <= self.max_unknown_share <= 1.0 or not 0.0 <= self.max_single_letter_share <= 1.0:
            raise ValueError("labelfree.max_unknown_share and labelfree.max_single_letter_share must be in [0, 1]")
        if not self.probe_weights or any(not 0.0 <= w <= 1.0 for w in self.probe_weights):
            raise ValueError("labelfree.probe_weights must be a non-empty list of weights in [0, 1]")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"labelfree.teacher_weight must be in [0, 1] (1 = the cross-encoder alone), "
                             f"got {self.teacher_weight}")
        if self.teacher_batch_size < 1 or self.teacher_max_length < 1:
            raise ValueError("labelfree.teacher_batch_size and labelfree.teacher_max_length must be >= 1")
