"""How far each notebook assert is from failing: every numeric comparison, its two sides and its margin.

A notebook's claims are asserts such as `assert gain_rs > 3 * gain_r`. Passing says nothing of
how close they came: a claim that holds by 1% breaks with the next library release or CPU, and
a fast-mode budget can only be cut where its asserts have room. This script re-executes each
notebook (nothing is written back) with a probe cell after every cell that asserts; the probe
evaluates both sides of each comparison in the kernel, right where the assert ran, and restores
the random generators so the rest of the notebook runs as it would have.

    python benchmarks/assert_margins.py                 # every notebook, fast mode
    python benchmarks/assert_margins.py 06b 10 --modes fast,full

For `a > b` (or `>=`) the margin is a - b, for `a < b` it is b - a; relative, it is divided by
the larger of |a| and |b|. `x and y` counts each part, `a < b < c` each pair, `(A > B).all()`
its worst element, and a call to a one-line function of the notebook (`beats(e, b)`) is read
through it. Asserts on anything else (`==`, a checker's True, `all(...)` of a generator) are
counted, not measured. Read the thin ones, do not just count them: a bound that holds with
equality by construction (`ratio >= 1 - 1e-12`) shows 0%, while a tolerance a gap of 0 meets
(`gap < 1e-6`) shows 100%.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import json
import sys
from pathlib import Path

import nbformat
from bench_course import NOTEBOOKS, run_notebook

MARK = "ASSERT_MARGINS "
SIGNS = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:  # an IPython magic: not Python
        return None


def one_line_functions(sources) -> dict[str, ast.FunctionDef]:
    """The notebook's top-level functions whose body is a single `return <expression>`, such as
    `def beats(x, y): return x[0] - y[0] > max(x[1], y[1])`: an assert that calls one is read through it."""
    found = {}
    for tree in filter(None, map(_parse, sources)):
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            body, args = node.body[1:] if ast.get_docstring(node) else node.body, node.args
            if (len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None
                    and not (args.vararg or args.kwarg or args.defaults or args.kwonlyargs or args.posonlyargs)):
                found[node.name] = node
    return found


class _Arguments(ast.NodeTransformer):
    def __init__(self, values: dict[str, ast.expr]):
        self.values = values

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return self.values.get(node.id, node)


def comparisons(test: ast.expr, functions: dict[str, ast.FunctionDef] | None = None) -> list[tuple[str, str, str]]:
    """The numeric comparisons an assert's test is made of, as (left, op, right) source texts."""
    functions = functions or {}
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [c for value in test.values for c in comparisons(value, functions)]
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr == "all" and (
            not test.args and isinstance(test.func.value, ast.Compare)):
        return comparisons(test.func.value, functions)  # (A > B).all(): elementwise
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in functions:
        fn = functions[test.func.id]
        params = [a.arg for a in fn.args.args]
        if len(test.args) == len(params) and not test.keywords:  # read through it, the arguments put in
            body = _Arguments(dict(zip(params, test.args))).visit(copy.deepcopy(fn.body[-1].value))
            return comparisons(body, {k: f for k, f in functions.items() if k != fn.name})  # no recursion
    if not isinstance(test, ast.Compare):
        return []
    sides = [test.left, *test.comparators]
    return [(ast.unparse(a), SIGNS[type(op)], ast.unparse(b))
            for a, op, b in zip(sides, test.ops, sides[1:])
            if type(op) in SIGNS and not (isinstance(a, ast.Constant) and isinstance(b, ast.Constant))]


def cell_asserts(source: str, functions: dict[str, ast.FunctionDef] | None = None
                 ) -> tuple[list[tuple[int, str, str, str]], int]:
    """A cell's top-level asserts: their comparisons as (line, left, op, right), and how many asserts
    hold none. A cell Python cannot parse (an IPython magic) has none."""
    tree = _parse(source)
    found, unmeasured = [], 0
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assert):
            parts = comparisons(node.test, functions)
            found += [(node.lineno, *part) for part in parts]
            unmeasured += not parts
    return found, unmeasured


