"""The conda route and the pip route install the same things, and the README's commands
are the ones CI runs."""

import pathlib
import re

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject_requirements() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"core": set(project["dependencies"]), "test": set(project["optional-dependencies"]["test"])}


def _environment_pip_requirements() -> set[str]:
    """The `- pip:` list of environment.yml (a plain line reader: the file is ours and simple)."""
    reqs, in_pip = set(), False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
        elif in_pip and stripped.startswith("- "):
            reqs.add(stripped[2:].strip())
        elif in_pip and stripped and not stripped.startswith("#"):
            in_pip = False
    return reqs


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    pyproject = _pyproject_requirements()
    env = {r for r in _environment_pip_requirements() if not r.startswith("-e")}
    assert env == pyproject["core"] | pyproject["test"], "environment.yml and pyproject.toml disagree"
    assert "-e ." in _environment_pip_requirements(), "environment.yml should install the course package"


def test_core_packages_are_required():
    names = {_name(r) for r in _pyproject_requirements()["core"]}
    assert {"torch", "jupyterlab", "matplotlib", "numpy", "ipywidgets", "transformers", "peft"} <= names
    assert {"pytest", "nbval"} <= {_name(r) for r in _pyproject_requirements()["test"]}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python -m pip install .*pytest)$", readme, flags=re.M)
    assert commands, "README should give the test command as one line"
    assert commands[0] in ci.splitlines(), "CI must run exactly the README's test command"
