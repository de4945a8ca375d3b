"""The tracking section: its own keys (not train's), and wandb's graceful offline fallback, said once."""

import logging
import os

import pytest

from embtune.config import ConfigError
from embtune.schema import load_config
from embtune.tracking import TrackingConfig, artifact_name, configure_reporting, report_targets


def test_tracking_is_its_own_section():
    cfg = load_config(None, ["data.path=/x", "tracking.report_to=wandb,tensorboard", "tracking.wandb_project=p"])
    assert report_targets(cfg.tracking) == ["wandb", "tensorboard"] and cfg.tracking.wandb_project == "p"
    assert not hasattr(cfg.train, "report_to")
    with pytest.raises(ConfigError) as err:  # an old recipe is told where the key went
        load_config(None, ["data.path=/x", "train.report_to=none"])
    assert err.value.key == "train.report_to" and "moved to 'tracking.report_to'" in err.value.reason
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=/x", "tracking.report_to=none,wandb"])
    assert err.value.key == "tracking.report_to" and "cannot be combined" in err.value.reason


def test_wandb_without_a_key_logs_offline_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with an api.wandb.ai entry
    with caplog.at_level(logging.WARNING, logger="embtune.tracking"):
        targets = configure_reporting(TrackingConfig(report_to="wandb"), tmp_path / "train")
    assert targets == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path / "train")
    offline = [r.getMessage() for r in caplog.records if "logging offline" in r.getMessage()]
    assert offline == [f"wandb: no API key found, logging offline to {tmp_path / 'train'}/wandb "
                       "(upload later with `wandb sync`)"]


def test_wandb_mode_set_by_the_user_is_kept_quietly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    monkeypatch.setenv("HOME", str(tmp_path))
    os.environ["WANDB_MODE"] = "disabled"
    with caplog.at_level(logging.WARNING, logger="embtune.tracking"):
        configure_reporting(TrackingConfig(report_to="wandb"), tmp_path / "train")
    assert os.environ["WANDB_MODE"] == "disabled" and not caplog.records
    assert configure_reporting(TrackingConfig(report_to="none"), tmp_path) == "none"


def test_a_run_folder_named_after_its_overrides_still_names_a_model_artifact():
    # the train stage names its artifact after the run folder; a benchmark's folder named after its overrides
    # ran past wandb's 128 characters and failed the stage after training
    import wandb

    long = "model-dev_" + "_".join(f"labelfree_key{i}-value{i}" for i in range(8))
    other = long[:-1] + "X"
    assert len(long) > 128
    for name in (long, other, "model-a/b:c", "model-short"):
        wandb.Artifact(artifact_name(name), type="model")  # raises on a name wandb refuses
    assert len(artifact_name(long)) == 128 and artifact_name(long) != artifact_name(other)
    assert artifact_name("model-short") == "model-short" and artifact_name("model-a/b:c") == "model-a-b-c"
