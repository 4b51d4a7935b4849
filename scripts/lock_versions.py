"""Write constraints.txt (and environment.yml's pins) from the environment the suite just passed in.

    python scripts/lock_versions.py            # in the virtual environment where `pytest` passed
    python scripts/lock_versions.py --check    # exit 1 if this environment differs from constraints.txt
    python scripts/lock_versions.py --check --extras test   # the same, for an environment with only that extra

The tested set is every package the README's commands install: the course with all its
extras (test, browser, dev, qlora) and everything they pull in, walked from the installed
package's own metadata, so packages that merely happen to be in the environment are left
out. torch is written without its local build label (`2.13.0`, not `2.13.0+cpu`), so the
same line admits the CPU and the CUDA build of one release.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
ENVIRONMENT = ROOT / "environment.yml"
PROJECT = "lora-course"
# environment.yml lists what `pip install -e ".[test]"` asks for directly; the rest comes from constraints.txt.
ENVIRONMENT_EXTRAS = ("test",)


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def locked_versions(project: str = PROJECT, extras: set[str] | None = None) -> dict[str, str]:
    """{canonical name: installed version} for `project` with `extras` (default: all) and their whole closure."""
    root = distribution(project)
    wanted = [(project, set(root.metadata.get_all("Provides-Extra") or []) if extras is None else set(extras))]
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    while wanted:
        name, extras = wanted.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed here; lock from a complete environment "
                             f"(pip install -e '.[test,browser,dev,qlora]')") from None
        if key != canonicalize_name(project):
            versions[key] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0
        for line in dist.requires or []:
            requirement = Requirement(line)
            if _applies(requirement, extras):
                wanted.append((requirement.name, set(requirement.extras)))
    return dict(sorted(versions.items()))


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} from a constraints file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def constraints_text(versions: dict[str, str]) -> str:
    today = datetime.date.today().isoformat()
    head = [
        "# The tested set: every package the README's commands install (the course, its test, browser, dev and",
        "# qlora extras, and everything they pull in) at the versions the whole suite last passed with.",
        f"# Written by scripts/lock_versions.py on {today} from that environment (Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}).",
        "# Use: python -m pip install -e \".[test]\" -c constraints.txt",
    ]
    return "\n".join(head + [f"{name}=={version}" for name, version in versions.items()]) + "\n"


def environment_pins(versions: dict[str, str]) -> list[str]:
    """environment.yml's pip lines: the course's direct requirements (core and test extra) pinned."""
    lines = []
    for line in distribution(PROJECT).requires or []:
        requirement = Requirement(line)
        marker = str(requirement.marker) if requirement.marker else ""
        if marker and not any(requirement.marker.evaluate({"extra": e}) for e in ENVIRONMENT_EXTRAS + ("",)):
            continue
        platform_only = re.sub(r'\s*and extra == "\w+"|extra == "\w+"\s*and\s*', "", marker)
        platform_only = "" if platform_only.startswith("extra ==") else platform_only
        pin = f"{requirement.name}=={versions[canonicalize_name(requirement.name)]}"
        lines.append(pin + (f"; {platform_only.strip('()')}" if platform_only else ""))
    return lines


def write_environment(versions: dict[str, str]) -> None:
    """Replace the pinned lines of environment.yml's pip section, keeping everything else."""
    text = ENVIRONMENT.read_text().splitlines()
    start = text.index("  - pip:") + 1
    end = start
    while end < len(text) and text[end].startswith("      "):
        end += 1
    kept = [line for line in text[start:end] if line.strip().startswith(("- -", "#"))]
    pins = [f"      - {line}" for line in environment_pins(versions)]
    ENVIRONMENT.write_text("\n".join(text[:start] + pins + kept + text[end:]) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare this environment with constraints.txt")
    parser.add_argument("--extras", help="with --check: the extras installed here, comma-separated (default: all)")
    args = parser.parse_args(argv)
    if args.extras and not args.check:
        parser.error("--extras goes with --check; the lock itself always covers every extra")
    versions = locked_versions(extras=set(args.extras.split(",")) if args.extras else None)
    if args.check:
        locked = read_constraints()
        changed = {n: (locked.get(n), v) for n, v in versions.items() if locked.get(n) != v}
        gone = [] if args.extras else sorted(set(locked) - set(versions))
        for name, (old, new) in changed.items():
            print(f"{name}: locked {old or '(not locked)'}, here {new}")
        for name in gone:
            print(f"{name}: locked {locked[name]}, not installed here")
        print(f"{len(changed) + len(gone)} package(s) differ from constraints.txt" if changed or gone
              else "this environment is the locked set")
        return 1 if changed or gone else 0
    CONSTRAINTS.write_text(constraints_text(versions))
    write_environment(versions)
    print(f"wrote {CONSTRAINTS.name} ({len(versions)} packages) and environment.yml's pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
