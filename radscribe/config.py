"""Config machinery shared by every stage: dataclasses <- one YAML file + dotted command-line overrides.

A stage declares its config as small dataclasses (a docstring under every field) in its own module and calls
`load_config(TrainConfig, "recommended", ["lora.rank=16", "data.dataset=out/ds"])`. A YAML name without a
path separator or suffix is looked up among the presets shipped in `radscribe/presets/`. The CLI goes through
`config_from_args` (its flags are shorthands for fields, applied last), and `radscribe STAGE --help` lists the
fields with `config_help`, read from the same field docstrings. The fully resolved config is written into the
stage's output folder with `save_config`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
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


def deepspeed_config(name: str | None) -> str | None:
    """`z2`, `z3` (the shipped presets/deepspeed/*.json) or a DeepSpeed JSON path -> its path; None stays None."""
    if not name:
        return None
    path = PRESETS_DIR / "deepspeed" / f"{name}.json" if name in ("z2", "z3") else Path(name)
    if not path.is_file():
        raise RadscribeError(f"train.deepspeed: {name!r} is neither z2, z3 nor an existing DeepSpeed JSON file")
    return str(path)


def config_from_args(cls: type[T], preset: str | None, overrides: list[str] | tuple = (), **flags) -> T:
    """`load_config` plus the CLI's flags: `flags` maps dotted fields to values (None = flag not given), applied
    after the YAML and the overrides, so `--out X` wins over `output.dir=Y`."""
    # JSON-quoted so that a path like "runs/true" or "a: b #1" stays a string (JSON is YAML)
    extra = [f"{key}={json.dumps(_plain(value), ensure_ascii=False)}" for key, value in flags.items()
             if value is not None]
    return load_config(cls, preset, list(overrides) + extra)


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
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RadscribeError(f"{where}: {', '.join(missing)} must be given (as a flag, FIELD=VALUE or in --config)")
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
    if hint is Path and isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RadscribeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(cfg) -> dict:
    """The config as plain YAML/JSON values (paths as strings)."""
    return _plain(dataclasses.asdict(cfg))


def changed_fields(before, after, ignore: tuple[str, ...] = ()) -> list[str]:
    """`field: old -> new` for each dotted field whose value differs between two configs of one class."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    old, new = flat(to_dict(before)), flat(to_dict(after))
    return [f"{k}: {format_value(old.get(k))} -> {format_value(new.get(k))}" for k in new
            if k not in ignore and old.get(k) != new.get(k)]


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_config(cfg, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (the run folder's record of what ran)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# --- help: the fields, their defaults and one-line docs, read from the field docstrings -----------------------
@dataclasses.dataclass
class FieldDoc:
    name: str
    """Dotted name (`train.lr`)."""
    default: Any
    """The dataclass default (a preset may set another)."""
    doc: str
    """The field's docstring, cleaned."""
    hint: Any
    """The resolved type."""
    section: bool = False
    """A nested config section rather than a value."""

    @property
    def line(self) -> str:
        """The first sentence of the docstring, and the choices of a Literal field."""
        text = " ".join(self.doc.split("\n\n")[0].split())
        end = text.find(". ")
        text = text[:end + 1] if end >= 0 else text
        choices = literal_choices(self.hint)
        return text + (f" [{'|'.join(map(str, choices))}]" if choices else "")


def literal_choices(hint) -> tuple:
    """The values of a `Literal[...]` (or `Literal[...] | None`) hint, else ()."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), None)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name -> the string literal under it in the class body (the convention of every config here)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(cls, prefix: str = "") -> list[FieldDoc]:
    """Every field of `cls`, nested sections first-level included, in declaration order."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(hint):
            out.append(FieldDoc(name, None, docs.get(f.name, ""), hint, section=True))
            out += describe(hint, name + ".")
        else:
            out.append(FieldDoc(name, default, docs.get(f.name, ""), hint))
    return out


def field_doc(cls, name: str) -> FieldDoc:
    """One field by dotted name."""
    for entry in describe(cls):
        if entry.name == name:
            return entry
    raise KeyError(name)


def format_value(value) -> str:
    """A default as it would be written in YAML or on the command line."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(_plain(value), ensure_ascii=False)
    if isinstance(value, str):
        return value if value else '""'
    return str(_plain(value))


def config_help(cls) -> str:
    """The field table that `radscribe STAGE --help` prints: sections, dotted names, defaults, one-line docs."""
    entries = describe(cls)
    values = [e for e in entries if not e.section]
    width = max(len(e.name) for e in values)
    dwidth = min(max(len(format_value(e.default)) for e in values), 24)
    lines = ["config fields (set them in a --config YAML or as FIELD=VALUE; the flags above are shorthands, "
             "applied last):"]
    for e in entries:
        if e.section:
            lines += ["", f"{e.name}: {e.line}"]
        else:
            lines.append(f"  {e.name:<{width}}  {format_value(e.default):<{dwidth}}  {e.line}")
    return "\n".join(lines)
