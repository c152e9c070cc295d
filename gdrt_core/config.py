"""Typed stage configs: dataclasses filled from a YAML file, then `key=value` overrides, then CLI flags.

Each stage defines a dataclass whose fields carry their help text in `metadata["help"]` and their valid
range (`choices`, `ge` / `gt` / `le` / `lt`, a `check` function). `load_config` checks every field when the
config is resolved, before any work: a float must be finite, a value must lie in its range, and the
dataclass's own `check(source)` method (rules that involve several fields) must pass. The resolved
config (`to_dict`) goes into the artifact's manifest and into MLflow params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from gdrt_core.errors import GdrtError, article

T = TypeVar("T")


def field(
    default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002
    choices: tuple | list | None = None, ge: float | None = None, gt: float | None = None,
    le: float | None = None, lt: float | None = None, check: Callable[[Any], str | None] | None = None,
    path: bool = False, unused_with: tuple[str, ...] = (), **kw: Any,
) -> Any:
    """A dataclass field with its help string (shown by `gdrt <stage> --help` and in docs) and its range.

    choices: the allowed values (for a list field: of each element); ge / gt / le / lt: bounds of a
    number; check: a function of the value returning what is wrong with it, or None. None values (an
    optional setting left unset) are not checked; float values must always be finite. path: the setting is a
    file or directory: `~` is expanded when the config is built (`from_dict`), and an empty value is refused
    (it would be the current directory). unused_with: settings that make this one have no effect when they are
    set (init-model's size with pretrained): giving both is an error naming both (`from_dict`).
    """
    meta: dict[str, Any] = {"help": help}
    if path:
        meta["path"] = True
    if unused_with:
        meta["unused_with"] = tuple(unused_with)
    for name, value in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("check", check)):
        if value is not None:
            meta[name] = tuple(value) if name == "choices" else value
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


DTYPES = ("auto", "float32", "bfloat16", "float16")  # the `dtype` setting of the stages that load a model


def device_problem(device: str) -> str | None:
    """A `device` setting other than auto, cpu, cuda or cuda:N."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


def range_text(meta: dict) -> str:
    """The valid range of a field as words ("one of a, b", ">= 1 and <= 127"), "" when unrestricted."""
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(str(c) for c in meta["choices"]))
    for key, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in meta:
            parts.append(f"{op} {meta[key]}")
    return " and ".join(parts)


def _value_problem(value: Any, meta: dict) -> str | None:
    """What is wrong with one value of a field (None: nothing)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            if (problem := _value_problem(v, {k: m for k, m in meta.items() if k != "check"})) is not None:
                return f"element {v!r}: {problem}"
    else:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if "choices" in meta and value not in meta["choices"]:
            return "must be " + range_text({"choices": meta["choices"]})
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        for key in ("ge", "gt", "le", "lt"):
            if key in meta and number and not getattr(operator, key)(value, meta[key]):
                return "must be " + range_text({k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta})
    if meta.get("path") and isinstance(value, str) and not value.strip():
        return "an empty path is the current directory: give a file or directory"
    if "check" in meta:
        return meta["check"](value)
    return None


def check_setting(cls: type, name: str, value: Any, key: str, source: str) -> Any:
    """One value for field `name` of config class `cls`, read as the field's type and checked against its
    range (a pipeline parameter that a stage receives as this setting); returns the typed value."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    typed = _coerce(value, typing.get_type_hints(cls)[name], key, source)
    if typed is not None:
        _check_value(key, typed, f.metadata, source)
    return typed


def _check_value(key: str, value: Any, meta: dict, source: str) -> None:
    problem = _value_problem(value, meta)
    if problem is not None:
        raise GdrtError(f"setting {key}={value!r} is invalid: {problem}", path=source,
                        hint=f"{key}: {meta.get('help', '')}".rstrip(": "))


def check_config(cfg: Any, source: str = "<config>", prefix: str = "", sources: dict[str, str] | None = None) -> None:
    """Check every field of a config dataclass against its range, then the dataclass's own `check(source)`
    (rules across fields). The first problem is a GdrtError naming the setting, its value, the file or
    command line it came from (`sources`: setting -> where it was given, else `source`), and what it means."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        where = (sources or {}).get(f.name, source)
        if dataclasses.is_dataclass(value):
            check_config(value, where, f"{prefix}{f.name}.")
            continue
        _check_value(f"{prefix}{f.name}", value, f.metadata, where)
    own_check = getattr(cfg, "check", None)
    if callable(own_check):
        own_check(source)


class SetText(str):
    """The value of a `--set key=value` exactly as typed. The type of the setting it is given to decides how
    it is read (`set_value`): kept as typed for a text setting, read as YAML for any other."""


def is_text(tp: Any) -> bool:
    """Whether a field type is text: str, a Literal of strings, or a union of those with None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return True
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(is_text(a) for a in kinds)
    return False


