"""Typed stage configs: dataclasses filled from a YAML file, then `key=value` overrides, then CLI flags.

Each stage defines a dataclass whose fields carry their help text in `metadata["help"]`. The resolved
config (`to_dict`) goes into the artifact's manifest and into MLflow params.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

from gdrt_core.errors import GdrtError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with its help string (shown by `gdrt <stage> --help` and in docs)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML or string value to the field type `tp`, with a clear error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except GdrtError as e:
                errors.append(str(e))
        raise GdrtError(f"{key}: cannot read {value!r} as {tp}", path=source)
    if origin is typing.Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise GdrtError(f"{key}: {value!r} is not one of {list(args)}", path=source)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise GdrtError(f"{key}: expected a list, got {value!r}", path=source)
        inner = args[0] if args else str
        return [_coerce(v, inner, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise GdrtError(f"{key}: expected true/false, got {value!r}", path=source)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise GdrtError(f"{key}: expected {tp.__name__}, got {value!r}", path=source) from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise GdrtError(f"{key}: expected a mapping, got {value!r}", path=source)
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is Any:
        return value
    return value


def from_dict(cls: type[T], data: dict, *, source: str = "<config>", prefix: str = "") -> T:
    """Build `cls` from a (possibly nested) mapping; unknown keys are an error that names them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise GdrtError(
            f"unknown setting(s) {', '.join(prefix + u for u in unknown)}", path=source,
            hint=f"known: {', '.join(sorted(prefix + n for n in names))}",
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise GdrtError(f"incomplete config: {e}", path=source) from None


def set_dotted(data: dict, key: str, value: Any, where: str | None = None) -> None:
    """data[a][b][c] = value for key "a.b.c", creating the dicts on the way; a parent that holds a value
    other than a dict is a GdrtError naming the key (and `where`, the file or flag it came from)."""
    *parents, last = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise GdrtError(f"{key!r}: {p!r} is not a settings dict", path=where)
    data[last] = value


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file holding a mapping ({} when empty); missing file, bad YAML or a non-mapping is a GdrtError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise GdrtError(f"{what} not found", path=str(path)) from None
    except yaml.YAMLError as e:
        raise GdrtError(f"invalid YAML: {e}", path=str(path)) from None
    if not isinstance(loaded, dict):
        raise GdrtError(f"the {what} must hold a mapping", path=str(path))
    return loaded


def parse_override(item: str) -> tuple[str, str]:
    """`key=value` (from --set) as (key, raw value)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise GdrtError(f"override {item!r} is not of the form key=value", path="--set")
    return key.strip(), value


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
    **explicit: Any,
) -> T:
    """YAML file (optionally one `section` of it) < `key=value` overrides < explicit keyword values.

    Explicit values of None are ignored (an unset CLI flag keeps the file's or the default value).
    """
    data: dict = {}
    source = str(path) if path else "<command line>"
    if path:
        loaded = read_yaml(path)
        if section is not None:
            loaded = loaded.get(section, {}) or {}
            if not isinstance(loaded, dict):
                raise GdrtError(f"section {section!r} must hold a mapping of settings", path=str(path))
        data.update(loaded)
    for item in overrides or []:
        set_dotted(data, *parse_override(item), where=source)
    for k, v in explicit.items():
        if v is not None:
            set_dotted(data, k, v, where=source)
    return from_dict(cls, data, source=source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
