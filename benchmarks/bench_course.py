"""Re-execute every notebook in full and in fast mode and print how long each took, from one run.

The course promises a learner that notebooks 01-05 take at most 2 minutes together in full
mode and that no notebook takes more than 10. This script measures it: each notebook runs
top to bottom in a fresh kernel (nbclient, the engine nbconvert and nbval drive), nothing
is written back, and the table also shows what the committed notebook's own cell timings
add up to, so that stale timings (recorded on a loaded machine) stand out.

    python benchmarks/bench_course.py                  # every notebook, full then fast mode
    python benchmarks/bench_course.py --modes full 03  # only notebook 03, full mode
    python benchmarks/bench_course.py --modes "" --suite  # the README's test command (`pytest`), timed whole

The budget it checks: fast mode at most 2 minutes a notebook; the README's test command at
most 3 minutes on 2 CPU cores (5 with the browser tests); `LORA_COURSE_FAST=0 pytest` at
most 15 (`--suite --suite-mode full`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FULL_01_05_LIMIT_S = 120
NOTEBOOK_LIMIT_S = 600
FAST_NOTEBOOK_LIMIT_S = 120
SUITE_LIMIT_S = {"fast": 180, "full": 900}


def committed_seconds(path: Path) -> float | None:
    """What the committed notebook's cell timings add up to (None if it holds no timings)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    total, seen = 0.0, False
    for cell in nb["cells"]:
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            total += (datetime.fromisoformat(end.replace("Z", "+00:00"))
                      - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
            seen = True
    return total if seen else None


def run_notebook(path: Path, fast: bool, timeout: int, nb=None) -> float:
    """Seconds to execute `path` top to bottom in a fresh kernel, in fast or full mode; `nb` (an nbformat
    notebook) runs in its place, in its folder, and keeps the outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4) if nb is None else nb
    env = {"LORA_COURSE_FAST": "1" if fast else "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", startup_timeout=300,
                                resources={"metadata": {"path": str(path.parent)}})
        t0 = time.perf_counter()
        client.execute()
        return time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("numbers", nargs="*", help="notebook numbers to run (default: all), e.g. 03 06")
    parser.add_argument("--modes", default="full,fast", help="comma-separated: full, fast (default: both)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--suite", action="store_true", help="also time the README's test command, `pytest`, whole")
    parser.add_argument("--suite-mode", choices=("fast", "full"), default="fast", help="the mode `pytest` runs in")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if (not modes and not args.suite) or set(modes) - {"full", "fast"}:
        parser.error(f"--modes takes full and/or fast, got {args.modes!r}")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if args.numbers:
        paths = [p for p in paths if p.name[:2] in args.numbers]
        if not paths:
            parser.error(f"no notebook numbered {args.numbers}")

    print(f"{'notebook':<36} " + " ".join(f"{m + ' (s)':>10}" for m in modes) + f" {'committed (s)':>14}")
    results = {}
    for path in paths:
        row = {m: run_notebook(path, fast=(m == "fast"), timeout=args.timeout) for m in modes}
        results[path.name] = row
        committed = committed_seconds(path)
        shown = f"{committed:>14.1f}" if committed is not None else f"{'-':>14}"
        print(f"{path.name:<36} " + " ".join(f"{row[m]:>10.1f}" for m in modes) + f" {shown}", flush=True)

    if "full" in modes:
        early = [r["full"] for name, r in results.items() if name[:2] in {"01", "02", "03", "04", "05"}]
        slowest = max(results, key=lambda n: results[n]["full"])
        print()
        if len(early) == 5:
            print(f"full mode, notebooks 01-05 together: {sum(early):.0f} s (target <= {FULL_01_05_LIMIT_S} s)")
        print(f"full mode, slowest notebook: {slowest} {results[slowest]['full']:.0f} s "
              f"(target <= {NOTEBOOK_LIMIT_S} s)")
        for name, row in results.items():
            committed = committed_seconds(NOTEBOOKS / name)
            if committed is not None:
                print(f"committed timings / this run, {name}: {committed / row['full']:.2f}")
    if "fast" in modes:
        slowest = max(results, key=lambda n: results[n]["fast"])
        print(f"fast mode, all notebooks one after another: {sum(r['fast'] for r in results.values()):.0f} s; "
              f"slowest {slowest} {results[slowest]['fast']:.0f} s (target <= {FAST_NOTEBOOK_LIMIT_S} s)")
    if args.suite:
        print(f"the README's test command ({args.suite_mode} mode): {time_suite(args.suite_mode):.0f} s "
              f"(target <= {SUITE_LIMIT_S[args.suite_mode]} s on 2 CPU cores, browser tests aside)")
    return 0


def time_suite(mode: str) -> float:
    """Wall seconds of `pytest` in the repository (its configured workers), as the README runs it; raises on failure."""
    env = {**os.environ, "LORA_COURSE_FAST": "1" if mode == "fast" else "0"}
    env.pop("CI", None)  # a plain learner's run: browser tests skip where Chromium or Playwright is missing
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"pytest failed (exit {done.returncode}):\n" + done.stdout[-3000:])
    print(done.stdout.strip().splitlines()[-1])
    return seconds


if __name__ == "__main__":
    raise SystemExit(main())
