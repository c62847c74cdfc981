"""The settings reference behind `vis2ir config show`: every setting's meaning, read from the comments beside
its field in the schema's source (`vis2ir.config.schema_*`), and a config as commented YAML."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml

from vis2ir.config.schema import Config


class _Source:
    """One schema module's source: its lines, its comments by line number and its classes' syntax trees."""

    def __init__(self, path: str):
        source = Path(path).read_text(encoding="utf-8")
        self.lines = source.splitlines()
        self.comments = {t.start[0]: t.string.lstrip("#").strip()
                         for t in tokenize.generate_tokens(io.StringIO(source).readline)
                         if t.type == tokenize.COMMENT}
        self.classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields(self, cls: type) -> dict[str, ast.AnnAssign]:
        """The annotated assignments (fields) in the body of class `cls`, by name."""
        return {n.target.id: n for n in self.classes[cls.__name__].body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}

    def meaning(self, node: ast.AnnAssign) -> str:
        """The comment lines right above field `node` and the comment beside its last line, joined."""
        above, line = [], node.lineno - 1
        while line in self.comments and self.lines[line - 1].lstrip().startswith("#"):
            above.insert(0, self.comments[line])
            line -= 1
        beside = (self.comments.get(node.end_lineno)
                  if not self.lines[node.end_lineno - 1].lstrip().startswith("#") else None)
        return " ".join([*above, *([beside] if beside else [])])


def setting_meanings() -> dict[str, str]:
    """Every setting's one-line meaning by dotted key, and each section's (`model.semantic`): the comment
    beside or above its field in the schema's source, or the section class's docstring's first line. The
    comments are the one source of truth; a test checks that every setting has one."""
    sources: dict[str, _Source] = {}
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        path = inspect.getsourcefile(cls)
        if path not in sources:
            sources[path] = _Source(path)
        source = sources[path]
        nodes = source.fields(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out[prefix + f.name] = (hints[f.name].__doc__ or "").strip().splitlines()[0]
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = source.meaning(nodes[f.name])

    walk(Config, "")
    return out


def describe_settings(cfg: Config) -> str:
    """`cfg` as commented YAML: every setting with its value and its meaning (`setting_meanings`). The text
    is a valid config file: saved, it loads back to `cfg`."""
    meanings = setting_meanings()

    def inline(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True) \
            .removesuffix("\n").removesuffix("\n...")

    def section(d: dict, prefix: str, indent: str) -> list[str]:
        rows = []
        for key, value in d.items():
            text = meanings.get(prefix + key, "")
            if isinstance(value, dict):
                rows.append(f"{indent}{key}:{'  # ' + text if text else ''}")
                rows += section(value, f"{prefix}{key}.", indent + "  ")
            else:
                rows.append(f"{indent}{key}: {inline(value)}" + (f"  # {text}" if text else ""))
        return rows

    return "\n".join(section(cfg.to_dict(), "", "")) + "\n"

