"""Config machinery shared by every stage: dataclasses <- one YAML file + dotted command-line overrides.

A stage declares its config as small dataclasses (a docstring under every field) in its own module and calls
`load_config(TrainConfig, "recommended", ["lora.rank=16", "data.dataset=out/ds"])`. A YAML name without a
path separator or suffix is looked up among the presets shipped in `radscribe/presets/`.
The fully resolved config is written into the run folder with `save_config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from radscribe.errors import RadscribeError

PRESETS_DIR = Path(__file__).parent / "presets"
T = TypeVar("T")


def preset_path(name: str) -> Path:
    """A preset name (`recommended`) or a path to a YAML file -> the YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or "/" in name:
        if not path.is_file():
            raise RadscribeError(f"config file {name} does not exist")
        return path
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise RadscribeError(f"unknown preset {name!r}; shipped presets: {known}")
    return path


def load_config(cls: type[T], yaml_file: str | None = None, overrides: list[str] | tuple = ()) -> T:
    """Build `cls` from its defaults, then the YAML file (if any), then `key.sub=value` overrides."""
    values: dict = {}
    if yaml_file:
        path = preset_path(yaml_file)
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise RadscribeError(f"{path}: the top level must be a mapping of config sections")
        values = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RadscribeError(f"override {item!r} is not of the form section.field=value")
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RadscribeError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return _build(cls, values, where="config")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise RadscribeError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RadscribeError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except RadscribeError:
                continue
        raise RadscribeError(f"{where}: {value!r} does not fit {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise RadscribeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RadscribeError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RadscribeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RadscribeError(f"{where}: expected true/false, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-5" as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RadscribeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (the run folder's record of what ran)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
