import random

from embtune.data_prep.mining import mine_negatives, normalized_hash


def make_corpus(n=60, seed=0):
    rng = random.Random(seed)
    words = "apple banana cherry grape lemon mango melon olive peach pear plum".split() + [f"w{i}" for i in range(300)]
    corpus = {f"d{i}": {"title": "", "text": " ".join(rng.choice(words) for _ in range(12))} for i in range(n)}
    # near-duplicates of d0 under other ids: same text up to case and punctuation
    corpus["dup-a"] = {"title": "", "text": corpus["d0"]["text"].upper() + "!"}
    corpus["dup-b"] = {"title": "", "text": " , ".join(corpus["d0"]["text"].split())}
    return corpus


def test_negatives_are_never_positives_nor_duplicates_of_them():
    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries = {f"q{i}": corpus[f"d{i}"]["text"][:30] for i in range(20)}
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 20}": 1} for i in range(20)}
    rows, report = mine_negatives(corpus, queries, qrels, texts, num_negatives=5, rank_start=0, rank_end=40)
    assert len(rows) == 40  # one row per (query, positive)
    for row in rows:
        positives = set(qrels[row["query_id"]])
        positive_hashes = {normalized_hash(texts[p]) for p in positives}
        for n in range(1, 6):
            neg_id = row[f"negative_{n}_id"]
            assert neg_id not in positives
            assert normalized_hash(texts[neg_id]) not in positive_hashes
            assert row[f"negative_{n}"] == texts[neg_id]
    q0_negs = {row[f"negative_{n}_id"] for row in rows if row["query_id"] == "q0" for n in range(1, 6)}
    assert not q0_negs & {"dup-a", "dup-b"}
    assert report.dropped["positive"] > 0 and report.dropped["duplicate_of_positive"] > 0


def test_rank_window_is_respected():
    from embtune.data_prep.mining import bm25_rankings

    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    doc_ids = list(corpus)
    queries = {"q": "apple banana cherry"}
    qrels = {"q": {"d59": 1}}
    ranking = [doc_ids[i] for i in bm25_rankings([texts[d] for d in doc_ids], ["apple banana cherry"], 50)[0]]
    rows, _ = mine_negatives(corpus, queries, qrels, texts, num_negatives=3, rank_start=10, rank_end=20)
    allowed = [d for d in ranking[10:20] if d != "d59"]
    assert [rows[0][f"negative_{n}_id"] for n in (1, 2, 3)] == allowed[:3]


def test_random_sampling_is_seeded_and_in_window():
    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries, qrels = {"q": "plum peach"}, {"q": {"d1": 1}}
    a, _ = mine_negatives(corpus, queries, qrels, texts, num_negatives=4, rank_end=30, sampling="random", seed=1)
    b, _ = mine_negatives(corpus, queries, qrels, texts, num_negatives=4, rank_end=30, sampling="random", seed=1)
    assert a == b


def test_short_window_is_filled_and_counted():
    corpus = make_corpus(n=10)
    texts = {d: doc["text"] for d, doc in corpus.items()}
    rows, report = mine_negatives(corpus, {"q": "apple"}, {"q": {"d1": 1}}, texts, num_negatives=4,
                                  rank_start=0, rank_end=2)
    assert report.short_queries == 1 and report.filled_random >= 2
    assert "d1" not in {rows[0][f"negative_{n}_id"] for n in range(1, 5)}


def test_the_mining_section_drives_the_same_mining_as_keywords():
    """``mine_negatives(..., config)`` with the mining section mines what the keyword form does (guards included)."""
    from embtune.sections.data_prep import MiningConfig

    corpus = make_corpus()
    texts = {d: doc["text"] for d, doc in corpus.items()}
    queries = {f"q{i}": corpus[f"d{i}"]["text"][:30] for i in range(20)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(20)}
    config = MiningConfig(num_negatives=3, rank_start=1, rank_end=25, sampling="random", margin=0.9)
    by_config, report = mine_negatives(corpus, queries, qrels, texts, config, seed=7)
    by_keywords, _ = mine_negatives(corpus, queries, qrels, texts, num_negatives=3, rank_start=1, rank_end=25,
                                    sampling="random", seed=7, margin=0.9)
    assert by_config == by_keywords and len(by_config) == 20
    assert report.dropped["margin"] > 0  # the section's guard was applied
