"""Loading settings: a YAML file (or `$XFL_CONFIG`) and dotted `key.path=value` overrides into the schema's
dataclasses (`vis2ir.config.schema`), keys and value types checked on the way.

An unknown key names the closest valid one; a bad value says what is allowed. With no config file, the
`XFL_CONFIG` environment variable is used (the original launch convention). YAML is read by
`vis2ir.config.yamltext` (keys given twice refused, plain scalars kept as written).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vis2ir.config import yamltext
from vis2ir.config.checks import ConfigError
from vis2ir.config.migrate import move_renamed, renamed_hint, replace_retired
from vis2ir.config.schema import Config
from vis2ir.errors import first_line


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """Read `path` (or `$XFL_CONFIG`, or the defaults), apply `key.path=value` overrides, validate.

    With `base` (a resumed run's settings), the file's settings and the overrides go over `base`
    instead of over the defaults.
    """
    return from_dict(Config, _raw_settings(path, overrides, base)).validate()


def check_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Check the keys and value types of a config file and overrides, without the range checks that
    depend on the base a command puts them over (a checkpoint's or a resumed run's settings). Cheap and
    torch-free: commands call it before importing torch, so a typo is answered at once."""
    from_dict(Config, _raw_settings(path, overrides))


def _raw_settings(path: str | Path | None, overrides, base: Config | None = None) -> dict[str, Any]:
    """The nested settings of `path` (or `$XFL_CONFIG`) over `base`, with the overrides put in."""
    if path is None:
        path = os.environ.get("XFL_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        texts = yamltext.Texts()
        raw = read_yaml(path, texts) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, sample, eval)")
        replace_retired(raw, path)
        move_renamed(raw, path)
        _settle_texts(lambda: yamltext.with_texts(Config, raw, texts, _accepts), path)
    if base is not None:
        raw = _merge(base.to_dict(), raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. model.semantic.num_heads=16")
        value, text = yamltext.scalar(value)
        hint = renamed_hint(key.strip(), value)
        if hint:
            raise ConfigError(hint)
        tp = yamltext.type_at(Config, key.strip())
        if text is not None and tp is not None:
            value = _settle_texts(lambda: yamltext.as_setting(tp, value, text, _accepts, key.strip()), None)
        _set_dotted(raw, key.strip(), value)
    return raw


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a setting of type `tp` takes `value` as it is."""
    try:
        _coerce(tp, value, "")
    except ConfigError:
        return False
    return True


def _settle_texts(settle, path: Path | None) -> Any:
    """`settle()` (`yamltext`'s choice of a plain scalar's number or text), its refusal a `ConfigError`."""
    try:
        return settle()
    except yamltext.AmbiguousNumber as err:
        raise ConfigError(f"{path}: {err}" if path else f"override {err}") from None


def read_yaml(path: str | Path, texts: yamltext.Texts | None = None) -> Any:
    """The YAML document in file `path`. A syntax error is a one-line `ConfigError` that starts
    `FILE:LINE:COLUMN:` (1-based, as editors count) and says what the parser expected; a key given twice in
    one mapping is one too (`FILE:LINE: key 'x' given twice (first at line N)`). With `texts`, the source
    text of the plain scalars YAML read as non-strings is put in it (`vis2ir.config.yamltext.Texts`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({first_line(err)})") from None
    try:
        data, found = yamltext.load(text)
    except yamltext.DuplicateKey as err:
        raise ConfigError(f"{path}:{err.line}: {err}; keep one of them") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(f"{where}: not valid YAML: {err.problem or first_line(err)}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if texts is not None:
        texts.update(found)
    return data


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(filter(None, [where, close[0]]))!r}?" if close else ""
            raise ConfigError(f"unknown setting {dotted!r}{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _describe(tp: Any) -> str | None:
    """What a value of a simple type looks like, for messages; None for other types."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return {bool: "true or false", int: "an integer", float: "a number"}.get(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                last = err
        described = [_describe(option) for option in inner]
        if len(inner) > 1 and all(described):  # e.g. bool | Literal["auto"]: "true, false or 'auto'"
            raise ConfigError(f"{where}: expected {' or '.join(described)}, got {value!r}")
        raise last
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _merge(old: dict, new: dict) -> dict:
    """`old` with `new`'s values put in, section by section."""
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
