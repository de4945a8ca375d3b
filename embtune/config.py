"""YAML recipes mapped onto typed dataclasses, with dotted ``key=value`` overrides.

A recipe is one YAML file whose top-level sections (``data``, ``mining``, ``train``, ``eval``, ``export``)
each map onto the dataclass that the stage owning it defines. Every key is checked: an unknown key or a value of
the wrong type is a :class:`ConfigError` that names the dotted key, the file and the line (or the override that
set it).

This module is the core's generic machinery and knows no section; the recipe schema (``embtune.schema``, which
imports every stage's sections) builds on it::

    from embtune.schema import load_config

    cfg = load_config("configs/scifact_supervised.yaml", ["train.learning_rate=3e-5"])
    cfg.train.learning_rate  # 3e-05
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe that does not match its schema.

    ``key`` is the dotted key at fault (None for a file-level problem), ``reason`` what is wrong with it, and
    ``where`` the file and line, or the one override, that set it; ``str(err)`` is ``"<where>: <reason>"``.
    Tests assert ``key`` and ``reason``: the text of unrelated overrides never appears in the message.
    """

    def __init__(self, reason: str, key: str | None = None, where: str | None = None):
        self.reason, self.key, self.where = reason, key, where
        super().__init__(f"{where}: {reason}" if where else reason)


class InputError(ValueError):
    """An input an entry point cannot use (a bundle, a model, a data path); the message names it and the fix.

    Entry points answer it with one line and exit code 2 (``embtune.cli.exit_code``).
    """


def closest_name(name: str, known) -> str | None:
    """The known name closest to a misspelt one (difflib), or None when nothing is close."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return match[0] if match else None


def _line_map(text: str) -> dict[str, int]:
    """Map each dotted key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Origin:
    """Where each key of a recipe came from: a line of the file, or an override (which wins)."""

    def __init__(self, source: str, lines: dict[str, int] | None = None, overrides: list[str] | None = None):
        self.source, self.lines = source, dict(lines or {})
        self.overrides = {text.split("=", 1)[0]: text for text in overrides or []}

    def __call__(self, key: str) -> str:
        # The key itself, else the nearest enclosing section (a defaulted key has no line of its own).
        parts = re.sub(r"\[\d+\]", "", key).split(".") if key else []
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.overrides:
                return f"{self.source} (override '{self.overrides[prefix]}')"
            below = [text for name, text in self.overrides.items() if name.startswith(prefix + ".")]
            if end == len(parts) and below:  # an unknown section that only an override names
                return f"{self.source} (override '{below[0]}')"
            if prefix in self.lines:
                return f"{self.source}:{self.lines[prefix]}"
        return self.source


def _coerce(value: Any, tp: Any, key: str, where: _Origin) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it, converted where lossless."""
    origin = get_origin(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"key '{key}' expects {expected}, got {value!r} ({type(value).__name__})", key,
                           where(key))

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # `X | None`: X's own error names the nested key that is wrong
            raise errors[0]
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in get_args(tp):
            raise fail(f"one of {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {_type_name(get_args(tp)[0]) if get_args(tp) else 'values'}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "3e-5" (no dot) as a string; accept it when it parses as a number.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise fail(_type_name(tp))  # pragma: no cover - schema uses only the types above


def _build(cls: type, data: dict[str, Any], prefix: str, where: _Origin) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            moved = getattr(cls, "moved_keys", {}).get(name)
            if moved:
                raise ConfigError(f"key '{key}' has moved to '{moved}'", key, where(key))
            removed = getattr(cls, "removed_keys", {}).get(name)
            if removed:  # one key per thing: the duplicate is gone, the message names the one that stays
                raise ConfigError(f"key '{key}' was removed: {removed}", key, where(key))
            known = ", ".join(sorted(fields))
            suggestion = closest_name(name, fields)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{suggestion}'?" if suggestion else ""
            raise ConfigError(f"unknown key '{key}'{hint} (known keys here: {known})", key, where(key))
        kwargs[name] = _coerce(value, hints[name], key, where)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"section '{prefix or '<root>'}': {err}", prefix or None, where(prefix)) from None


def _validate_tree(obj: Any, prefix: str, where: _Origin, sections: list[str] | None = None) -> None:
    """Call each section's ``validate()`` (defaulted sections included), naming the key at fault.

    A ``validate()`` raises ValueError with a message that starts from the dotted key it rejects
    (``"train.batch_size must be >= 1"``); that key (else the section) is the error's ``key``. ``sections`` limits
    the top-level sections checked to those an entry point reads (``serve up`` needs no ``data.path``); unknown
    keys and wrong types are still errors everywhere.
    """
    for f in dataclasses.fields(obj):
        if sections is not None and not prefix and f.name not in sections:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{prefix}.{f.name}" if prefix else f.name, where)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            reason = str(err)
            named = re.search(rf"(?<![\w.]){re.escape(prefix)}(?:\.\w+)+", reason) if prefix else None
            key = named.group(0) if named else (prefix or None)
            raise ConfigError(reason, key, where(key or "")) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], value), the value read as YAML (``3e-5`` stays a number)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override set (intermediate mappings are created)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def build(cls: type, data: dict[str, Any] | None, source: str = "<dict>", lines: dict[str, int] | None = None,
          overrides: list[str] | None = None, sections: list[str] | None = None) -> Any:
    """Build dataclass ``cls`` from plain data, checking every key, type and section constraint.

    ``lines`` maps dotted keys to their line in ``source``; ``overrides`` are the ``key=value`` texts applied to
    ``data``, named in an error about the key they set; ``sections`` limits ``validate()`` to those top-level ones.
    """
    where = _Origin(source, lines, overrides)
    obj = _build(cls, data or {}, "", where)
    _validate_tree(obj, "", where, sections)
    return obj


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the recipes are in configs/; `embtune init DIR` writes "
                          "one for a folder of documents)")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # one line: the problem and where (PyYAML's own text spans several lines)
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem} (check the indentation and the ':' after each key)", None,
                          where) from None
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", None, str(path))
    return data, _line_map(text)


def load(cls: type, path: str | Path | None, overrides: list[str] | None = None,
         sections: list[str] | None = None) -> Any:
    """Build schema ``cls`` from a recipe file (or only defaults when ``path`` is None) and dotted overrides.

    ``sections``: validate only these top-level sections (default all); every key is type-checked regardless.
    """
    data, lines = load_yaml(path) if path else ({}, {})
    if overrides:
        data = apply_overrides(data, overrides)
    return build(cls, data, str(path) if path else "<defaults>", lines, overrides, sections)


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config, or of a dict/list holding config sections (what manifests and wandb record)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def fingerprint(obj: Any) -> str:
    """Stable hash of a config section, for manifests."""
    import hashlib

    payload = json.dumps(to_dict(obj), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
