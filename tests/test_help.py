"""``--help`` is generated from the config sections an entry point reads: every dotted key, its type or Literal
choices, its default and the first sentence of the field's comment, nested sections expanded."""

import subprocess
import sys

import pytest

from embtune.cli import describe_sections, field_comments
from embtune.sections.data_prep import DataConfig


def test_data_prep_help_lists_the_label_free_keys_with_choices_and_defaults(capsys):
    from embtune.data_prep.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for section in ("data.", "labelfree.", "bm25.", "compute.", "mining.", "chunking."):
        assert f"\n  {section}" in out, section
    assert "labelfree.source (drop | keep) = 'drop'" in out  # a Literal prints its choices, not "(Literal)"
    assert "labelfree.dense_weight (float | null) = None" in out
    # the field's comment, first sentence
    assert "The teacher's dense weight; null = chosen per corpus without labels by the inverse-cloze probe below." \
        in out
    assert "Top-level keys: run_dir (str)" in out


def test_nested_sections_are_expanded_not_printed_as_reprs(capsys):
    text = describe_sections(["eval", "export"])
    assert "[eval.sweep]" in text and "  eval.sweep.hnsw_m (int) = 32" in text
    assert "  export.vectordb.precision (float32 | float16) = 'float32'" in text
    assert "SweepConfig(" not in text and "VectorDBConfig(" not in text


def test_comment_reading_takes_inline_then_block_comments():
    comments = field_comments(DataConfig)
    assert comments["dev_fraction"].startswith("Queries carved out of the train split")
    assert "path" not in comments or comments["path"]  # a field without a comment is simply absent


def test_serve_help_shows_up_and_its_flags():
    done = subprocess.run([sys.executable, "-m", "embtune.serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "python -m embtune.serve up [CONFIG]" in done.stdout and "--bundle DIR" in done.stdout


def test_embtune_help_lists_the_stages(capsys):
    from embtune.cli import STAGES
    from embtune.pipeline.cli import entry_point, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, text in STAGES.items():
        assert f"  {name}" in out and text in out
        assert callable(entry_point(name))  # every command listed dispatches