def _probe(cell: int, found: list) -> None:
    """Runs in the kernel after cell `cell`: both sides of each comparison, its margin, one JSON line."""
    import random

    import numpy as np
    import torch

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    rows = []
    for line, left, op, right in found:
        try:
            a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=float)
                    for v in (eval(left, globals()), eval(right, globals())))
            margin = a - b if op.startswith(">") else b - a
            rel = margin / np.maximum(np.maximum(abs(a), abs(b)), 1e-12)
            worst = np.unravel_index(np.argmin(rel), rel.shape) if rel.ndim else ()
            rows.append([line, left, op, right, float(np.broadcast_to(a, rel.shape)[worst]),
                         float(np.broadcast_to(b, rel.shape)[worst]), float(margin[worst]), float(rel[worst])])
        except Exception as error:  # a side that needs the loop or function the assert sat in
            rows.append([line, left, op, right, None, None, None, f"not evaluated: {error!r}"[:100]])
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    print("ASSERT_MARGINS " + json.dumps({"cell": cell, "rows": rows}))  # MARK


def probe_source() -> str:
    """The probe as code for the kernel: defines `_assert_margins_probe(cell, found)`."""
    return "import json\n" + inspect.getsource(_probe).replace("def _probe", "def _assert_margins_probe")


def probed(path: Path) -> tuple[nbformat.NotebookNode, int]:
    """The notebook with a probe cell after each code cell that asserts; how many asserts are not measured."""
    nb = nbformat.read(path, as_version=4)
    cells, code_index, unmeasured = [], 0, 0
    helper = probe_source()
    functions = one_line_functions(c.source for c in nb.cells if c.cell_type == "code")
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type != "code":
            continue
        found, missed = cell_asserts(cell.source, functions)
        unmeasured += missed
        if found:
            cells.append(nbformat.v4.new_code_cell(f"{helper}\n_assert_margins_probe({code_index}, {found!r})"))
        code_index += 1
    nb.cells = cells
    return nb, unmeasured


def margins(path: Path, fast: bool, timeout: int) -> tuple[list[dict], int]:
    """Run the probed notebook; one row per comparison: cell (nbval's code-cell number), line, text, sides,
    margin, relative margin (or why it was not evaluated)."""
    nb, unmeasured = probed(path)
    run_notebook(path, fast=fast, timeout=timeout, nb=nb)
    rows = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for line in out.get("text", "").splitlines() if out.get("name") == "stdout" else []:
                if line.startswith(MARK):
                    probe = json.loads(line[len(MARK):])
                    keys = ("line", "left", "op", "right", "a", "b", "margin", "relative")
                    rows += [{"cell": probe["cell"], **dict(zip(keys, row))} for row in probe["rows"]]
    return rows, unmeasured


def show(name: str, mode: str, rows: list[dict], unmeasured: int, thin: float) -> None:
    print(f"\n{name}, {mode} mode: {len(rows)} comparisons, {unmeasured} asserts not measured")
    for r in sorted(rows, key=lambda r: r["relative"] if isinstance(r["relative"], float) else -1.0):
        text = f"{r['left']} {r['op']} {r['right']}"
        text = text if len(text) <= 70 else text[:67] + "..."
        if isinstance(r["relative"], float):
            flag = "  <- thin" if r["relative"] < thin else ""
            print(f"  cell {r['cell']:>2} line {r['line']:>2}  {r['relative']:>7.1%}  margin {r['margin']:<10.4g} "
                  f"({r['a']:.4g} {r['op']} {r['b']:.4g})  {text}{flag}")
        else:
            print(f"  cell {r['cell']:>2} line {r['line']:>2}  {'-':>7}  {r['relative']}  {text}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("numbers", nargs="*", help="notebook numbers (default: all), e.g. 04 06b")
    parser.add_argument("--modes", default="fast", help="comma-separated: fast, full (default: fast)")
    parser.add_argument("--thin", type=float, default=0.05, help="flag relative margins below this (default 0.05)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"full", "fast"}:
        parser.error(f"--modes takes fast and/or full, got {args.modes!r}")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if args.numbers:
        paths = [p for p in paths if p.name.split("_")[0] in args.numbers]
        if not paths:
            parser.error(f"no notebook numbered {args.numbers}")
    everything = []
    for path in paths:
        for mode in modes:
            rows, unmeasured = margins(path, fast=mode == "fast", timeout=args.timeout)
            show(path.name, mode, rows, unmeasured, args.thin)
            everything += [{"notebook": path.name, "mode": mode, **r} for r in rows]
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    measured = [r for r in everything if isinstance(r["relative"], float)]
    thin = [r for r in measured if r["relative"] < args.thin]
    print(f"\n{len(measured)} comparisons measured, {len(everything) - len(measured)} not evaluated; "
          f"{len(thin)} with a relative margin below {args.thin:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
