"""How far each notebook assert is from failing: every numeric comparison, its two sides and its margin.

A notebook's claims are asserts such as `assert gain_rs > 3 * gain_r`. Passing says nothing of
how close they came: a claim that holds by 1% breaks with the next library release or CPU, and
a fast-mode budget can only be cut where its asserts have room. This script re-executes each
notebook (nothing is written back) with every assert, at any depth, preceded by a call that
evaluates both sides of its comparisons in the assert's own scope, just before it runs; an
assert in a loop keeps its worst pass. The call saves and restores Python's, NumPy's and
torch's global random generators, so the notebook draws the numbers it would have drawn.

    python benchmarks/assert_margins.py                 # every notebook, fast mode
    python benchmarks/assert_margins.py 06b 10 --modes fast,full

For `a > b` (or `>=`) the margin is a - b, for `a < b` it is b - a; relative, it is divided by
the larger of |a| and |b|. `x and y` counts each part, `a < b < c` each pair, `(A > B).all()`
and `all(a < b for x in xs)` their worst element, and a call to a one-line function of the
notebook (`beats(e, b)`) is read through it (its arguments evaluated once). Asserts on anything
else (`==`, a checker's True, a function of several statements) are counted, not measured.
Both sides are evaluated once more than the notebook does: a side that calls a function with
its own generator would move it, and `all(...)` over an iterator kept in a variable would use
it up (no notebook does either). Read the thin ones, do not just count them: a bound that
holds with equality by construction (`ratio >= 1 - 1e-12`) shows 0%, while a tolerance a gap
of 0 meets (`gap < 1e-6`) shows 100%.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import json
import math
import sys
from pathlib import Path

import nbformat
from bench_course import NOTEBOOKS, run_notebook

MARK = "ASSERT_MARGINS "
RECORD = "_assert_margins_record"
SIGNS = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}
KEYS = ("cell", "line", "text", "op", "a", "b", "margin", "relative", "passes")


def parse(source: str) -> ast.Module | None:
    """A cell as Python (IPython's magics turned into the calls they make), or None if it is not."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except SyntaxError:
        return None


def one_line_functions(sources) -> dict[str, ast.FunctionDef]:
    """The notebook's top-level functions whose body is a single `return <expression>`, such as
    `def beats(x, y): return x[0] - y[0] > max(x[1], y[1])`: an assert that calls one is read through it."""
    found = {}
    for tree in filter(None, map(parse, sources)):
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            body, args = node.body[1:] if ast.get_docstring(node) else node.body, node.args
            if (len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None
                    and not (args.vararg or args.kwarg or args.defaults or args.kwonlyargs or args.posonlyargs)):
                found[node.name] = node
    return found


def comparisons(test: ast.expr, functions: dict[str, ast.FunctionDef] | None = None
                ) -> list[tuple[str, str, ast.expr]]:
    """The numeric comparisons an assert's test is made of: (text, op, pair), where the expression `pair`
    evaluates to (left, right) in the assert's scope."""
    functions = functions or {}
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [c for value in test.values for c in comparisons(value, functions)]
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr == "all" and (
            not test.args and isinstance(test.func.value, ast.Compare)):
        return comparisons(test.func.value, functions)  # (A > B).all(): elementwise
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "all" and not test.keywords
            and len(test.args) == 1 and isinstance(test.args[0], (ast.GeneratorExp, ast.ListComp))):
        comp = test.args[0]  # all(a < b for x in xs): each comparison at every x, as (lefts, rights)
        loops = " ".join(ast.unparse(g).strip() for g in comp.generators)
        return [(f"all({text} {loops})", op, ast.Call(ast.Name("tuple", ast.Load()), [ast.Call(
                    ast.Name("zip", ast.Load()), [ast.Starred(ast.ListComp(pair, copy.deepcopy(comp.generators)),
                                                               ast.Load())], [])], []))
                for text, op, pair in comparisons(comp.elt, functions)]
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in functions:
        fn = functions[test.func.id]
        if len(test.args) == len(fn.args.args) and not test.keywords and not any(
                isinstance(a, ast.Starred) for a in test.args):  # (lambda x, y: (l, r))(e, b): e, b evaluated once
            inner = comparisons(fn.body[-1].value, {k: f for k, f in functions.items() if k != fn.name})
            return [(f"{ast.unparse(test)}: {text}", op,
                     ast.Call(ast.Lambda(copy.deepcopy(fn.args), pair), copy.deepcopy(test.args), []))
                    for text, op, pair in inner]
    if not isinstance(test, ast.Compare):
        return []
    sides = [test.left, *test.comparators]
    return [(f"{ast.unparse(a)} {SIGNS[type(op)]} {ast.unparse(b)}", SIGNS[type(op)],
             ast.Tuple([copy.deepcopy(a), copy.deepcopy(b)], ast.Load()))
            for a, op, b in zip(sides, test.ops, sides[1:])
            if type(op) in SIGNS and not (isinstance(a, ast.Constant) and isinstance(b, ast.Constant))]