def set_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """A `--set` value (`SetText`) for a setting of type `tp`: the text as typed when `tp` is text (a path,
    a name: `out=010`, `out=on`, `out=/tmp/run #2` stay what they say; a value in YAML quotes, `out="a b"`,
    is the quoted text), else read as YAML, as if it stood in
    a config file (`tau=0.5` a number, `lora=false` a boolean, `modules=[q_proj, v_proj]` a list; text YAML
    cannot read stays text; an empty value is the empty string). A broken list or mapping (`[q_proj`) is
    a GdrtError naming the --set. Any other value is returned as it is."""
    if not isinstance(value, SetText):
        return value
    import yaml

    if is_text(tp):
        text = str(value)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a quoted YAML string: its content
            try:
                unquoted = parse_yaml(text)
            except yaml.YAMLError:
                return text
            return unquoted if isinstance(unquoted, str) else text
        return text

    if not value.strip():
        return str(value)
    try:
        return parse_yaml(value)
    except yaml.YAMLError as e:
        if not value.lstrip().startswith(("[", "{")):
            return str(value)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GdrtError(f"the value of {key} is not a valid YAML list or mapping ({problem})", path=source,
                        hint="write a list as [a, b] and a mapping as {k: v}; quote text that starts with [ or {: "
                             "--set 'key=\"[text\"'") from None


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML, string or `--set` value to the field type `tp`, with a clear error. A YAML boolean or
    number given for a text setting (`out: on` is True, `out: 010` the octal 8) is an error: its text ("True",
    "8") is not what was written."""
    value = set_value(value, tp, key, source)
    if isinstance(value, (bool, int, float)) and is_text(tp):
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, bool):
            raise GdrtError(f"{key}: got the YAML boolean {value!r} for a text setting", path=source,
                            hint=f"YAML reads unquoted on, off, yes, no, true and false as booleans: quote the "
                                 f"value, e.g. `{name}: \"on\"`")
        raise GdrtError(f"{key}: got the YAML number {value!r} for a text setting", path=source,
                        hint=f"YAML reads unquoted digits as a number (010 as the octal 8, 1_000 as 1000, 1.10 as "
                             f"1.1): quote the value, e.g. `{name}: \"010\"`")
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
                errors.append(e)
        if len(errors) == 1:  # an optional setting (`int | None`): the one type's own error says more
            raise errors[0]
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
    if tp in (bool, int, float, str) and isinstance(value, (dict, list, tuple)):
        raise GdrtError(f"{key}: expected a single {tp.__name__} value, got {value!r}", path=source,
                        hint=f"{key} is not a section of settings" if isinstance(value, dict) else None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise GdrtError(f"{key}: expected true/false, got {value!r}", path=source)
    if tp is str and value is None:  # str(None) would be a directory named "None"
        raise GdrtError(f"{key}: has no value", path=source,
                        hint=f"give it one (`{key.rsplit('.', 1)[-1]}: VALUE`), or leave the key out for its default")
    if tp in (int, float) and isinstance(value, bool):  # int(True) would be a silent 1
        raise GdrtError(f"{key}: expected {tp.__name__}, got the boolean {value!r}", path=source)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise GdrtError(f"{key}: expected {tp.__name__}, got {value!r}", path=source) from None
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise GdrtError(f"{key}: expected a mapping, got {value!r}", path=source)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise GdrtError(f"{key}: expected a mapping, got {value!r}", path=source)
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is Any:
        return value
    return value


def required_settings(cls: type) -> list[str]:
    """The fields of a config class that have no default: a config is complete only with all of them."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class MissingSettings(GdrtError):
    """Required settings that none of the config's sources gave. `flags` (setting -> its command-line flag)
    names the flags of a command that has them, as a first way to give each."""

    def __init__(self, names: list[str], source: str, flags: dict[str, str] | None = None):
        self.names, self.source = names, source
        one = len(names) == 1
        given = [flags[n] for n in names if n in (flags or {})]
        if one:
            ways = [f"as {given[0]} VALUE"] if given else []
            ways += [f"as `{names[0]}: VALUE` in --config FILE.yaml", f"as --set {names[0]}=VALUE"]
        else:
            ways = [f"as its flag ({', '.join(given)})"] if given else []
            ways += ["as `KEY: VALUE` in --config FILE.yaml", "as --set KEY=VALUE"]
        super().__init__(f"missing required setting{'' if one else 's'} {', '.join(names)}", path=source,
                         hint=f"give {'it' if one else 'each'} {', '.join(ways[:-1])} or {ways[-1]}")


