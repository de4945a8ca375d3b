from pathlib import Path

import pytest

from embtune.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


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
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, [])  # BEIR format without a path
    with pytest.raises(ConfigError, match="matryoshka_dims"):
        load_config(None, ["data.path=/x", "train.matryoshka_dims=[64,128]"])


def test_stage_help_lists_keys(capsys):
    from data_prep.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "mining.num_negatives" in out and "data.on_error" in out
