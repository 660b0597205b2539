"""Reading a run config: YAML files with `defaults:` inheritance, dotted command-line overrides, and coercion of
plain data into the schema's dataclasses with errors that name the source and the key."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_sayo.config.schema import ConfigError, RunConfig, cross_checks, optional_inner, type_name


def _coerce(value, tp, key: str, where: str):
    """`value` as type `tp` (int -> float allowed, '5e-6' -> float allowed), else ConfigError."""
    bad = ConfigError(f"{where}: {key} = {value!r}: expected {type_name(tp)}")
    inner = optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{n}]", where) for n, v in enumerate(value)]
    raise TypeError(f"config field {key}: unsupported type {tp}")


def _check_range(value, bounds: dict, key: str, where: str) -> None:
    ops = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in bounds.items():
        ok, sym = ops[name]
        if value is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {key} = {value!r}: must be {sym} {bound}")


def _build(cls, data, prefix: str, where: str):
    """Instantiate dataclass `cls` from a mapping, checking every key, type and range."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{where}: unknown key {key!r}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, where)
        _check_range(kwargs[name], fields[name].metadata, key, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    """tree['a']['b'] = value for key 'a.b' (intermediate mappings created)."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=20' -> ('train.steps', 20); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: {key}: cannot parse value {raw!r}: {exc}") from None
    return key.strip(), value


def config_from_dict(data: dict, where: str = "config", complete: bool = True) -> RunConfig:
    """RunConfig from a plain mapping (as `to_dict` writes it), fully validated; complete=False skips the checks
    between keys (a partial config, e.g. the defaults alone, for --print-config)."""
    cfg = _build(RunConfig, data, "", where)
    if complete:
        cross_checks(cfg, where)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merged key by key, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as plain data with its `defaults:` resolved: `defaults: other.yaml` (or a list of files,
    later ones winning; paths relative to this file's folder) is read first and this file's keys merged on top."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: defaults form a cycle ({chain})")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parents = data.pop("defaults", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{path}: defaults = {parents!r}: expected a file name or a list of file names")
    merged: dict = {}
    for parent in parents:
        merged = _merge(merged, read_config_file(path.parent / parent, (*_seen, path.resolve())))
    return _merge(merged, data)


def load_config(path: str | None, overrides: list[str] = (), complete: bool = True) -> RunConfig:
    """Read YAML `path` (None: defaults only; its `defaults:` files first), apply `key.sub=value` overrides,
    validate (complete=False: each key only, see config_from_dict)."""
    data: dict = {}
    where = str(path) if path is not None else "defaults"
    if path is not None:
        data = read_config_file(path)
    if overrides:
        _build(RunConfig, data, "", where)  # report file errors against the file first
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(data, key, value)
        where = f"{where} + command line"
    return config_from_dict(data, where, complete)

