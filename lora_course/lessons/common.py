"""What the lessons share: one way to check a learner's answer, the safety net of the build steps, and `play`.

A check is a function that returns a success message or raises `Problem` with what is wrong, in words a learner
can act on; `verdict(check, ...)` prints "Correct: ..." or "Not yet: ..." and returns whether the answer holds.
`call(what, fn, ...)` runs the learner's code inside a check: a body that still raises NotImplementedError becomes
"fill in ...", any other error is reported, never a traceback. A blank answer (`...` or None) is caught with
`is_blank` before checking; `checker` does both for an exercise's check.

A build step (the lesson's core piece, written by the learner in the notebook) goes through `use_or_reference`:
the learner's piece if its check passes, else the reference from the lesson module, saying which one the notebook
continues with.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

__all__ = ["Problem", "report", "verdict", "call", "call_number", "is_blank", "not_filled_in", "checker",
           "one_word", "seeded", "use_or_reference", "sample_spectra", "close_to", "play"]


class Problem(Exception):
    """What is wrong with the learner's answer, in words a learner can act on."""


def report(ok: bool, message: str) -> bool:
    """Print a one-line verdict for the learner and return whether the answer holds."""
    print(("Correct: " if ok else "Not yet: ") + message)
    return bool(ok)


def verdict(check, *args, **kwargs) -> bool:
    """Run `check(*args)`: its message is "Correct", a `Problem` it raises is "Not yet"."""
    try:
        message = check(*args, **kwargs)
    except Problem as problem:
        return report(False, str(problem))
    return report(True, message)


def call(what: str, fn, *args):
    """`fn(*args)` inside a check: the learner's errors (a blank body or a blank answer included) become a `Problem`."""
    if is_blank(fn):
        raise Problem(f"fill in {what}, then run this cell again.")
    try:
        return fn(*args)
    except NotImplementedError:
        raise Problem(f"fill in {what} (it still raises NotImplementedError), then run this cell again.") from None
    except Problem:
        raise
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        raise Problem(f"{what} raised {type(e).__name__}: {e}") from None


def call_number(what: str, fn, *args) -> float:
    """`call`, for a function that must return one number (a float or a 0-d tensor)."""
    out = call(what, fn, *args)
    try:
        return float(out)
    except (TypeError, ValueError, RuntimeError):
        raise Problem(f"{what} returned {type(out).__name__} {str(out)[:40]!r}; return one number "
                      "(a float or a 0-d tensor).") from None


def is_blank(answer) -> bool:
    """An exercise still at its placeholder: `...` (Ellipsis) or None, or a list or tuple holding one."""
    if isinstance(answer, (list, tuple)):
        return any(map(is_blank, answer))
    return answer is None or answer is Ellipsis


def not_filled_in(what: str) -> bool:
    """The verdict for a blank answer: not yet, and what to fill in."""
    return report(False, f"fill in {what}, then run this cell again.")


def checker(what: str, answers: tuple[str, ...] = (), function: bool = False):
    """Decorator: a check (its message, or `Problem`) becomes a checker that prints its verdict and returns a bool.

    A blank answer asks to fill in `what`, formatted with the call's arguments (e.g. "... a {d} x {k} matrix").
    `answers` names the learner's arguments (default: the first); with `function`, each must be callable (a value,
    say the function called instead of passed, is "Not yet" with that hint)."""
    def wrap(check):
        signature = inspect.signature(check)
        names = answers or (next(iter(signature.parameters)),)

        @functools.wraps(check)
        def checked(*args, **kwargs) -> bool:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = [bound.arguments[name] for name in names]
            if any(map(is_blank, given)):
                return not_filled_in(what.format(**bound.arguments))
            if function and not all(map(callable, given)):
                value = next(a for a in given if not callable(a))
                return report(False, f"pass your function itself (the name, without calling it), not {value!r}.")
            return verdict(check, *args, **kwargs)

        return checked

    return wrap


def one_word(prediction, words: tuple[str, ...]) -> str:
    """The learner's one-word prediction, stripped and lower-cased, if it is one of `words`; else `Problem`."""
    word = prediction.strip().lower() if isinstance(prediction, str) else None
    if word not in words:
        quoted = [f'"{w}"' for w in words]
        raise Problem(f"predict with one word, {', '.join(quoted[:-1])} or {quoted[-1]}, not {prediction!r}.")
    return word


@contextlib.contextmanager
def seeded(seed: int = 0):
    """Draw on a stream of one's own, seeded: the same draws every run, the caller's random state kept.

    A context manager, and a decorator (`@seeded()`) for a check that should give the same verdict every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def use_or_reference(name: str, yours, check, reference, where: str):
    """A build step's safety net: `yours` if `check(yours)` passes, else `reference`, saying which is used.

    `check` is a checker that prints its verdict and returns a bool, or a check that returns its message or raises
    `Problem` (then printed here). `where` names the reference for the learner (e.g. "lora_course.quant.nf4_levels")."""
    try:
        out = check(yours)
    except Problem as problem:
        ok = report(False, str(problem))
    else:
        ok = report(True, out) if isinstance(out, str) else bool(out)
    if ok:
        print(f"The rest of this notebook uses your {name}.")
        return yours
    print(f"The rest of this notebook uses the reference {name} ({where}); fix yours and run this cell again "
          "to use it instead.")
    return reference


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

    The live view needs a running kernel; the static copy below it (a figure, or the HTML the widget writes) is
    what a reader sees where widgets do not run, such as a code host."""
    from IPython.display import display

    display(widget)
    widget.f(**widget.kwargs)  # the same drawing function with the sliders' current values
