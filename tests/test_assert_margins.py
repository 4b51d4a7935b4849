"""benchmarks/assert_margins.py: which comparisons an assert is made of, and what the probe measures."""

import contextlib
import io
import json

import pytest
import torch


@pytest.fixture
def margins(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import assert_margins

    return assert_margins


@pytest.mark.parametrize("source, found, unmeasured", [
    ("assert a > b and c <= d", [(1, "a", ">", "b"), (1, "c", "<=", "d")], 0),
    ("x = 1\nassert 0.5 < x / y < 2, x", [(2, "0.5", "<", "x / y"), (2, "x / y", "<", "2")], 0),
    ("assert (phi[:, 0] > 5 * level).all(), phi", [(1, "phi[:, 0]", ">", "5 * level")], 0),
    ("assert all(v > 0 for v in xs)\nassert n == 3\nassert check(x)", [], 3),
    ("assert a != b and a >= c", [(1, "a", ">=", "c")], 0),
    ("assert x > 0.5 > 0.2 > y", [(1, "x", ">", "0.5"), (1, "0.2", ">", "y")], 0),  # 0.5 > 0.2 measures nothing
    ("for v in xs:\n    assert v > 0", [], 0),  # inside a loop: its variable is gone afterwards
    ("%time x = 1\nassert x > 0", [], 0),  # IPython magic: not Python, skipped
])
def test_comparisons_of_each_top_level_assert(margins, source, found, unmeasured):
    assert margins.cell_asserts(source) == (found, unmeasured)


def test_an_assert_is_read_through_a_one_line_function_of_the_notebook(margins):
    cells = ['def beats(x, y):  # by more than the spread\n    return x[0] - y[0] > max(x[1], y[1])',
             'def lower(x, y):\n    m, n = t[x], t[y]\n    return m < n',
             'def loop(x):\n    return loop(x) > 0']
    functions = margins.one_line_functions(cells)
    assert set(functions) == {"beats", "loop"}  # lower has two statements: not read through
    assert margins.cell_asserts("assert beats(e, b) and lower(1, 2) and loop(3)", functions) == (
        [(1, "e[0] - b[0]", ">", "max(e[1], b[1])"), (1, "loop(3)", ">", "0")], 0)


def test_probe_measures_both_sides_where_the_assert_ran_and_leaves_the_generator_alone(margins):
    namespace = {"gain": 0.9, "base": 0.3, "phi": torch.tensor([0.5, 0.2, 0.9]), "level": 0.02, "torch": torch}
    exec(margins.probe_source(), namespace)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace["_assert_margins_probe"](4, [(1, "gain", ">", "2 * base"), (2, "base", "<", "gain"),
                                              (3, "phi", ">", "5 * level"), (4, "missing", ">", "0"),
                                              (5, "torch.rand(1).item() + 1", ">", "0")])
    assert torch.rand(1) == expected_next  # a side that drew a random number did not move the notebook's generator
    line = out.getvalue().strip()
    assert line.startswith(margins.MARK)
    probe = json.loads(line[len(margins.MARK):])
    assert probe["cell"] == 4
    (_, _, _, _, a1, b1, m1, r1), (*_, m2, r2), (*_, a3, b3, m3, r3), (*_, m4, r4), (*_, m5, _) = probe["rows"]
    assert (a1, b1) == (0.9, 0.6) and m1 == pytest.approx(0.3) and r1 == pytest.approx(0.3 / 0.9)
    assert m2 == pytest.approx(0.6) and r2 == pytest.approx(0.6 / 0.9)
    assert (a3, b3) == (pytest.approx(0.2), pytest.approx(0.1)) and m3 == pytest.approx(0.1)  # the worst element
    assert m4 is None and "not evaluated" in r4 and "missing" in r4
    assert m5 >= 1