class _Instrument(ast.NodeTransformer):
    """Puts a record call before each assert with comparisons; counts the asserts without."""

    def __init__(self, cell: int, functions: dict[str, ast.FunctionDef]):
        self.cell, self.functions, self.planned, self.unmeasured = cell, functions, [], 0

    def visit_Assert(self, node: ast.Assert):
        parts = comparisons(node.test, self.functions)
        if not parts:
            self.unmeasured += 1
            return node
        no_args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
        rows = ast.List([ast.Tuple([ast.Constant(text), ast.Constant(op), ast.Lambda(no_args, pair)], ast.Load())
                         for text, op, pair in parts], ast.Load())
        self.planned += [(self.cell, node.lineno, text) for text, _, _ in parts]
        call = ast.Call(ast.Name(RECORD, ast.Load()), [ast.Constant(self.cell), ast.Constant(node.lineno), rows], [])
        return [ast.copy_location(ast.Expr(call), node), node]


def instrument(source: str, cell: int, functions: dict[str, ast.FunctionDef] | None = None
               ) -> tuple[str | None, list[tuple[int, int, str]], int]:
    """The cell with a record call before each assert that compares (None if it has none), the comparisons
    planned as (cell, line, text), and how many asserts hold no comparison. Line numbers are the cell's own."""
    tree = parse(source)
    if tree is None:
        return None, [], 0
    pass_ = _Instrument(cell, functions or {})
    tree = ast.fix_missing_locations(pass_.visit(tree))
    return (ast.unparse(tree) if pass_.planned else None), pass_.planned, pass_.unmeasured


def _record(cell: int, line: int, parts: list) -> None:
    """Runs in the kernel before an assert: both sides of each comparison; keeps each one's worst pass."""
    import random

    import numpy as np
    import torch

    def number(side):  # a number, an array, a tensor, or (from all(...)) a tuple of them
        if isinstance(side, tuple):
            return np.asarray([number(item) for item in side], dtype=float)
        return np.asarray(side.detach().cpu() if hasattr(side, "detach") else side, dtype=float)

    rows = globals().setdefault("_assert_margins_rows", {})
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        for text, op, pair in parts:
            try:
                a, b = map(number, pair())
                margin = a - b if op.startswith(">") else b - a
                rel = margin / np.maximum(np.maximum(abs(a), abs(b)), 1e-12)
                at = np.unravel_index(np.nanargmin(rel), rel.shape) if rel.ndim else ()  # the worst element
                row = [cell, line, text, op, float(np.broadcast_to(a, rel.shape)[at]),
                       float(np.broadcast_to(b, rel.shape)[at]), float(margin[at]), float(rel[at])]
            except Exception as error:  # e.g. a side that is not a number
                row = [cell, line, text, op, None, None, None, f"not evaluated: {error!r}"[:100]]
            old = rows.get((cell, line, text))
            worse = old is None or (isinstance(row[7], float) and not (isinstance(old[7], float) and old[7] <= row[7]))
            rows[(cell, line, text)] = [*(row if worse else old[:8]), 1 + (old[8] if old else 0)]
    random.setstate(state[0])
    np.random.set_state(state[1])


def record_source() -> str:
    """The record call as code for the kernel: defines `_assert_margins_record(cell, line, parts)`."""
    return inspect.getsource(_record).replace("def _record", f"def {RECORD}")


