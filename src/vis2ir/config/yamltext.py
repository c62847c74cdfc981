"""YAML for settings files: keys given twice are refused, and plain scalars keep their source text.

PyYAML's `safe_load` follows YAML 1.1: `20241207` is an integer, `0755` the octal 493, `yes` true,
`2024-12-07` a date, `1:30` the sexagesimal 90, and a key written twice silently takes its last value. A
setting that wants a string should get the text as written, and a number written `0755` should not become
493 without a word. `load(text)` returns the data as `yaml.safe_load` does plus `Texts`, the source text of
every plain (unquoted) scalar that YAML did not read as a string, by its container and key or index;
`as_setting` then picks, for one setting's type, the typed value or the text.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKey(Exception):
    """A mapping gives `key` twice: at 1-based `line`, first at `first`."""

    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"key {key!r} given twice (first at line {first})")
        self.key, self.line, self.first = key, line, first


class Texts(dict):
    """{(id(container), key or index): source text} of the plain scalars YAML read as other than strings."""

    def of(self, container: Any, key: Any) -> str | None:
        """The source text of `container[key]` where it was a plain scalar read as a non-string, else None."""
        return self.get((id(container), key))


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys and records plain scalars' text in `self.texts`."""

    def __init__(self, stream):
        super().__init__(stream)
        self.texts = Texts()

    def _note(self, container: Any, key: Any, node: yaml.Node, value: Any) -> None:
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        if plain and value is not None and not isinstance(value, str):
            self.texts[(id(container), key)] = node.value


def _construct_map(loader: _Loader, node: yaml.MappingNode):
    data: dict = {}
    yield data
    first: dict[Any, int] = {}
    for key_node, _ in node.value:  # the keys written here (merged `<<` ones may be overridden, as YAML says)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            line = first.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: the constructor names it below
            continue
        if line != key_node.start_mark.line + 1:
            raise DuplicateKey(key, key_node.start_mark.line + 1, line)
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    "found an unhashable key", key_node.start_mark) from None
        data[key] = value = loader.construct_object(value_node, deep=True)
        loader._note(data, key, value_node, value)


def _construct_seq(loader: _Loader, node: yaml.SequenceNode):
    data: list = []
    yield data
    for i, child in enumerate(node.value):
        data.append(value := loader.construct_object(child, deep=True))
        loader._note(data, i, child, value)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load(text: str) -> tuple[Any, Texts]:
    """The YAML document in `text` (as `yaml.safe_load` reads it) and the `Texts` of its plain scalars.
    Raises `DuplicateKey` for a key given twice in one mapping, `yaml.YAMLError` for invalid YAML."""
    loader = _Loader(text)
    try:
        return loader.get_single_data(), loader.texts
    finally:
        loader.dispose()


def scalar(text: str) -> tuple[Any, str | None]:
    """A command-line value `text` read as YAML (text that is not valid YAML stays text), and its source text
    where YAML read it as a non-string plain scalar (as `Texts` records it), else None."""
    try:
        value, texts = load(text)
    except (yaml.YAMLError, DuplicateKey):
        return text, None
    plain = isinstance(value, (bool, int, float)) or type(value).__module__ == "datetime"
    return value, (text.strip() if plain and not text.strip().startswith(("'", '"', "!")) else None)


_AMBIGUOUS_NUMBER = re.compile(r"[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def ambiguous_number(text: str) -> str | None:
    """Why YAML 1.1's reading of the plain scalar `text` as a number is a trap ('octal', 'base 60'), or None:
    `0755` reads as 493, `1:30` as 90."""
    m = _AMBIGUOUS_NUMBER.fullmatch(text.strip())
    if not m:
        return None
    return "octal" if m.group(1).lstrip("+-").startswith("0") and ":" not in text else "base 60"


class AmbiguousNumber(ValueError):
    """A plain scalar YAML reads as a number it does not look like (`0755`: 493), for a setting that takes
    no text."""


def as_setting(tp: Any, value: Any, text: str, accepts, where: str) -> Any:
    """The value of setting `where` (of type `tp`) written as the plain scalar `text`, which YAML read as the
    non-string `value`: `value` where `accepts(tp, value)` and the number is not ambiguous, else `text` where
    the type takes text (`output_dir: 0755` is '0755', `yes` is 'yes'), else `value` (for the type check to
    refuse). Raises `AmbiguousNumber` for `0755` or `1:30` given to a number setting that takes no text."""
    reason = ambiguous_number(text) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if reason is None and accepts(tp, value):
        return value
    if accepts(tp, text):
        return text
    if reason is not None and accepts(tp, value):
        raise AmbiguousNumber(f"{where}: {text} reads in YAML 1.1 as the {reason} number {value!r}; write the "
                              "number you mean in decimal, without a leading 0 or ':'")
    return value


def with_texts(tp: Any, value: Any, texts: Texts, accepts, where: str = "") -> Any:
    """`value` (read from YAML with `texts`) with every plain scalar under it settled by `as_setting` for the
    type the schema gives it: `tp` is a settings dataclass, a list or tuple type, or a setting's type. Keys
    the schema lacks are left for the type check to name."""
    import dataclasses
    import typing

    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        for key in list(value):
            if key in hints:
                dotted = f"{where}.{key}" if where else str(key)
                text = texts.of(value, key)
                value[key] = (as_setting(hints[key], value[key], text, accepts, dotted) if text is not None
                              else with_texts(hints[key], value[key], texts, accepts, dotted))
        return value
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (tuple, list) and isinstance(value, list) and args:
        for i, item in enumerate(value):
            item_tp = args[0] if len(args) == 1 or args[-1] is Ellipsis else args[min(i, len(args) - 1)]
            text = texts.of(value, i)
            value[i] = as_setting(item_tp, item, text, accepts, f"{where}[{i}]") if text is not None else item
    return value


def type_at(root: type, key: str) -> Any:
    """The type of dotted setting `key` in settings dataclass `root`, or None where there is no such setting."""
    import dataclasses
    import typing

    tp: Any = root
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp
