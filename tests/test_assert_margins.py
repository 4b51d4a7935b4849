"""benchmarks/assert_margins.py: which comparisons an assert is made of, and what the record call measures."""

import contextlib
import io
import random
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch


@pytest.fixture
def margins(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import assert_margins

    return assert_margins


@pytest.mark.parametrize("source, found, unmeasured", [
    ("assert a > b and c <= d", [(1, "a > b"), (1, "c <= d")], 0),
    ("x = 1\nassert 0.5 < x / y < 2, x", [(2, "0.5 < x / y"), (2, "x / y < 2")], 0),
    ("assert (phi[:, 0] > 5 * level).all(), phi", [(1, "phi[:, 0] > 5 * level")], 0),
    ("assert all(v > 0 for v in xs if v)\nassert n == 3\nassert check(x)", [(1, "all(v > 0 for v in xs if v)")], 2),
    ("assert all(check(v) for v in xs) and all([a < b for a, b in p])", [(1, "all(a < b for a, b in p)")], 0),
    ("assert a != b and a >= c", [(1, "a >= c")], 0),
    ("assert x > 0.5 > 0.2 > y", [(1, "x > 0.5"), (1, "0.2 > y")], 0),  # 0.5 > 0.2 measures nothing
    ("for v in xs:\n    if v:\n        assert v > 0", [(3, "v > 0")], 0),  # at any depth
    ("%time x = 1\nassert x > 0", [(2, "x > 0")], 0),  # a magic line does not hide the cell
])
def test_comparisons_of_each_assert(margins, source, found, unmeasured):
    _, planned, missed = margins.instrument(source, 0)
    assert [(line, text) for _, line, text in planned] == found and missed == unmeasured


def _run(margins, source, namespace, functions=None):
    """Run an instrumented cell as the kernel would, after the record call's definition; its rows."""
    exec(margins.record_source(), namespace)
    code, _, _ = margins.instrument(source, 7, functions)
    exec(code, namespace)
    return {r[2]: dict(zip(margins.KEYS, r)) for r in namespace["_assert_margins_rows"].values()}


def test_a_loop_keeps_each_assert_s_worst_pass(margins):
    rows = _run(margins, "for x, y in [(3.0, 1.0), (2.0, 1.5), (4.0, 1.0)]:\n    assert x > y", {})
    row = rows["x > y"]
    assert (row["cell"], row["line"], row["passes"]) == (7, 2, 3)
    assert (row["a"], row["b"], row["margin"]) == (2.0, 1.5, 0.5) and row["relative"] == pytest.approx(0.25)


def test_a_one_line_function_is_read_through_in_its_own_scope(margins):
    cells = ["def beats(x, y):  # by more than the spread\n    return x[0] - y[0] > max(x[1], y[1])",
             "def lower(x, y):\n    m, n = t[x], t[y]\n    return m < n",
             "def worst(table, run):\n    return max(run[k] for run in table.values() for k in run) < 10",
             "def twice(v):\n    return v + v > 0"]
    functions = margins.one_line_functions(cells)
    assert set(functions) == {"beats", "worst", "twice"}  # lower has two statements: not read through
    calls = []
    namespace = {"e": (0.9, 0.1), "b": (0.5, 0.2), "table": {"a": {"k": 3}}, "run": "not this one",
                 "counted": lambda: calls.append(1) or 2.0, "t": {1: 0, 2: 1}}
    for cell in cells:
        exec(cell, namespace)
    source = "assert beats(e, b) and lower(1, 2) and worst(table, run)\nassert twice(counted())"
    rows = _run(margins, source, namespace, functions)
    assert rows["beats(e, b): x[0] - y[0] > max(x[1], y[1])"]["margin"] == pytest.approx(0.2)
    assert rows["worst(table, run): max((run[k] for run in table.values() for k in run)) < 10"]["a"] == 3
    assert len(calls) == 2  # counted() ran once for the record, once for the assert itself, not twice more
    assert rows["twice(counted()): v + v > 0"]["a"] == 4.0


def test_all_of_a_generator_keeps_its_worst_element_and_evaluates_each_once(margins):
    calls = []
    namespace = {"xs": [3.0, 1.5, 4.0], "limit": lambda: calls.append(1) or 1.0}
    rows = _run(margins, "assert all(x > limit() for x in xs if x < 4)", namespace)
    row = rows["all(x > limit() for x in xs if x < 4)"]
    assert (row["a"], row["b"], row["margin"]) == (1.5, 1.0, 0.5) and row["relative"] == pytest.approx(1 / 3)
    assert len(calls) == 2 + 2  # the record: once per element kept by the if; the assert itself: once per element
    ts = [torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)]  # tensors, as sides are
    row = _run(margins, "assert all(t > 0.1 for t in ts)", {"ts": ts})["all(t > 0.1 for t in ts)"]
    assert (row["a"], row["b"]) == (0.5, 0.1) and row["relative"] == pytest.approx(0.8)


def test_record_measures_the_worst_element_and_leaves_the_generators_alone(margins):
    namespace = {"phi": torch.tensor([0.5, 0.2, 0.9]), "level": 0.02, "torch": torch, "np": np, "random": random}
    source = ("assert (phi > 5 * level).all()\nassert phi.sum() < 10\n"
              "assert torch.rand(1).item() + np.random.rand() + random.random() < 3")  # a side that draws

    def next_draws(run):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        run()
        return random.random(), np.random.rand(), torch.rand(1).item()

    plain = next_draws(lambda: exec(source, dict(namespace)))
    rows = {}
    assert next_draws(lambda: rows.update(_run(margins, source, dict(namespace)))) == plain
    worst = rows["phi > 5 * level"]
    assert (worst["a"], worst["b"], worst["margin"]) == (pytest.approx(0.2), pytest.approx(0.1), pytest.approx(0.1))
    assert rows["phi.sum() < 10"]["margin"] == pytest.approx(10 - 1.6)


def test_a_side_that_cannot_be_a_number_is_reported_not_raised(margins):
    row = _run(margins, "assert s > 'a'", {"s": "b"})["s > 'a'"]
    assert row["margin"] is None and "not evaluated" in row["relative"]


def test_the_notebook_prints_its_rows_and_collect_reads_them(margins, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 2"),
                                         nbformat.v4.new_code_cell("assert x > 1 and x == 2\nassert x")])
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    ready, planned, unmeasured = margins.instrumented(path)
    assert planned == [(1, 1, "x > 1")] and unmeasured == 1  # code cells counted as nbval does: from 0
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for cell in ready.cells:
            exec(cell.source, namespace) if cell.cell_type == "code" else None
    ready.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed.getvalue())]
    (row,) = margins.collect(ready)
    assert (row["cell"], row["line"], row["text"], row["margin"], row["passes"]) == (1, 1, "x > 1", 1.0, 1)
