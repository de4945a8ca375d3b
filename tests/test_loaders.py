import json
from pathlib import Path

import pytest

from embtune.config import InputError
from embtune.dataio import DataError, load_beir, load_pairs_jsonl


def write_beir(folder, corpus_lines, query_lines, qrels_lines):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(query_lines) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels_lines) + "\n")
    return folder


GOOD_DOCS = [json.dumps({"_id": "d1", "title": "t", "text": "alpha"}), json.dumps({"_id": "d2", "text": "beta"})]
GOOD_QUERIES = [json.dumps({"_id": "q1", "text": "alpha?"}), json.dumps({"_id": "q2", "text": "beta?"})]
GOOD_QRELS = ["q1\td1\t1", "q2\td2\t1"]


def test_good_folder_loads(tmp_path):
    data = load_beir(write_beir(tmp_path, GOOD_DOCS, GOOD_QUERIES, GOOD_QRELS), "train")
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert data.corpus["d1"] == {"title": "t", "text": "alpha"}
    assert data.report.total == 0


CASES = {
    "malformed JSON": (GOOD_DOCS + ['{"_id": "d3", "text": '], GOOD_QUERIES, GOOD_QRELS,
                       "corpus.jsonl:3", "malformed JSON"),
    "missing _id": (GOOD_DOCS + [json.dumps({"text": "gamma"})], GOOD_QUERIES, GOOD_QRELS,
                    "corpus.jsonl:3", "missing '_id'"),
    "duplicate id": (GOOD_DOCS + [json.dumps({"_id": "d1", "text": "again"})], GOOD_QUERIES, GOOD_QRELS,
                     "corpus.jsonl:3", "duplicate document id 'd1' \\(first at line 1\\)"),
    "empty document": (GOOD_DOCS + [json.dumps({"_id": "d3", "title": "", "text": "  "})], GOOD_QUERIES, GOOD_QRELS,
                       "corpus.jsonl:3", "empty title and text"),
    "empty query": (GOOD_DOCS, GOOD_QUERIES + [json.dumps({"_id": "q3", "text": ""})], GOOD_QRELS,
                    "queries.jsonl:3", "query 'q3' has empty text"),
    "unknown query": (GOOD_DOCS, GOOD_QUERIES, GOOD_QRELS + ["q9\td1\t1"], "train.tsv:4", "unknown query 'q9'"),
    "unknown document": (GOOD_DOCS, GOOD_QUERIES, GOOD_QRELS + ["q1\td9\t1"], "train.tsv:4", "unknown document 'd9'"),
    "bad qrels row": (GOOD_DOCS, GOOD_QUERIES, GOOD_QRELS + ["q1 d2 1"], "train.tsv:4", "3 tab-separated columns"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_with_file_and_line(tmp_path, case):
    docs, queries, qrels, where, message = CASES[case]
    folder = write_beir(tmp_path, docs, queries, qrels)
    with pytest.raises(DataError, match=rf"{where}: .*{message}"):
        load_beir(folder, "train")


@pytest.mark.parametrize("case", CASES)
def test_skip_policy_counts_what_it_skipped(tmp_path, case):
    docs, queries, qrels, where, _ = CASES[case]
    data = load_beir(write_beir(tmp_path, docs, queries, qrels), "train", on_error="skip")
    assert data.report.total == 1
    (reason,) = data.report.skipped
    assert any(where in example for example in data.report.examples[reason])
    # the good rows are all kept
    assert set(data.qrels) == {"q1", "q2"} and {"d1", "d2"} <= set(data.corpus)


def test_missing_file_is_named(tmp_path):
    folder = write_beir(tmp_path, GOOD_DOCS, GOOD_QUERIES, GOOD_QRELS)
    with pytest.raises(DataError, match="qrels/test.tsv: file not found"):
        load_beir(folder, "test")


def test_jsonl_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"query": "what is alpha", "positive": "alpha is a letter"},
            {"query": "what is beta", "positive": "beta is a letter"},
            {"query": "alpha again", "positive": "alpha is a letter"},
            {"query": "", "positive": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:4: field 'query' is missing or empty"):
        load_pairs_jsonl(path)
    data = load_pairs_jsonl(path, on_error="skip")
    assert len(data.corpus) == 2  # the shared passage is one document
    assert len(data.qrels) == 3 and data.report.skipped["empty query"] == 1


def test_data_format_parquet_mines_what_the_beir_folder_mines(tmp_path, tiny_beir, tiny_model_dir):
    """data.format: parquet (corpus/ as Parquet parts beside queries.jsonl and qrels/) is streamed into a BEIR
    folder under the run, and data_prep gives the training rows the JSONL folder gives; eval reads that folder."""
    from datasets import load_from_disk

    from embtune.data_prep.run import run as run_data_prep
    from embtune.schema import load_config
    from tests.conftest import parquet_twin

    twin = parquet_twin(tiny_beir, tmp_path / "pq")
    tables, outputs = [], []
    for fmt, folder in (("beir", tiny_beir), ("parquet", twin)):
        cfg = load_config(None, [f"run_dir={tmp_path / fmt}", f"data.format={fmt}", f"data.path={folder}",
                                 f"train.base_model={tiny_model_dir}", "mining.num_negatives=2",
                                 "tracking.report_to=none"])
        outputs.append(run_data_prep(cfg))
        tables.append(load_from_disk(str(outputs[-1]["train_table"])).to_list())
    assert len(tables[0]) > 0 and tables[0] == tables[1]
    converted = Path(outputs[1]["eval_dataset"])
    assert converted == tmp_path / "parquet" / "data_prep" / "dataset"
    assert (converted / "corpus.jsonl").read_text().count("\n") == 72
    assert (converted / "qrels" / "test.tsv").read_bytes() == (tiny_beir / "qrels" / "test.tsv").read_bytes()

    (twin / "corpus" / "part-0.parquet").unlink()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"], "text": ["y"]}), twin / "corpus" / "part-0.parquet")
    cfg = load_config(None, [f"run_dir={tmp_path / 'bad'}", "data.format=parquet", f"data.path={twin}",
                             f"train.base_model={tiny_model_dir}", "tracking.report_to=none"])
    with pytest.raises(InputError, match="part-0.parquet: a corpus part needs columns '_id' and 'text'"):
        run_data_prep(cfg)


def test_a_parquet_corpus_alone_takes_the_label_free_route(tmp_path, tiny_beir):
    """data.queries: auto on a Parquet corpus without queries or qrels is label-free, and its fingerprint reads
    the corpus alone; with queries and qrels it is labelled."""
    import shutil

    from embtune.data_prep.run import data_files
    from embtune.schema import load_config
    from tests.conftest import parquet_twin

    folder = parquet_twin(tiny_beir, tmp_path / "pq")
    assert load_config(None, ["data.format=parquet", f"data.path={folder}"]).data.queries == "labelled"
    (folder / "queries.jsonl").unlink()
    shutil.rmtree(folder / "qrels")
    cfg = load_config(None, ["data.format=parquet", f"data.path={folder}"])
    assert cfg.data.queries == "labelfree"
    assert data_files(cfg) == {"corpus": str(folder / "corpus")}