def from_dict(cls: type[T], data: dict, *, source: str = "<config>", prefix: str = "",
              sources: dict[str, str] | None = None) -> T:
    """Build `cls` from a (possibly nested) mapping; unknown keys, and keys that are not text (`1:` in a YAML
    file), are an error that names them. `sources`
    (setting -> the file, --set or flag it came from) names each setting's own source in its errors;
    `source` names the config as a whole. A path setting (`field(path=True)`) has its `~` expanded."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sources = sources or {}
    check_text_keys(data, source, under=prefix.rstrip("."), sources=sources)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise GdrtError(
            f"unknown setting(s) {', '.join(prefix + u for u in unknown)}",
            path=", ".join(dict.fromkeys(sources.get(u, source) for u in unknown)),
            hint=f"known: {', '.join(sorted(prefix + n for n in fields))}",
        )
    missing = [prefix + n for n in required_settings(cls) if n not in data]
    if missing:
        raise MissingSettings(missing, source)
    for name in data:
        for other in fields[name].metadata.get("unused_with", ()):
            if data.get(other):
                raise GdrtError(f"setting {prefix}{name} has no effect with {prefix}{other}, given by "
                                f"{sources.get(other, source)}", path=sources.get(name, source),
                                hint=f"{name}: {fields[name].metadata['help']}. Drop {prefix}{name}, or drop "
                                     f"{prefix}{other}")
    kwargs = {k: _read_setting(fields[k], hints[k], v, prefix + k, sources.get(k, source)) for k, v in data.items()}
    cfg = cls(**kwargs)
    if not prefix:  # nested dataclasses are checked with their parent
        check_config(cfg, source, sources=sources)
    return cfg


def _read_setting(f: dataclasses.Field, tp: Any, value: Any, key: str, source: str) -> Any:
    """One given value of field `f` (type `tp`) as the config holds it: read as its type (`_coerce`), a path's
    `~` expanded."""
    typed = _coerce(value, tp, key, source)
    if f.metadata.get("path") and isinstance(typed, str) and typed.startswith("~"):
        return os.path.expanduser(typed)
    return typed


def resolved_settings(cls: type, data: dict, source: str = "<config>") -> dict:
    """The settings `data` gives config class `cls`, as the values they resolve to: each read as its field's
    type (`tau: 1` is 1.0, `lr: 1e-3`, which YAML 1.1 reads as text, is 0.001, `bf16: false` and `"false"` are
    alike) and left out when that is the field's default; a key that is no field is kept as given. Two
    mappings that build the same config resolve to equal dicts: what `gdrt run` and `gdrt sweep` compare
    (a stage's identity, the resume check). A value that cannot be read is a GdrtError naming it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    resolved = {}
    for key, value in data.items():
        if key not in fields:
            resolved[key] = value
            continue
        f = fields[key]
        typed = _read_setting(f, hints[key], value, key, source)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if default is dataclasses.MISSING or typed != default or isinstance(typed, bool) != isinstance(default, bool):
            resolved[key] = typed
    return resolved


def set_dotted(data: dict, key: str, value: Any, where: str | None = None) -> None:
    """data[a][b][c] = value for key "a.b.c", creating the dicts on the way; a parent that holds a value
    other than a dict is a GdrtError naming the key (and `where`, the file or flag it came from).

    A mapping set onto a mapping is merged into it key by key (a flag never drops the --set entries of the
    same section); a single value set onto a section of settings is a GdrtError naming both."""
    *parents, last = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise GdrtError(f"{key!r}: {p!r} is not a settings dict", path=where)
    if isinstance(data.get(last), dict):
        value = set_value(value, dict, key, where or "--set")  # `--set model={lora: true}` onto a section
        if not isinstance(value, dict):
            inner = ", ".join(f"{key}.{k}" for k in data[last])
            raise GdrtError(f"{key!r} is given both as a single value ({value!r}) and as a section ({inner})",
                            path=where, hint=f"{key} is not a section of settings: drop the {inner} setting(s)")
        for k, v in value.items():
            set_dotted(data[last], str(k), v, where)
        return
    data[last] = value


def parse_yaml(text: str) -> Any:
    """`text` read as YAML (PyYAML's safe loader, YAML 1.1: `1e-3` is text, `010` the octal 8), except that a
    key given twice in one mapping is a yaml.YAMLError naming it and its two lines, where PyYAML keeps the
    last silently (two `tau:` lines, two variants of one name), and so is a key YAML reads as a number that
    does not print as written (`010:` is 8, `1_000:` 1000, `1:30:` 90: a variant would be renamed), and a
    value written as an integer YAML 1.1 reads otherwise than a person does (`010` octal, `1:30` base 60;
    `surprising_int`). The project's one YAML reader: config and
    sweep files (`read_yaml`), `--set` values (`set_value`), MLmodel files (`gdrt_core.registry`)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass


@functools.cache
def _unique_key_loader() -> type:
    """yaml.SafeLoader whose mappings refuse a key given twice (the error carries `duplicate` = (key, line of
    the first, line of the second), 1-based; keys brought in by a merge, `<<: *base`, may be overridden) or a
    number key that does not print as written (`renamed` = (text, number, line)), and whose integers refuse
    `surprising_int` text (`surprising` = (text, number, line))."""
    import yaml
    from yaml.constructor import ConstructorError

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_yaml_int(self, node):
            value = super().construct_yaml_int(node)
            if surprising_int(node.value):
                error = ConstructorError(None, None, f"{node.value!r} reads as the number {value}", node.start_mark)
                error.surprising = (node.value, value, node.start_mark.line + 1)
                raise error
            return value

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}  # key -> the mark of its first occurrence
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    if key_node.tag == "tag:yaml.org,2002:int":  # a number as a key is judged below, as a key
                        key = yaml.SafeLoader.construct_yaml_int(self, key_node)
                    else:
                        key = self.construct_object(key_node, deep=deep)
                    if isinstance(key, (int, float)) and not isinstance(key, bool) and key_node.value != str(key):
                        error = ConstructorError("while constructing a mapping", node.start_mark,
                                                 f"the key {key_node.value!r} reads as the number {key!r}",
                                                 key_node.start_mark)
                        error.renamed = (key_node.value, key, key_node.start_mark.line + 1)
                        raise error
                    try:
                        earlier = first.setdefault(key, key_node.start_mark)
                    except TypeError:  # an unhashable key: the base class names it
                        continue
                    if earlier is not key_node.start_mark:
                        error = ConstructorError("while constructing a mapping", node.start_mark,
                                                 f"found the key {key!r} twice (first on line {earlier.line + 1})",
                                                 key_node.start_mark)
                        error.duplicate = (key, earlier.line + 1, key_node.start_mark.line + 1)
                        raise error
            return super().construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
    return UniqueKeyLoader


def surprising_int(text: str) -> bool:
    """YAML 1.1 integer text that does not mean what a person reads: a leading 0 (`010`, octal 8) or colons
    (`1:30`, base 60: 90). Hexadecimal (`0x1F`), binary and `1_000` are written on purpose and pass."""
    digits = text.replace("_", "").lstrip("+-")
    return ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1:].isdigit())


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file holding a mapping (read by `parse_yaml`); a missing file, text that is not UTF-8, bad YAML, a
    key given twice in one mapping, an empty file (nothing but comments) or a value other than a mapping is a
    GdrtError naming the file (and the line of a byte that is not UTF-8, or of the second key). Every config
    file (a stage's --config, the pipeline config of `gdrt run`, a sweep file) is read here, so they are
    refused alike."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = f.read()
        loaded = parse_yaml(data.decode("utf-8"))
    except FileNotFoundError:
        raise GdrtError(f"{what} not found", path=str(path)) from None
    except UnicodeDecodeError as e:
        raise GdrtError(f"the {what} is not UTF-8 text (byte 0x{data[e.start]:02x})", path=str(path),
                        line=data[: e.start].count(b"\n") + 1,
                        hint="save it as UTF-8, e.g. `iconv -f ITS-ENCODING -t UTF-8`") from None
    except yaml.YAMLError as e:
        if hasattr(e, "duplicate"):
            key, first, second = e.duplicate
            raise GdrtError(f"the {what} gives the key {key!r} twice, on line {first} and line {second}",
                            path=str(path), line=second,
                            hint="YAML would keep only the last value, silently: keep one of them") from None
        if hasattr(e, "surprising"):
            text, number, line = e.surprising
            kind = "base 60" if ":" in text else "octal"
            raise GdrtError(f"the {what} has the value {text!r}, which YAML reads as the number {number} ({kind})",
                            path=str(path), line=line,
                            hint=f"write {number} if you mean it, else drop the leading zero, or quote the "
                                 f"text (\"{text}\")") from None
        if hasattr(e, "renamed"):
            text, number, line = e.renamed
            raise GdrtError(f"the {what} has the key {text!r}, which YAML reads as the number {number!r}",
                            path=str(path), line=line,
                            hint=f"quote it to keep it as written (\"{text}\":)") from None
        raise GdrtError(f"invalid YAML: {e}", path=str(path)) from None
    if not isinstance(loaded, dict):
        found = "nothing (it is empty)" if loaded is None else article(type(loaded).__name__)
        raise GdrtError(f"the {what} must hold a mapping of settings (key: value lines), not {found}",
                        path=str(path), hint="write its settings into it as `key: value` lines")
    return loaded


def check_text_keys(mapping: dict, source: str, *, what: str = "config", under: str = "",
                    kind: str = "setting name", sources: dict[str, str] | None = None) -> None:
    """Refuse a key of `mapping` that YAML read as something other than text (`1:`, `true:`, `null:`) where a
    {kind} (a setting name, a variant name) is expected: a GdrtError naming the key, the keys above it
    (`under`) and the file it came from (`sources`: key -> where it was given, else `source`). `from_dict`,
    `pipelines.params.check_pipeline_params` and the sweep reader call it where their keys are names;
    `read_yaml` takes any key (a mapping may be keyed by numbers)."""
    for key in mapping:
        if not isinstance(key, str):
            where = f" under {under}" if under else ""
            if key is None or isinstance(key, bool):  # say what was typed: YAML's reading is not it
                typed = {None: "an empty key, null or ~", True: "on, yes or true", False: "off, no or false"}[key]
                reading = f"{'no value' if key is None else 'a bool'} (from {typed} unquoted)"
                quoted = {None: '"null":', True: '"on":, "yes": or "true":', False: '"off":, "no": or "false":'}[key]
            else:
                reading, quoted = article(type(key).__name__), f'"{key}":'
            shown = "null" if key is None else repr(key)
            raise GdrtError(f"the {what} has the key {shown}{where}, which YAML reads as {reading}, not a {kind}",
                            path=(sources or {}).get(str(key), source),
                            hint=f"quote it as written ({quoted}) if it is meant as a name, else remove it")


def parse_override(item: str) -> tuple[str, SetText]:
    """`key=value` (from --set) as (key, the value as typed): how it is read depends on the type of the
    setting it is given to (`set_value`: text as typed, anything else as YAML)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise GdrtError(f"override {item!r} is not of the form key=value", path="--set")
    return key.strip(), SetText(value)


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
    explicit_are_flags: bool = False,
    **explicit: Any,
) -> T:
    """YAML file (optionally one `section` of it) < `key=value` overrides < explicit keyword values.

    Explicit values of None are ignored (an unset CLI flag keeps the file's or the default value). An error
    in one setting names where its value came from: the file, `--set key=value`, or (`explicit_are_flags`)
    the command's flag `--key`.
    """
    data: dict = {}
    sources: dict[str, str] = {}
    source = str(path) if path else "<command line>"
    if path:
        loaded = read_yaml(path)
        if section is not None:
            loaded = loaded.get(section, {}) or {}
            if not isinstance(loaded, dict):
                raise GdrtError(f"section {section!r} must hold a mapping of settings", path=str(path))
        data.update(loaded)
        sources.update(dict.fromkeys(map(str, loaded), source))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value, where=f"--set {item}")
        sources[key.split(".")[0]] = f"--set {item}"
    for k, v in explicit.items():
        if v is not None:
            where = "--" + k.replace("_", "-") if explicit_are_flags else source
            set_dotted(data, k, v, where=where)
            sources[k.split(".")[0]] = where
    given = list(dict.fromkeys(sources.values()))
    whole = source if given in ([], [source]) else " with ".join([source, ", ".join(w for w in given if w != source)])
    return from_dict(cls, data, source=whole, sources=sources)


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
