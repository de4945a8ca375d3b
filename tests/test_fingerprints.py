"""A stage fingerprints what it reads: run each stage on tiny data with a config that records every key the stage's
work reads, then flip every key of the recipe, one at a time, and check which stage fingerprints change.

- stale results: a key the stage reads (and that can change its output) must change its fingerprint;
- needless reruns: a key it never reads must not, unless its section is one the stage fingerprints whole
  (``WHOLE``, a conservative choice: a key of such a section reruns the stage even on a branch that skips it);
  and bookkeeping keys (``NEUTRAL``: tracking, logging, checkpoint cadence) never do.

``run_dir`` is not flipped: another run folder holds no manifests, so every stage runs there.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from embtune.config import fingerprint
from embtune.schema import Config, load_config

# Read, but they change only what is logged or kept on disk (or where the run lives), never a stage's output.
NEUTRAL = {"train.logging_steps", "train.save_steps", "train.save_total_limit", "tracking.report_to",
           "tracking.wandb_project", "tracking.wandb_log_model"}
# Sections a stage fingerprints whole, read key by key or not.
WHOLE = {"data_prep": {"data", "chunking", "mining", "bm25"}, "train": {"train"}, "eval": {"eval", "bm25"},
         "export": {"export", "train", "mining"}}


class Recorder:
    """Dataclass instances whose field reads are recorded as dotted keys while ``on``."""

    def __init__(self):
        self.on, self.keys, self._classes = False, set(), {}

    def wrap(self, obj: Any, path: str = "") -> Any:
        if not dataclasses.is_dataclass(obj):
            return obj
        cls = type(obj)
        if cls not in self._classes:
            names = {f.name for f in dataclasses.fields(cls)}
            recorder = self

            def __getattribute__(inner, name):
                value = object.__getattribute__(inner, name)
                if recorder.on and name in names and not dataclasses.is_dataclass(value):
                    recorder.keys.add(object.__getattribute__(inner, "_path") + name)
                return value

            self._classes[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "_path": ""})
        values = {f.name: self.wrap(getattr(obj, f.name), f"{path}{f.name}.") for f in dataclasses.fields(obj)
                  if f.init}
        wrapped = self._classes[cls](**values)
        for f in dataclasses.fields(obj):
            if not f.init:
                object.__setattr__(wrapped, f.name, getattr(obj, f.name))
        object.__setattr__(wrapped, "_path", path)
        return wrapped

    def paused(self, fn):
        def call(*args, **kwargs):
            on, self.on = self.on, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.on = on
        return call


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key of the schema with its type (lists of sections, e.g. llm.few_shot, are leaves too)."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


def flipped(value: Any, tp: Any) -> Any:
    """Another value of type ``tp`` (validity is not needed: only fingerprints are computed)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return next(a for a in args if a != value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = next(a for a in args if a is not type(None))
        return flipped(None, inner) if value is None else None
    if tp is bool:
        return not value
    if tp is int:
        return (value or 0) + 3
    if tp is float:
        return (value or 0.0) + 0.25
    if tp is str:
        return (value or "") + "_flipped"
    if origin is list:
        return list(value or []) + [flipped(None, args[0]) if args and not dataclasses.is_dataclass(args[0])
                                    else {"document": "d", "queries": ["q"]}]
    if origin is dict:
        return {**(value or {}), "flipped": "flipped/model"}
    raise AssertionError(f"no flip for {tp}")


def with_key(cfg: Config, key: str, value: Any) -> Config:
    out = copy.deepcopy(cfg)
    *sections, name = key.split(".")
    node = out
    for section in sections:
        node = getattr(node, section)
    setattr(node, name, value)
    return out


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    from embtune.data_prep.run import stage_config as data_prep_config
    from embtune.eval.run import models_to_evaluate
    from embtune.eval.run import stage_config as eval_config
    from embtune.serve.export import stage_config as export_config
    from embtune.train.recipe import stage_config as train_config

    return {"data_prep": fingerprint(data_prep_config(cfg)), "train": fingerprint(train_config(cfg)),
            "eval": fingerprint(eval_config(cfg, models_to_evaluate(cfg))), "export": fingerprint(export_config(cfg))}


def value_at(cfg: Config, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.slow
def test_each_stage_fingerprints_exactly_what_it_reads(tmp_path, tiny_beir, tiny_model_dir, monkeypatch):
    import embtune.data_prep.run
    import embtune.eval.run
    import embtune.serve.export
    import embtune.train.recipe  # noqa: F401 (binds the submodules read below)
    from embtune import data_prep, eval, serve, train

    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", f"train.base_model={model}",
                             "train.max_steps=2", "train.batch_size=8", "train.use_cpu=true",
                             "tracking.report_to=none", "train.matryoshka_dims=[32,16]", "eval.dims=[32,16]",
                             "eval.significance_resamples=200", "eval.hybrid=[weighted]"])
    recorder = Recorder()
    recorded = recorder.wrap(cfg)
    # Computing a fingerprint reads whole sections; only the stage's work counts as reading.
    for module in (data_prep.run, train.recipe, eval.run, serve.export):
        monkeypatch.setattr(module, "stage_config", recorder.paused(module.stage_config))
    reads = {}
    for name, run in (("data_prep", data_prep.run.run), ("train", train.recipe.run), ("eval", eval.run.run),
                      ("export", serve.export.run)):
        recorder.keys, recorder.on = set(), True
        run(recorded, force=True)
        recorder.on = False
        reads[name] = set(recorder.keys)
    assert {"mining.rank_end", "bm25.stopwords"} <= reads["data_prep"] and "train.learning_rate" in reads["train"]
    assert {"seed", "eval.top_k"} <= reads["eval"] and "export.onnx" in reads["export"]

    before = stage_fingerprints(cfg)
    stale, needless = [], []
    for key, tp in leaves(Config):
        if key == "run_dir":
            continue
        after = stage_fingerprints(with_key(cfg, key, flipped(value_at(cfg, key), tp)))
        for stage in before:
            changed = after[stage] != before[stage]
            read = key in reads[stage] and key not in NEUTRAL
            if read and not changed:
                stale.append(f"{stage} reads {key}")
            if changed and not read and (key in NEUTRAL or key.split(".")[0] not in WHOLE[stage]):
                needless.append(f"{stage} reruns on {key}")
    assert not stale, f"keys read but not fingerprinted (stale results): {stale}"
    assert not needless, f"keys fingerprinted but never read (needless reruns): {needless}"


def test_synthesis_fingerprints_the_round_trip_encoder():
    """With synthetic queries, data_prep's round trip encodes with train.base_model at eval.max_seq_length."""
    from embtune.data_prep.run import stage_config

    base = ["data.path=/x", "data.queries=synthetic"]
    reference = fingerprint(stage_config(load_config(None, base)))
    for key in ("eval.max_seq_length=128", "train.base_model=other", "llm.n_queries=7"):
        assert fingerprint(stage_config(load_config(None, [*base, key]))) != reference, key
    labelled = fingerprint(stage_config(load_config(None, ["data.path=/x"])))
    assert fingerprint(stage_config(load_config(None, ["data.path=/x", "eval.max_seq_length=128"]))) == labelled


def test_logging_and_tracking_do_not_retrain():
    from embtune.train.recipe import stage_config

    reference = fingerprint(stage_config(load_config(None, ["data.path=/x"])))
    for key in ("tracking.report_to=none", "train.logging_steps=1", "train.save_total_limit=5"):
        assert fingerprint(stage_config(load_config(None, ["data.path=/x", key]))) == reference, key
    assert fingerprint(stage_config(load_config(None, ["data.path=/x", "train.learning_rate=1e-3"]))) != reference