def instrumented(path: Path) -> tuple[nbformat.NotebookNode, list[tuple[int, int, str]], int]:
    """The notebook, ready to measure: a first cell defines the record call, each asserting cell records
    before its asserts, a last cell prints every row. Also the comparisons planned and the asserts without."""
    nb = nbformat.read(path, as_version=4)
    functions = one_line_functions(c.source for c in nb.cells if c.cell_type == "code")
    planned, unmeasured, code_index = [], 0, 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            source, found, missed = instrument(cell.source, code_index, functions)
            cell.source = source or cell.source
            planned, unmeasured, code_index = planned + found, unmeasured + missed, code_index + 1
    show_rows = f"print({MARK!r} + __import__('json').dumps(list(_assert_margins_rows.values())))"
    nb.cells = [nbformat.v4.new_code_cell(record_source()), *nb.cells,
                nbformat.v4.new_code_cell(f"_assert_margins_rows = globals().get('_assert_margins_rows', {{}})\n"
                                          f"{show_rows}")]
    return nb, planned, unmeasured


def collect(nb: nbformat.NotebookNode) -> list[dict]:
    """The rows the last cell printed, as dicts (KEYS)."""
    for out in nb.cells[-1].get("outputs", []):
        if out.get("name") == "stdout" and out.get("text", "").startswith(MARK):
            return [dict(zip(KEYS, row)) for row in json.loads(out["text"][len(MARK):])]
    return []


def margins(path: Path, fast: bool, timeout: int) -> tuple[list[dict], list[tuple[int, int, str]], int]:
    """Run the notebook instrumented: the rows, the comparisons that never ran, the asserts not measured."""
    nb, planned, unmeasured = instrumented(path)
    run_notebook(path, fast=fast, timeout=timeout, nb=nb)
    rows = collect(nb)
    seen = {(r["cell"], r["line"], r["text"]) for r in rows}
    return rows, [p for p in planned if p not in seen], unmeasured


def _worst_first(row: dict) -> float:
    rel = row["relative"]
    return rel if isinstance(rel, float) and not math.isnan(rel) else -math.inf


def show(name: str, mode: str, rows: list[dict], never: list, unmeasured: int, thin: float) -> None:
    print(f"\n{name}, {mode} mode: {len(rows)} comparisons, {unmeasured} asserts not measured"
          + (f", {len(never)} comparisons never reached" if never else ""))
    for r in sorted(rows, key=_worst_first):
        text = r["text"] if len(r["text"]) <= 80 else r["text"][:77] + "..."
        where = f"  cell {r['cell']:>2} line {r['line']:>2}" + (f" x{r['passes']}" if r["passes"] > 1 else "")
        if isinstance(r["relative"], float):
            flag = "  <- thin" if not r["relative"] >= thin else ""
            print(f"{where}  {r['relative']:>7.1%}  margin {r['margin']:<10.4g} ({r['a']:.4g} {r['op']} {r['b']:.4g})"
                  f"  {text}{flag}")
        else:
            print(f"{where}  {'-':>7}  {r['relative']}  {text}")


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
    everything, failed = [], []
    for path in paths:
        for mode in modes:
            try:
                rows, never, unmeasured = margins(path, fast=mode == "fast", timeout=args.timeout)
            except Exception as error:  # one notebook that fails does not lose the others' rows
                failed.append(f"{path.name} ({mode}): {type(error).__name__}: {str(error).strip()[-300:]}")
                print(f"\n{path.name}, {mode} mode: FAILED, see the end", flush=True)
                continue
            show(path.name, mode, rows, never, unmeasured, args.thin)
            everything += [{"notebook": path.name, "mode": mode, **r} for r in rows]
            if args.json:
                args.json.write_text(json.dumps(everything, indent=1))
    measured = [r for r in everything if isinstance(r["relative"], float)]
    thin = [r for r in measured if not r["relative"] >= args.thin]
    print(f"\n{len(measured)} comparisons measured, {len(everything) - len(measured)} not evaluated; "
          f"{len(thin)} with a relative margin below {args.thin:.0%}")
    for line in failed:
        print("failed:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
