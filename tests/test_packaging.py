"""pyproject.toml's lower bounds are what CI tests: `.ci/lowest.txt` pins every direct dependency to its bound.

`.ci/run` installs the project with `-c .ci/lowest.txt` and runs the suite, so a bound raised or lowered in
pyproject.toml without the same change there (or the other way round) fails here, before it can go untested.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / ".ci" / "lowest.txt"
# Not pinned in lowest.txt: CI installs the local CPU wheel torch==2.13.0 first (a lower torch would mean a CUDA
# download of several GB), and that satisfies the bound.
NOT_PINNED = {"torch"}


def lower_bounds(pyproject: str) -> dict[str, str]:
    """{canonical name: lower bound} of every requirement in `dependencies` and every extra; each must have
    exactly one `>=` bound and nothing else, and a package named in several places must have one bound."""
    project = tomllib.loads(pyproject)["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    bounds: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        specs = list(req.specifier)
        assert [s.operator for s in specs] == [">="], f"{line!r}: want exactly one '>=' lower bound"
        name = canonicalize_name(req.name)
        assert bounds.setdefault(name, specs[0].version) == specs[0].version, f"{name}: two different bounds"
    return bounds


def pins(constraints: str) -> dict[str, str]:
    """{canonical name: version} of a constraints file of `name==version` lines (comments and blanks ignored)."""
    out: dict[str, str] = {}
    for raw in constraints.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert [s.operator for s in specs] == ["=="], f"{LOWEST.name}: {raw!r}: want name==version"
        name = canonicalize_name(req.name)
        assert name not in out, f"{LOWEST.name}: {name} pinned twice"
        out[name] = specs[0].version
    return out


def test_lowest_constraints_pin_every_lower_bound():
    bounds = lower_bounds((ROOT / "pyproject.toml").read_text())
    expected = {name: v for name, v in bounds.items() if name not in NOT_PINNED}
    assert pins(LOWEST.read_text()) == expected


def test_ci_installs_the_lowest_versions_and_runs_the_suite():
    script = (ROOT / ".ci" / "run").read_text()
    assert '-c .ci/lowest.txt' in script and script.rstrip().endswith("python -m pytest")


def test_the_checks_catch_drift():
    bounds = lower_bounds('[project]\ndependencies = ["numpy>=1.26", "Pillow >= 10.3"]\n'
                          '[project.optional-dependencies]\ntest = ["pytest>=8.0"]\n')
    assert bounds == {"numpy": "1.26", "pillow": "10.3", "pytest": "8.0"}
    assert pins("# lowest\nnumpy==1.26\npillow==10.3  # EXIF\n\npytest==8.0\n") == bounds
    assert pins("numpy==1.26\npillow==10.2\npytest==8.0\n") != bounds  # a bound raised in one place only


@pytest.mark.parametrize("bad", ["numpy", "numpy>=1.26,<3", "numpy==1.26", "numpy>1.26"])
def test_a_requirement_without_a_plain_lower_bound_is_refused(bad):
    with pytest.raises(AssertionError, match="lower bound"):
        lower_bounds(f'[project]\ndependencies = ["{bad}"]\n')
