import json

import pytest

from embtune.data_prep.pydoc_corpus import build_pydoc_beir
from embtune.dataio import load_beir


@pytest.mark.slow
def test_demo_dataset_is_valid_beir_and_queries_are_not_in_their_documents(tmp_path):
    folder = build_pydoc_beir(tmp_path / "pydoc", max_documents=400, test_queries=50)
    train = load_beir(folder, "train")
    test = load_beir(folder, "test")
    assert len(test.qrels) == 50 and len(train.qrels) == 350
    assert not set(train.qrels) & set(test.qrels)
    for qid, docs in train.qrels.items():
        (doc_id,) = docs
        # the summary line (query) was removed from the document text
        assert train.queries[qid] not in train.corpus[doc_id]["text"]
    again = build_pydoc_beir(tmp_path / "again", max_documents=400, test_queries=50)
    assert (again / "corpus.jsonl").read_text() == (folder / "corpus.jsonl").read_text()  # deterministic
    first = json.loads((folder / "corpus.jsonl").read_text().splitlines()[0])
    assert "." in first["title"]  # a qualified name like module.function
