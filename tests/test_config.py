from pathlib import Path

import pytest

from embtune.config import ConfigError
from embtune.schema import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_opens_with_a_command_that_runs_it(path):
    """The first line is the exact launch command (torchtune's habit): it names this file, and every module it
    runs with ``-m`` exists, so a renamed entry point cannot leave a recipe pointing at nothing."""
    import importlib.util
    import re

    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line should be the command that runs it"
    assert f"configs/{path.name}" in first or "scripts/" in first, first
    for module in re.findall(r"-m ([\w.]+)", first):
        assert importlib.util.find_spec(module) is not None, f"{path.name}: `-m {module}` names no module"
    for script in re.findall(r"python (scripts/\w+\.py)", first):
        assert (path.parents[1] / script).is_file(), f"{path.name}: {script} does not exist"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.train.batch_size >= 1


def test_override_sets_typed_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: /x\ntrain:\n  epochs: 1\n")
    cfg = load_config(path, ["train.learning_rate=3e-5", "train.matryoshka_dims=[64,32]", "eval.split=dev"])
    assert cfg.train.learning_rate == pytest.approx(3e-5)
    assert cfg.train.matryoshka_dims == [64, 32]
    assert cfg.eval.split == "dev"
    assert cfg.train.epochs == 1.0 and isinstance(cfg.train.epochs, float)


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: /x\ntrain:\n  epochs: 1\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lerning_rate" in message and f"{path}:5" in message and "learning_rate" in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: /x\ntrain:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: key 'train.batch_size' expects an integer"):
        load_config(path)


def test_bool_is_not_an_int(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: /x\ntrain:\n  batch_size: true\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(path)


def test_literal_choices_are_checked():
    with pytest.raises(ConfigError, match="train.loss.*'mnrl'"):
        load_config(None, ["data.path=/x", "train.loss=contrastive"])


def test_unknown_override_key_fails():
    with pytest.raises(ConfigError, match="unknown key 'mining.depth'"):
        load_config(None, ["data.path=/x", "mining.depth=3"])


def test_semantic_validation_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, [])  # BEIR format without a path
    assert err.value.key == "data.path" and "must name a BEIR folder" in err.value.reason
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", "train.matryoshka_dims=[64,128]"])
    assert err.value.key == "train.matryoshka_dims" and "decreasing order" in err.value.reason
    assert str(err.value) == ("<defaults> (override 'train.matryoshka_dims=[64,128]'): "
                              "train.matryoshka_dims must be in decreasing order")


def test_error_does_not_echo_unrelated_overrides():
    """An error names the one override that set the key at fault, never the others: a ``match=`` on the message
    cannot pass on the text of an override that had nothing to do with the error."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.hybrid=[rrf]", "eval.compare_bm25=false"])  # data.path is missing first
    assert err.value.key == "data.path"
    assert "compare_bm25" not in str(err.value) and "hybrid" not in str(err.value)


def test_error_in_file_names_its_line_and_section_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: /x\nmining:\n  rank_start: 0\n  margin: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.epochs=2"])
    assert (err.value.key, err.value.where) == ("mining.margin", f"{path}:5")
    assert "train.epochs" not in str(err.value)


def test_stage_help_lists_keys(capsys):
    from embtune.data_prep.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "mining.num_negatives" in out and "data.on_error" in out


@pytest.mark.parametrize("old, new", [("train.seed=1", "'seed'"), ("data.seed=1", "'seed'"),
                                      ("mining.seed=1", "'seed'"), ("cross_encoder.seed=1", "'seed'"),
                                      ("train.num_negatives=2", "mining.num_negatives")])
def test_one_key_per_thing_a_removed_key_names_its_replacement(old, new):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", old])
    assert err.value.key == old.split("=")[0] and new in err.value.reason


def test_one_seed_reaches_every_stage_fingerprint():
    from embtune.data_prep.run import stage_config as data_prep_config
    from embtune.train.recipe import stage_config as train_config

    a, b = (load_config(None, ["data.path=/x", f"seed={seed}"]) for seed in (1, 2))
    assert data_prep_config(a) != data_prep_config(b) and train_config(a) != train_config(b)
