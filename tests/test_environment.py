"""The three descriptions of the tested set agree: pyproject.toml's open ranges admit the locked
versions, environment.yml pins what constraints.txt pins, and the README's commands (the ones
CI runs) install through the lock."""

import pathlib
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCK = "-c constraints.txt"


def _pyproject_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", line), f"constraints.txt: not a name==version pin: {line}"
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _environment_pip_lines() -> list[str]:
    """The `- pip:` list of environment.yml (a plain line reader: the file is ours and simple)."""
    lines, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
        elif in_pip and stripped.startswith("- "):
            lines.append(stripped[2:].strip())
        elif in_pip and stripped and not stripped.startswith("#"):
            in_pip = False
    return lines


def test_every_requirement_is_locked_within_its_range():
    pins = _constraints()
    for group, requirements in _pyproject_requirements().items():
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} ({group}) has no pin in constraints.txt; run scripts/lock_versions.py"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"


def test_environment_yml_pins_the_locked_versions_of_the_direct_requirements():
    pins = _constraints()
    lines = _environment_pip_lines()
    assert LOCK in lines and "-e ." in lines, "environment.yml should install the course through constraints.txt"
    env = {}
    for line in lines:
        if not line.startswith("-"):
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"not pinned: {line}"
            env[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    direct = _pyproject_requirements()
    wanted = {canonicalize_name(r.name) for r in direct["core"] + direct["test"]}
    assert set(env) == wanted, "environment.yml and pyproject.toml (core and test) name different packages"
    assert env == {n: pins[n] for n in env}, "environment.yml and constraints.txt pin different versions"


def test_core_packages_are_required():
    groups = _pyproject_requirements()
    assert {"torch", "jupyterlab", "matplotlib", "numpy", "ipywidgets", "transformers", "peft"} <= \
        {canonicalize_name(r.name) for r in groups["core"]}
    assert {"pytest", "nbval"} <= {canonicalize_name(r.name) for r in groups["test"]}


def test_the_readme_installs_the_locked_set_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"^python -m pip install .*$", readme, flags=re.M)
    assert installs and all(LOCK in line for line in installs), "each README install command should use the lock"
    commands = re.findall(r"^(python -m pip install .*pytest)$", readme, flags=re.M)
    assert commands, "README should give the test command as one line"
    assert commands[0] in ci.splitlines(), "CI must run exactly the README's test command"
