"""The roles of settings, declared once beside each setting's type in the schema (`vis2ir.config.schema_*`).

A setting's roles say which checks it takes part in:

- `MODEL` ("model"): it shapes the model; a checkpoint only loads, or is fine-tuned, with the same value
  (`vis2ir.checkpoint.STRUCTURAL`).
- `LATENT` ("latent"): it decides a sample's cached latents (`vis2ir.latent_cache.LATENT_SETTINGS`).
- `RESUMABLE` ("resumable"): it may change on `vis2ir train --resume` (`vis2ir.train.RESUMABLE`).
- `DATA` ("data"): it identifies the training data (source, layout, split settings).

A field declares them in its annotation, `size: Annotated[int, LATENT] = 512`, or `Annotated[float, NO_ROLE]`
for a setting in none of them (fixed for a run, shaping neither the model nor the cached latents). A section
whose settings all share the same roles says so once with `@section_roles(...)` on its class. A setting that
declares nothing is a programming error (`UndeclaredRoles`), which the tests catch when a setting is added.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """One role marker (`name` empty: `NO_ROLE`, the explicit declaration of none)."""

    name: str


MODEL = Role("model")
LATENT = Role("latent")
RESUMABLE = Role("resumable")
DATA = Role("data")
NO_ROLE = Role("")
ROLES = ("model", "latent", "resumable", "data")

_SECTION = "__setting_roles__"


class UndeclaredRoles(TypeError):
    """A setting of the schema declares no roles (add `Annotated[type, ROLE...]` or `NO_ROLE`)."""


def section_roles(*roles: Role):
    """Class decorator: every setting of this section has `roles` (unless its own annotation says others)."""
    def mark(cls: type) -> type:
        setattr(cls, _SECTION, frozenset(r.name for r in roles if r.name))
        return cls
    return mark


def declared_roles(root: type, prefix: str = "") -> dict[str, frozenset[str]]:
    """{dotted key: its role names} for every setting of dataclass `root` and its sections, in schema order.
    Raises `UndeclaredRoles` naming the first setting that declares none."""
    out: dict[str, frozenset[str]] = {}
    hints = typing.get_type_hints(root, include_extras=True)
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        key = prefix + f.name
        markers = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Role)]
        bare = typing.get_args(tp)[0] if markers else tp
        if dataclasses.is_dataclass(bare):
            out.update(declared_roles(bare, key + "."))
        elif markers:
            out[key] = frozenset(m.name for m in markers if m.name)
        elif _SECTION in vars(root):
            out[key] = vars(root)[_SECTION]
        else:
            raise UndeclaredRoles(f"setting {key!r} declares no roles: annotate it Annotated[type, MODEL, ...] "
                                  f"(roles {', '.join(ROLES)}) or Annotated[type, NO_ROLE] (vis2ir.config.roles)")
    return out


def role_name(role: Role | str) -> str:
    """The name of `role` (a `Role` or its name), checked to be one of `ROLES`."""
    name = role.name if isinstance(role, Role) else role
    if name not in ROLES:
        raise ValueError(f"role {name!r}: expected one of {', '.join(ROLES)}")
    return name


def prefixes(roles: dict[str, frozenset[str]], role: Role | str) -> tuple[str, ...]:
    """The keys with `role` as dotted prefixes for `str.startswith`: a section whose settings all have it
    is one `section.` prefix (`sample.`), the others are whole keys."""
    name = role_name(role)
    keys = [k for k, r in roles.items() if name in r]
    out: list[str] = []
    for key in keys:
        parts = key.split(".")
        short = key
        for n in range(1, len(parts)):  # the shortest section that holds only keys with the role
            section = ".".join(parts[:n]) + "."
            if all(name in r for k, r in roles.items() if k.startswith(section)):
                short = section
                break
        if short not in out:
            out.append(short)
    return tuple(out)
