"""What the lessons share: the checkers' verdict line and handling of blank answers, and `play`.

A checker takes the learner's answer, prints one line ("Correct: ..." or "Not yet: ...")
and returns whether the answer holds. A blank answer (the `...` placeholder, or None) and
a function that still raises NotImplementedError get "Not yet: fill in ...", never a
traceback; a learner's function that raises is reported, not re-raised.
"""

from __future__ import annotations

import torch

__all__ = ["report", "is_blank", "not_filled_in", "call_learner", "call_learner_fn", "sample_spectra", "close_to",
           "play"]


def report(ok: bool, message: str) -> bool:
    """Print a one-line verdict for the learner and return whether the answer holds."""
    print(("Correct: " if ok else "Not yet: ") + message)
    return bool(ok)


def is_blank(answer) -> bool:
    """An exercise still at its placeholder: `...` (Ellipsis) or None."""
    return answer is None or answer is Ellipsis


def not_filled_in(what: str) -> bool:
    """The verdict for a blank answer: not yet, and what to fill in."""
    return report(False, f"fill in {what}, then run this cell again.")


def call_learner(fn, *args):
    """Call the learner's function on `args`; returns (whatever it returned, None) or (None, verdict message)."""
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, ("fill in the body of your function (it still raises NotImplementedError), "
                      "then run this cell again.")
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        return None, f"your function raised {type(e).__name__}: {e}"


def call_learner_fn(fn, *args):
    """Call the learner's function on `args`; returns (number, None) or (None, verdict message)."""
    out, problem = call_learner(fn, *args)
    if problem:
        return None, problem
    try:
        return float(out), None
    except (TypeError, ValueError, RuntimeError):
        return None, (f"your function returned {type(out).__name__} {str(out)[:40]!r}; "
                      "return one number (a float or a 0-d tensor).")


def sample_spectra():
    """A few test spectra (descending, non-negative) that tell common mistakes apart."""
    g = torch.Generator().manual_seed(0)
    spectra = [torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)]
    for shape in [(9, 6), (5, 8)]:
        spectra.append(torch.linalg.svdvals(torch.randn(*shape, generator=g, dtype=torch.float64)))
    spectra.append(torch.tensor([10.0] + [1.0] * 20, dtype=torch.float64))
    return spectra


def close_to(got: float, want: float, rel: float, floor: float = 0.0) -> bool:
    """|got - want| <= rel * max(floor, |want|); False for NaN (so NaN never passes)."""
    return abs(got - want) <= rel * max(floor, abs(want))


def play(widget) -> None:
    """Show a live `ipywidgets.interactive`, then its default view drawn once more as a static output.

    The live view needs a running kernel; the static copy below it (a figure, or the HTML
    the widget writes) is what a reader sees where widgets do not run, such as a code host.
    """
    from IPython.display import display

    display(widget)
    widget.f(**widget.kwargs)  # the same drawing function with the sliders' current values
