"""Your own documents: ``data.format`` files / table / hf read into a corpus, and ``embtune init`` on a folder of
Markdown files through the pipeline to a bundle that ``serve up`` answers."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from embtune.config import InputError
from embtune.dataio import LoadReport
from embtune.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false"}

TOPICS = {
    "install": "Installing the widget server requires Python and a database. Run the installer, then set the port.",
    "backup": "Backups of the widget database are taken nightly. Restore one with the restore command and a date.",
    "auth": "Authentication uses API tokens. Create a token on the settings page and send it in a request header.",
    "logging": "Logs are written to the log directory. Rotate them weekly and raise the level to debug for errors.",
    "scaling": "Scale the widget server horizontally behind a load balancer. Each replica shares one database.",
    "upgrade": "Upgrading between major versions needs a migration. Stop the server, migrate, then start it again.",
}


def markdown_folder(root: Path) -> Path:
    folder = root / "my docs"
    (folder / "guides").mkdir(parents=True)
    for i, (name, text) in enumerate(TOPICS.items()):
        more = " ".join(f"The {name} guide explains step {j} of the {name} procedure for operators of the service."
                        for j in range(6))
        path = folder / ("guides/" if i % 2 else "") / f"{name}.md"
        path.write_text(f"# {name.title()} guide\n\n{text}\n\n{more}\n")
    return folder


def test_files_format_reads_markdown_rst_html_with_ids_and_titles(tmp_path):
    from embtune.data_prep.sources import read_files

    folder = markdown_folder(tmp_path)
    (folder / "faq.html").write_text("<html><head><title>Widget FAQ</title><script>var hidden = 1;</script></head>"
                                     "<body><h1>FAQ</h1><p>Reset a password with the <b>reset</b> link.</p></body>"
                                     "</html>")
    (folder / "notes.rst").write_text("Release notes\n=============\n\nVersion two adds tokens.\n")
    (folder / "notes").write_text("no suffix: skipped and counted")
    (folder / "plain.txt").write_text("Just text, no heading.")
    report = LoadReport()
    docs = {doc_id: (title, text) for doc_id, title, text in read_files(folder, "**/*", report)}
    assert docs["guides/backup.md"][0] == "Backup guide"  # id = relative path, title = first heading
    assert docs["faq.html"] == ("Widget FAQ", "FAQ\nReset a password with the\nreset\nlink.")  # no script text
    assert docs["notes.rst"][0] == "Release notes"
    assert docs["plain.txt"][0] == "plain"  # no heading: the file name
    assert "notes" not in docs and report.skipped["unsupported file type (none)"] == 1
    only_md = {doc_id for doc_id, _, _ in read_files(folder, "guides/*.md", LoadReport())}
    assert only_md == {"guides/backup.md", "guides/logging.md", "guides/upgrade.md"}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_format_reads_the_configured_columns(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embtune.data_prep.sources import read_rows, table_batches

    rows = [{"doc": "007", "body": "first, with a comma", "heading": "One"},
            {"doc": "8", "body": "second", "heading": "Two"},
            {"doc": "007", "body": "a duplicate id", "heading": "Three"}]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        quote = (lambda v: f'"{v}"') if sep == "," else (lambda v: v)
        path.write_text(sep.join(rows[0]) + "\n" + "".join(sep.join(quote(v) for v in r.values()) + "\n"
                                                            for r in rows))
    report = LoadReport()
    docs = list(read_rows(table_batches(path, batch_rows=2), str(path), "doc", "body", "heading", report))
    assert docs == [("007", "One", "first, with a comma"), ("8", "Two", "second")]
    assert report.skipped["duplicate id"] == 1
    with pytest.raises(InputError, match="no column data.text_column='text'"):
        list(read_rows(table_batches(path), str(path), "doc", "text", "", LoadReport()))


def test_hf_format_reads_a_saved_dataset_split(tmp_path):
    import datasets

    from embtune.data_prep.sources import hf_batches, read_rows

    datasets.DatasetDict({"corpus": datasets.Dataset.from_list([{"id": "a", "text": "alpha"}, {"id": "b", "text":
                                                                  "beta"}])}).save_to_disk(str(tmp_path / "saved"))
    docs = list(read_rows(hf_batches(str(tmp_path / "saved"), "corpus"), "saved", "id", "text", "", LoadReport()))
    assert docs == [("a", "", "alpha"), ("b", "", "beta")]
    with pytest.raises(InputError, match="no split 'train'"):
        list(hf_batches(str(tmp_path / "saved"), "train"))


def test_corpus_only_formats_take_the_label_free_route_and_refuse_labelled(tmp_path):
    for fmt in ("files", "table", "hf"):
        assert load_config(None, [f"data.format={fmt}", "data.path=x"]).data.queries == "labelfree"
    assert load_config(None, ["data.path=x"]).data.queries == "labelled"  # beir keeps its labels
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "alpha"}\n')  # a BEIR folder with a corpus alone
    assert load_config(None, [f"data.path={tmp_path}"]).data.queries == "labelfree"
    (tmp_path / "queries.jsonl").write_text("")
    assert load_config(None, [f"data.path={tmp_path}"]).data.queries == "labelled"
    with pytest.raises(ValueError, match="needs labelled queries"):
        load_config(None, ["data.format=files", "data.path=x", "data.queries=labelled"])


def test_init_detects_a_table_and_its_columns(tmp_path):
    from embtune.pipeline.init import main

    table = tmp_path / "kb.csv"
    table.write_text("doc_id,heading,content\n1,Install,Installing the widget server needs Python and a database "
                     "and a free port for the widget service.\n2,Backup,Backups of the widget database run nightly "
                     "and the restore command takes a date.\n")
    assert main([str(table), "--out", str(tmp_path / "embtune.yaml")]) == 0
    cfg = load_config(tmp_path / "embtune.yaml")
    assert (cfg.data.format, cfg.data.id_column, cfg.data.text_column, cfg.data.title_column) == \
        ("table", "doc_id", "content", "heading")
    assert main([str(table), "--out", str(tmp_path / "embtune.yaml")]) == 2  # exists: --force to overwrite


def test_init_detects_a_beir_folder_with_a_parquet_corpus(tmp_path, tiny_beir):
    from embtune.pipeline.init import main
    from tests.conftest import parquet_twin

    folder = parquet_twin(tiny_beir, tmp_path / "pq")
    assert main([str(folder), "--out", str(tmp_path / "embtune.yaml")]) == 0
    cfg = load_config(tmp_path / "embtune.yaml")
    assert (cfg.data.format, cfg.data.path, cfg.chunking.max_tokens) == ("parquet", str(folder), 0)
    assert "corpus in Parquet with queries and qrels" in (tmp_path / "embtune.yaml").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_init_then_pipeline_then_serve_up_answers(tmp_path):
    """The newcomer's path: `embtune init DIR`, the pipeline on the recipe it wrote, `serve up` on that recipe."""
    folder = markdown_folder(tmp_path)
    recipe = tmp_path / "embtune.yaml"
    done = subprocess.run([sys.executable, "-m", "embtune.pipeline.cli", "init", str(folder), "--out", str(recipe)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = recipe.read_text()
    assert "format: \"files\"" in text and "queries: labelfree" in text
    assert f"python -m embtune.pipeline {recipe}" in text and f"python -m embtune.serve up {recipe}" in text
    # Small and fast: few steps, a small probe; every other key is the recipe init wrote.
    quick = ["labelfree.probe_queries=20", "labelfree.depth=4", "train.max_steps=2", "train.batch_size=4",
             "labelfree.min_headroom=0", "labelfree.min_student_gain=0", "tracking.report_to=none"]
    done = subprocess.run([sys.executable, "-m", "embtune.pipeline", str(recipe), *quick], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking the label-free route" in done.stderr
    bundle = tmp_path / "runs" / "my-docs" / "bundle"
    assert (bundle / "manifest.json").is_file()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "embtune.serve", "up", str(recipe), f"serve.port={port}"],
                              cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "serve up did not come up in 180 s"
            time.sleep(1)
        hits = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": "how do I restore a backup?", "k": 3},
                          timeout=60).json()
        assert hits["hits"][0]["id"] == "guides/backup.md", hits
    finally:
        server.terminate()
        server.wait(timeout=30)
