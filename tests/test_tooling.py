"""Contributor tooling: constraints.txt pins what CI installs, setup.py's floors are those
versions, the pre-commit hooks run the pinned ruff, py.typed is packaged, and
scripts/test.sh installs with the pins (or, with --newest, without them)."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# Pinned elsewhere: torch by TORCH_SPEC in scripts/test.sh; setuptools is the build backend's.
NOT_PINNED = {"torch", "setuptools"}


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def _setup_requirements() -> dict[str, list[Requirement]]:
    """install_requires (under "") and every extra of setup.py, read from its source."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )
    keywords = {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if k.arg in ("install_requires", "extras_require", "package_data")
    }
    groups = {"": keywords["install_requires"], **keywords["extras_require"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def _closure(extras: tuple[str, ...]) -> set[str]:
    """Names of the installed distributions distill-jax[extras] pulls in, recursively."""
    seen: dict[str, set[str]] = {}
    stack = [("distill-jax", set(extras))]
    while stack:
        name, wanted = stack.pop()
        key = canonicalize_name(name)
        wanted = wanted | {""}
        if wanted <= seen.get(key, set()):
            continue
        seen.setdefault(key, set()).update(wanted)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                continue
            stack.append((req.name, set(req.extras)))
    return set(seen) - {"distill-jax"}


def test_constraints_pin_everything_the_test_extra_installs():
    pins = _constraints()
    needed = _closure(("test",)) - NOT_PINNED
    assert not needed - set(pins), f"not in constraints.txt: {sorted(needed - set(pins))}"
    assert not NOT_PINNED & set(pins)


@pytest.mark.skipif(
    os.environ.get("DISTILL_JAX_NEWEST") != "0",
    reason="only under scripts/test.sh with the pins (not --newest)",
)
def test_installed_versions_are_the_pinned_ones():
    """scripts/test.sh hides pip's chatter: this is where a pin that did not apply shows."""
    differ = {}
    for name, version in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. the dev extra's tools, which the test extra does not install
        if installed != version:
            differ[name] = (installed, version)
    assert not differ, f"installed vs constraints.txt: {differ}"


def test_version_floors_are_the_tested_versions():
    """Every requirement of setup.py that the tests install has the version constraints.txt
    pins (torch: TORCH_SPEC's) as its floor; one they do not install has no floor."""
    pins = {**_constraints(), "torch": "2.13.0"}
    floors, untested = {}, set()
    for reqs in _setup_requirements().values():
        for req in reqs:
            key = canonicalize_name(req.name)
            if key == "distill-jax":  # the dev extra naming the test extra
                continue
            specs = list(req.specifier)
            if key not in pins:
                assert not specs, f"setup.py: {req} is not tested, so it has no floor"
                untested.add(key)
                continue
            assert [s.operator for s in specs] == [">="], f"setup.py: {req} needs one floor"
            floors[key] = specs[0].version
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "ruff"} <= set(floors)
    assert untested <= {"tensorflow"}, untested
    wrong = {k: (v, pins[k]) for k, v in floors.items() if pins[k] != v}
    assert not wrong, f"setup.py floor vs constraints.txt: {wrong}"


def test_pre_commit_runs_the_pinned_ruff():
    config = (REPO / ".pre-commit-config.yaml").read_text()
    versions = set(re.findall(r"ruff==([0-9][^\]\s,]*)", config))
    assert versions == {_constraints()["ruff"]}, versions
    assert "id: ruff-check" in config and "id: ruff-format" in config


def test_py_typed_is_packaged():
    assert (REPO / "distill_jax" / "py.typed").is_file()
    tree = ast.parse((REPO / "setup.py").read_text())
    (package_data,) = [
        ast.literal_eval(k.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for k in node.keywords
        if k.arg == "package_data"
    ]
    assert "py.typed" in package_data["distill_jax"]


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A virtualenv whose python only records how it was called."""
    log = tmp_path / "calls.log"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return tmp_path / "venv", log


@pytest.mark.parametrize("newest", [None, "flag", "env"])
def test_test_sh_installs_with_the_pins_unless_newest(tmp_path, newest):
    venv, log = _fake_venv(tmp_path)
    env = {**os.environ, "VENV": str(venv), "DISTILL_JAX_MINILM": str(tmp_path)}
    env.pop("DISTILL_JAX_NEWEST", None)
    env.pop("TORCH_SPEC", None)
    args = ["bash", str(REPO / "scripts" / "test.sh"), "-k", "x"]
    if newest == "flag":
        args.insert(2, "--newest")
    elif newest == "env":
        env["DISTILL_JAX_NEWEST"] = "1"
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip install") and "pip" != c.split()[-1]]
    assert len(installs) == 2, calls
    # --newest is test.sh's, not pytest's; the user's arguments come last, so `-n 0` wins
    assert (
        calls[-1]
        == "-m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder -k x"
    )
    if newest:
        assert all(
            "--upgrade --upgrade-strategy eager" in c and " -c " not in c for c in installs
        ), installs
        assert installs[0].endswith(" torch")
    else:
        pins = f"-c {REPO / 'constraints.txt'}"
        assert all(pins in c and "--upgrade" not in c for c in installs), installs
        assert installs[0].endswith(" torch==2.13.0")
