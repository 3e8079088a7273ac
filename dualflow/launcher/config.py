"""Typed configuration: a TOML file plus ``--section.key=value`` overrides, parsed into frozen dataclasses.

Any tree of dataclasses works: a field whose type is a dataclass is a TOML table (``[section]``), every
other field a key. Every problem is collected before anything is built, then reported at once: unknown
keys (with the valid keys of their table and the nearest match), wrong types (expected vs received),
required keys that are missing, and errors raised by the dataclasses' own ``__post_init__``.

A dataclass declares the values each key admits in its ``__post_init__`` with :func:`check_fields`,
which also runs when the class is built directly in Python:

    def __post_init__(self) -> None:
        check_fields(self, "optim", lr=Range(gt=0), schedule=OneOf("cosine", "constant"))

    @dataclass(frozen=True)
    class Optim:
        lr: float = 3e-4
        betas: tuple[float, float] = (0.9, 0.95)

    @dataclass(frozen=True)
    class Job:
        steps: int = 100
        optim: Optim = field(default_factory=Optim)

    cfg = load_config(Job, "job.toml", ["--optim.lr=1e-3", "--steps=10"])
    log_config(cfg)  # printed once (rank 0), saved as config.toml beside the logs

Override values are TOML values (``3e-4``, ``true``, ``[1, 2]``, ``"text"``); a bare word is a string,
and ``none`` sets an optional field to None. ``None`` is written to TOML as a commented-out key, so an
optional field should default to None.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dualflow.utils.files import atomic_write_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")
_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """Everything wrong with a configuration, one problem per line (a single problem on the first line)."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}")
        else:
            super().__init__(f"{source}: {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems))


class _Mismatch(Exception):
    pass


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**63 else f"{v:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key admits: ``Range(ge=1)``, ``Range(gt=0, lt=1)``; never NaN or infinite.

    ``note`` says what a boundary value means (``Range(ge=0, note="0: off")``).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def admits(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        bounds = [f"{op} {_number(b)}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if b is not None]
        return " and ".join(bounds) + (f" ({self.note})" if self.note else "")


class OneOf:
    """The values a key admits, listed: ``OneOf("mha", "mla")``."""

    def __init__(self, *choices: Any) -> None:
        self.choices = choices

    def admits(self, v: Any) -> bool:
        return v in self.choices and not (isinstance(v, bool) and not any(isinstance(c, bool) for c in self.choices))

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


def check_fields(cfg: Any, section: str, **checks: Range | OneOf) -> None:
    """Check a config dataclass where it is built (call it first in ``__post_init__``).

    Every field is checked against its type, and each field named in ``checks`` against its
    :class:`Range` or :class:`OneOf`. Raises :class:`ConfigError` with one line per bad key, each key
    written as the user writes it (``section.key``), with what is expected and the value received.
    Fields that are config sections are left to their own ``__post_init__``; None passes where the type
    allows it.
    """
    hints = _hints(type(cfg))
    if unknown := sorted(set(checks) - set(hints)):
        raise TypeError(f"check_fields: {type(cfg).__name__} has no field {', '.join(unknown)}")
    problems = []
    for name, tp in hints.items():
        key, value = f"{section}.{name}" if section else name, getattr(cfg, name)
        if _is_config(tp):
            continue
        try:
            _convert(value, tp)
        except _Mismatch:
            problems.append(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
            continue
        check = checks.get(name)
        if check is not None and value is not None and not check.admits(value):
            what = "" if isinstance(check, OneOf) else type_name(tp).replace(" | None", "") + " "
            problems.append(f"{key}: expected {what}{check}, got {value!r}")
    if problems:
        raise ConfigError(problems, f"invalid {section or type(cfg).__name__} config")


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def type_name(tp: Any) -> str:
    """A readable name for a field type: ``int``, ``tuple[float, ...]``, ``'a' | 'b'``, ``int | None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value if isinstance(m.value, str) else m.name) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``; raises _Mismatch. Accepts already-typed values (a Path for Path...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_convert(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_convert(v, item) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        kt, vt = args or (Any, Any)
        return {_convert(k, kt): _convert(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for m in tp:
            if value == m.name or (value == m.value and not isinstance(value, bool)):
                return m
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        if isinstance(value, str | os.PathLike):
            return tp(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _parse_override_value(raw: str, tp: Any) -> Any:
    """A command-line value for a field of type ``tp``: as TOML when that fits the type, else the raw text."""
    args = typing.get_args(tp)
    if raw.strip().lower() in _NONE_WORDS and type(None) in args:
        return None
    try:
        parsed = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = raw
    try:
        return _convert(parsed, tp)
    except _Mismatch:
        if parsed is raw or parsed == raw:
            raise
        return _convert(raw, tp)  # "--name=1" for a str field is the text "1"


def config_keys(cls: type) -> dict[str, tuple[Any, Any]]:
    """Every settable key of the tree, dotted (``optim.lr``), with its type and default (MISSING if required)."""
    out: dict[str, tuple[Any, Any]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_config(tp):
            out.update({f"{f.name}.{k}": v for k, v in config_keys(tp).items()})
        else:
            out[f.name] = (tp, _default(f))
    return out


def _unknown(key: str, valid: Iterable[str], where: str) -> str:
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(valid) or '(none)'}"


def _build(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    start = len(problems)
    where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
    for key in data:
        if key not in hints:
            problems.append(_unknown(prefix + key, (prefix + k for k in hints), where))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], prefix + f.name
        if _is_config(tp):
            sub = data.get(f.name, {})
            if not isinstance(sub, Mapping):
                problems.append(f"{path}: is a section (table) of keys "
                                f"{', '.join(path + '.' + k for k in _hints(tp))}, got {type(sub).__name__} {sub!r}")
                continue
            kwargs[f.name] = _build(tp, sub, path + ".", problems)
        elif f.name in data:
            try:
                kwargs[f.name] = _convert(data[f.name], tp)
            except _Mismatch:
                v = data[f.name]
                problems.append(f"{path}: expected {type_name(tp)}, got {type(v).__name__} {v!r}")
        elif _default(f) is dataclasses.MISSING:
            problems.append(f"{path}: required ({type_name(tp)}), not set")
    if len(problems) > start:
        return None  # the problems are reported together; nothing is constructed
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # from check_fields: the problems name their keys
        problems.extend(exc.problems)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
    return None


def parse_override(text: str) -> tuple[str, str]:
    """``--optim.lr=1e-3`` (or ``optim.lr=1e-3``) -> ``("optim.lr", "1e-3")``."""
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {text!r} is not --section.key=value"])
    return key.strip(), value


def _apply_overrides(cls: type, data: dict[str, Any], overrides: Iterable[str], problems: list[str]) -> None:
    for text in overrides:
        try:
            key, raw = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node, tp, table = data, cls, []
        parts = key.split(".")
        for i, part in enumerate(parts):
            hints = _hints(tp)
            where = f"[{'.'.join(table)}]" if table else "the top level"
            if part not in hints:
                problems.append(_unknown(key, ('.'.join([*table, k]) for k in hints), where) + f" (from {text!r})")
                break
            field_tp = hints[part]
            if i == len(parts) - 1:
                if _is_config(field_tp):
                    problems.append(f"{key} is a section; set its keys instead: "
                                    + ", ".join(f"{key}.{k}" for k in _hints(field_tp)))
                    break
                try:
                    node[part] = _parse_override_value(raw, field_tp)
                except _Mismatch:
                    problems.append(f"{key}: expected {type_name(field_tp)}, got {raw!r} (from {text!r})")
                break
            if not _is_config(field_tp):
                problems.append(f"{'.'.join(parts[:i + 1])} is a key of type {type_name(field_tp)}, not a section "
                                f"(from {text!r})")
                break
            existing = node.get(part)
            node[part] = dict(existing) if isinstance(existing, Mapping) else {}
            node, tp = node[part], field_tp
            table.append(part)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                data: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then the TOML file at ``path`` (or the mapping ``data``), then ``overrides``.

    Raises :class:`ConfigError` listing every problem found.
    """
    if not _is_config(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    source = str(path) if path is not None else "config"
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"file not found: {path}"], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source) from None
    if data is not None:
        tree = _merge(tree, data)
    problems: list[str] = []
    _apply_overrides(cls, tree, overrides, problems)
    cfg = _build(cls, tree, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (nested dicts; enums, paths and tuples as TOML would hold them)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, enum.Enum):
        return v.value if isinstance(v.value, str | int) and not isinstance(v.value, bool) else v.name
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are valid in a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to TOML")


def to_toml(cfg: Any) -> str:
    """The config as a TOML document that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []

    def emit(obj: Any, table: str) -> None:
        subs = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                subs.append((f.name, v))
            elif v is None:
                lines.append(f"# {_toml_key(f.name)} = none")
            else:
                lines.append(f"{_toml_key(f.name)} = {_toml_value(_plain(v))}")
        for name, sub in subs:
            full = f"{table}.{_toml_key(name)}" if table else _toml_key(name)
            lines.append("")
            lines.append(f"[{full}]")
            emit(sub, full)

    emit(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write :func:`to_toml` to ``path`` (folders created; replaced atomically: never half a file); returns it."""
    return atomic_write_text(path, to_toml(cfg))


def log_config(cfg: Any, log_dir: str | os.PathLike | None = None, name: str = "config.toml") -> Path | None:
    """Print the resolved config once (global rank 0) and save it as ``log_dir/name`` (rank 0).

    ``log_dir`` defaults to ``$DUALFLOW_LOG_DIR``, which ``dualflow launch`` sets for its workers.
    Returns the saved path, or None when there is no log folder or this is not rank 0.
    """
    from dualflow.utils.logging import current_rank

    if current_rank() != 0:
        return None
    text = to_toml(cfg)
    print(f"resolved config ({type(cfg).__name__}):\n{text}", end="", flush=True)
    folder = log_dir if log_dir is not None else os.environ.get("DUALFLOW_LOG_DIR")
    return save_config(cfg, Path(folder) / name) if folder else None


def split_overrides(cls: type, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take the config overrides out of a command line: ``(["optim.lr=1e-3", ...], rest)``.

    An override is ``--KEY=VALUE`` or ``--KEY VALUE`` where KEY is a key of ``cls`` or any dotted name
    (so a misspelt ``--optim.lrr=1`` is reported as unknown by :func:`load_config`, not passed on).
    """
    keys = set(config_keys(cls))
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if name and (name in keys or "." in name):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(arg[2:])  # no value: parse_override reports it
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


_DEST = "config_override:"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--config PATH`` plus one ``--KEY VALUE`` option per key of ``cls`` (listed by ``--help``).

    Pair with :func:`config_from_args`. Prefix abbreviations are turned off, so that ``--optim.l`` never
    silently means ``--optim.lr``; an unknown key is an error that lists the valid ones.
    """
    parser.add_argument("--config", type=Path, default=None, metavar="TOML", help="configuration file")
    group = parser.add_argument_group(f"configuration keys ({cls.__name__}); override the file")
    keys = config_keys(cls)
    for key, (tp, default) in keys.items():
        shown = "required" if default is dataclasses.MISSING else f"default {_plain(default)!r}"
        group.add_argument(f"--{key}", dest=_DEST + key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{type_name(tp)}, {shown}")
    parser.allow_abbrev = False
    plain_error = parser.error

    def error(message: str) -> typing.NoReturn:
        unknown = [t[2:].partition("=")[0] for t in message.split() if t.startswith("--") and "." in t]
        if unknown:
            message += "\n" + "\n".join(_unknown(k, keys, cls.__name__) for k in unknown)
        plain_error(message)

    parser.error = error  # type: ignore[method-assign]


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config of a namespace parsed with :func:`add_config_arguments`'s options."""
    overrides = [f"{dest[len(_DEST):]}={value}" for dest, value in vars(args).items() if dest.startswith(_DEST)]
    return load_config(cls, getattr(args, "config", None), overrides)
