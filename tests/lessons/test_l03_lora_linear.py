"""Notebook 03's lesson module: the reference passes every build check, the notebook's blank skeletons get
"Not yet" and the notebook goes on with the reference, each plausible mistake is named, a broken library is
named as such, and every exercise checker answers blank, right and wrong answers."""

import json
import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_course.lessons.l03_lora_linear as l03
from lora_course import LoRALinear as LibLoRALinear
from lora_course import add_lora, count_parameters
from lora_course.lessons.common import use_or_reference, verdict
from lora_course.lessons.l03_lora_linear import (
    SHAPES,
    LoRALinear,
    _scaling_mistakes,
    check_count,
    check_forward,
    check_init,
    check_merge,
    check_merge_conv1d,
    check_swap,
    check_swapped_init,
    check_unmerge,
    draw_lora_structure,
    reference,
    toy_model,
)

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "03_lora_linear_from_scratch.ipynb"


def printed(capsys):
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the reference and the notebook's paths

def test_the_reference_passes_every_build_check(capsys):
    assert verdict(check_init, LoRALinear) and verdict(check_forward, LoRALinear) and verdict(check_merge, LoRALinear)
    assert verdict(check_count, l03.count_trainable) and verdict(check_swap, l03.add_lora_by_name)
    out = printed(capsys)
    assert out.count("Correct: ") == 5 and "Not yet" not in out
    assert "dL/dA = 0 and dL/dB equals the library's" in out


def test_a_passing_step_goes_on_with_the_learners_piece(capsys):
    assert use_or_reference("LoRALinear", LoRALinear, check_forward, reference(), "ref") is LoRALinear
    assert "The rest of this notebook uses your LoRALinear." in printed(capsys)


def test_reference_is_a_fresh_subclass_that_a_learners_later_step_cannot_change():
    first = reference()
    first.forward = lambda self, x: None  # a blank step attached to the class the notebook went on with
    assert issubclass(first, LoRALinear) and first is not reference() and reference().forward is LoRALinear.forward
    assert verdict(check_forward, reference())


def _cells(start_text: str, stop_text: str) -> list[str]:
    """The notebook's code cells from the first holding `start_text` to the first holding `stop_text`."""
    code = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    start = next(i for i, c in enumerate(code) if start_text in c)
    stop = next(i for i, c in enumerate(code) if stop_text in c and i >= start)
    return code[:1] + code[start:stop + 1]  # the setup cell first


def _run(cells: list[str]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    namespace = {}
    for cell in cells:
        exec(compile(cell, str(NOTEBOOK), "exec"), namespace)
    return namespace


def test_the_notebooks_blank_build_says_not_yet_at_each_step_and_goes_on_with_the_reference(capsys):
    ns = _run(_cells("class LoRALinear", "add_lora_by_name = use_or_reference"))
    out = printed(capsys)
    assert out.count("Not yet: ") == 5 and "Correct" not in out, out
    assert out.count("The rest of this notebook uses the reference") == 5, out
    assert "fill in __init__" in out and "your forward returned None" in out
    assert issubclass(ns["LoRALinear"], LoRALinear) and ns["count_trainable"] is l03.count_trainable
    assert ns["add_lora_by_name"] is l03.add_lora_by_name
    assert LoRALinear.forward is not ns["forward"] and LoRALinear.merge is not ns["merge"]  # the reference untouched
    assert all(check(ns["LoRALinear"]) for check in (check_init, check_forward, check_merge))


def test_the_notebooks_solutions_pass_every_build_check(capsys):
    ns = _run(_cells("# Build, steps 1, 2 and 4", "# Build, steps 3 and 5"))
    out = printed(capsys)
    assert out.count("Correct: ") == 5 and "Not yet" not in out, out
    assert ns["LoRALinear"].__module__ != l03.__name__  # the notebook's own class, written out


# ----------------------------------------------------------------------------- deliberately wrong layers

class WrongScalingAttribute(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        self.scaling = alpha


class WrongScalingInForward(LoRALinear):
    def forward(self, x):
        return self.base_layer(x) + self.alpha * (x @ self.lora_A.T) @ self.lora_B.T


class RsLoRAScaling(LoRALinear):
    def forward(self, x):
        return self.base_layer(x) + self.alpha / math.sqrt(self.r) * (x @ self.lora_A.T) @ self.lora_B.T


class NoScaling(LoRALinear):
    def forward(self, x):
        return self.base_layer(x) + (x @ self.lora_A.T) @ self.lora_B.T


class FormsBA(LoRALinear):
    def forward(self, x):
        return self.base_layer(x) + self.scaling * x @ (self.lora_B @ self.lora_A).T


class BNotZero(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        nn.init.normal_(self.lora_B, std=0.02)


class BaseNotFrozen(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        self.base_layer.requires_grad_(True)


class SmallGaussianA(LoRALinear):  # randn * 0.01, as many write-ups do
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        with torch.no_grad():
            self.lora_A.copy_(torch.randn(self.lora_A.shape) * 0.01)


class BothZero(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        nn.init.zeros_(self.lora_A)


class TransposedA(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        self.lora_A = nn.Parameter(self.lora_A.detach().T.clone())


class CopiesTheBase(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        import copy

        super().__init__(copy.deepcopy(base_layer), r, alpha)


class NoMergedFlag(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        del self.merged


class BlankInit(nn.Module):
    def __init__(self, base_layer, r, alpha):
        super().__init__()
        ...


class MergeForgetsScaling(LoRALinear):
    @torch.no_grad()
    def merge(self):
        self.base_layer.weight += self.lora_B @ self.lora_A
        self.merged = True


class MergeForgetsFlag(LoRALinear):
    @torch.no_grad()
    def merge(self):
        self.base_layer.weight += self.scaling * self.lora_B @ self.lora_A


class MergeDoesNothing(LoRALinear):
    def merge(self):
        self.merged = True


class MergeWithoutNoGrad(LoRALinear):
    def merge(self):
        self.base_layer.weight += self.scaling * self.lora_B @ self.lora_A
        self.merged = True


class BlankForward(LoRALinear):
    def forward(self, x):
        raise NotImplementedError


class NoneForward(LoRALinear):
    def forward(self, x):
        ...


class NoMerge(LoRALinear):
    merge = None  # the step not written yet


@pytest.mark.parametrize("cls, check, words", [
    (WrongScalingAttribute, check_init, "you scale by alpha; LoRA scales by alpha / r"),
    (WrongScalingInForward, check_forward, "you scale by alpha; LoRA scales by alpha / r"),
    (RsLoRAScaling, check_forward, "rsLoRA's alpha / sqrt(r)"),
    (NoScaling, check_forward, "the scaling alpha / r is missing"),
    (FormsBA, check_forward, "never form B A"),
    (BNotZero, check_init, "lora_B is not zero at the start"),
    (BaseNotFrozen, check_init, "the base layer still trains"),
    (BaseNotFrozen, check_forward, "your W0 got a gradient"),
    (SmallGaussianA, check_init, "kaiming_uniform_(A, a=math.sqrt(5))"),
    (BothZero, check_init, "your A is all zeros"),
    (TransposedA, check_init, "lora_A has shape"),
    (CopiesTheBase, check_init, "shared, not copied"),
    (NoMergedFlag, check_init, "no attribute 'merged'"),
    (BlankInit, check_init, "fill in __init__"),
    (MergeForgetsScaling, check_merge, "the scaling alpha / r is missing"),
    (MergeForgetsFlag, check_merge, "the update counts twice"),
    (MergeDoesNothing, check_merge, "left base_layer.weight as it was"),
    (MergeWithoutNoGrad, check_merge, "your merge() raised"),
    (NoMerge, check_merge, "no merge() yet"),
    (BlankForward, check_forward, "fill in your forward"),
    (NoneForward, check_forward, "your forward returned None"),
])
def test_each_wrong_layer_is_caught_with_a_message_that_says_why(cls, check, words, capsys):
    assert verdict(check, cls) is False
    out = printed(capsys)
    assert out.startswith("Not yet: ") and words in out, out


def test_at_each_shape_every_scaling_mistake_shows_as_itself():
    for d, k, r, alpha in SHAPES:
        factors = sorted([1.0] + [f for f, _ in _scaling_mistakes(r, alpha)])
        assert 2 <= r <= min(d, k) and all(b > 1.1 * a if a > 0 else b > a + 0.1 for a, b in zip(factors, factors[1:]))


def test_a_check_gives_the_same_verdict_every_run_and_leaves_the_callers_random_state(capsys):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert verdict(check_forward, LoRALinear) and verdict(check_merge, LoRALinear)
    assert torch.equal(torch.random.get_rng_state(), state)
    first = printed(capsys)
    assert verdict(check_forward, LoRALinear) and verdict(check_merge, LoRALinear)
    assert printed(capsys) == first


def test_a_class_that_does_not_take_base_r_alpha_is_reported_not_raised(capsys):
    class Wrong(nn.Module):
        def __init__(self, d, k):
            super().__init__()

    assert verdict(check_init, Wrong) is False
    assert "raised TypeError" in printed(capsys)
    assert verdict(check_init, LoRALinear(nn.Linear(4, 4), 2, 4)) is False  # an instance, not the class
    assert "pass your class itself" in printed(capsys)


def test_count_check_tells_all_parameters_from_trainable_ones(capsys):
    assert verdict(check_count, lambda model: None) is False
    assert "you counted None" in printed(capsys)
    assert verdict(check_count, lambda m: sum(p.numel() for p in m.parameters())) is False
    assert "the frozen ones too" in printed(capsys)


def swap_with(names_of=lambda names: names, freeze=True):
    """The reference add_lora_by_name, on the names `names_of` picks, with or without freezing the model."""
    def swap(model, names, r, alpha):
        model.requires_grad_(not freeze)
        for name in names_of(list(names)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
        return model

    return swap


def test_swap_check_catches_a_blank_an_unfrozen_model_a_missed_layer_and_an_extra_one(capsys):
    assert verdict(check_swap, lambda model, names, r, alpha: None) is False
    assert "model.layers.0.self_attn.q_proj is still a Linear" in printed(capsys)
    assert verdict(check_swap, swap_with(freeze=False)) is False
    assert "Freeze the rest of the model" in printed(capsys)
    assert verdict(check_swap, swap_with(lambda names: names[:1])) is False
    assert "model.layers.0.self_attn.v_proj is still a Linear" in printed(capsys)
    assert verdict(check_swap, swap_with(lambda names: names + ["model.layers.0.self_attn.k_proj"])) is False
    assert "you also wrapped ['model.layers.0.self_attn.k_proj']" in printed(capsys)


# ----------------------------------------------------------------------------- a broken library is named

class _LibraryScalesByAlpha(LibLoRALinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaling = self.alpha


class _LibraryBNotZero(LibLoRALinear):
    def reset_lora_parameters(self):
        super().reset_lora_parameters()
        nn.init.normal_(self.lora_B, std=0.02)


class _LibraryNotFrozen(LibLoRALinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_layer.requires_grad_(True)


class _LibraryMergeForgetsScaling(LibLoRALinear):
    @classmethod
    def merge_into(cls, base_layer, tensors, scaling):
        return super().merge_into(base_layer, tensors, 1.0)


@pytest.mark.parametrize("broken, check, words", [
    (_LibraryScalesByAlpha, check_init, "does not start with B = 0, scaling alpha / r"),
    (_LibraryScalesByAlpha, check_forward, "does not compute W0 x + b + (alpha / r)"),
    (_LibraryBNotZero, check_init, "does not start with B = 0"),
    (_LibraryBNotZero, check_forward, "at step 0"),
    (_LibraryNotFrozen, check_init, "trainable parameters"),
    (_LibraryNotFrozen, check_forward, "or its gradients"),
    (_LibraryMergeForgetsScaling, check_merge, "does not merge to W0 + (alpha / r) B A"),
])
def test_a_broken_library_fails_the_checks_of_a_right_layer_and_is_named(broken, check, words, monkeypatch, capsys):
    monkeypatch.setattr(l03, "lora", types.SimpleNamespace(LoRALinear=broken))
    assert verdict(check, LoRALinear) is False
    out = printed(capsys)
    assert "the library, not your layer, is off" in out and words in out, out


# ----------------------------------------------------------------------------- the picture and the model

def test_the_picture_draws_each_matrix_as_wide_as_its_input_and_tall_as_its_output():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = draw_lora_structure(d=96, k=64, r=4)
    plt.close("all")
    assert sizes == {"W0": (64, 96), "A": (64, 4), "B": (4, 96)}


def test_toy_model_is_a_seeded_llama_that_add_lora_adapts():
    model = toy_model()
    linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        adapted = add_lora(toy_model(), ["q_proj", "v_proj"], r=4, alpha=8)
        assert torch.equal(adapted(ids).logits, want)
    assert count_parameters(adapted)[0] == 2 * 2 * (32 + 32) * 4  # 2 layers, q and v, (d + k) r each


def test_play_shows_the_live_widget_and_a_static_copy_of_its_view(monkeypatch):
    import ipywidgets

    shown, drawn = [], []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    widget = ipywidgets.interactive(lambda r: drawn.append(r), r=ipywidgets.IntSlider(value=3, min=1, max=8))
    drawn.clear()  # interactive draws once when it is built
    l03.play(widget)
    assert shown == [widget] and drawn == [3]  # the static copy uses the sliders' current value


# ----------------------------------------------------------------------------- exercises

@torch.no_grad()
def unmerge_right(layer):
    layer.base_layer.weight -= layer.scaling * layer.lora_B @ layer.lora_A
    layer.merged = False


def no_grad(fn):
    return torch.no_grad()(fn)


def merge_conv1d(times=1.0, transpose=True):
    """A merge into a Conv1D that adds `times` (scaling B A), transposed to (in, out) or (wrongly) not."""
    @torch.no_grad()
    def merge(conv, lora_A, lora_B, scaling):
        update = times * scaling * lora_B @ lora_A  # (d, k)
        conv.weight += update.T if transpose else update

    return merge


def replace_weight(conv, lora_A, lora_B, scaling):  # not in place, but the same layer: accepted
    conv.weight = nn.Parameter(conv.weight + (scaling * lora_B @ lora_A).T, requires_grad=False)


def blank_fn(*args):
    raise NotImplementedError


# (checker, answer, accepted, words the verdict must contain): the blank, the solution, the plausible slips
EXERCISES = [
    (check_swapped_init, ..., False, "fill in your prediction"),
    (check_swapped_init, "A", True, "max |dL/dB| = 0"),
    (check_swapped_init, " a ", True, "A moves first"),
    (check_swapped_init, "B", False, "you predicted 'B'"),
    (check_swapped_init, "both", False, "dL/dB = s g (A x)^T is zero"),
    (check_swapped_init, "neither", False, "dL/dA = s B^T g x^T is not"),
    (check_swapped_init, 2, False, "answer 'A', 'B', 'both' or 'neither'"),
    (check_unmerge, ..., False, "fill in"),
    (check_unmerge, blank_fn, False, "fill in"),
    (check_unmerge, unmerge_right, True, "W0 is back"),
    (check_unmerge, lambda layer: None, False, "you took out 0 times"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.add_(layer.scaling * layer.lora_B @ layer.lora_A)),
     False, "you took out -1 times"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.sub_(layer.lora_B @ layer.lora_A)), False,
     "you took out 0.333 times"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.sub_(layer.scaling * layer.lora_B @ layer.lora_A)),
     False, "merged is still True"),
    (check_merge_conv1d, ..., False, "fill in"),
    (check_merge_conv1d, blank_fn, False, "fill in"),
    (check_merge_conv1d, merge_conv1d(), True, "so an (in, out) weight takes (scaling B A)^T"),
    (check_merge_conv1d, replace_weight, True, "768 -> 2304"),
    (check_merge_conv1d, merge_conv1d(transpose=False), False, "a Conv1D stores (in, out), so add the transpose"),
    (check_merge_conv1d, merge_conv1d(times=0.5), False, "you added 0.5 times (scaling B A)^T"),
    (check_merge_conv1d, merge_conv1d(times=-1.0), False, "you added -1 times"),
    (check_merge_conv1d, lambda conv, A, B, s: None, False, "conv.weight did not change"),
    (check_merge_conv1d, lambda conv, A, B, s: merge_conv1d()(conv, A, B, s) if conv.nf == conv.nx else
     setattr(conv, "weight", nn.Parameter(conv.weight.T.clone())), False, "conv.weight is now (2304, 768)"),
]


@pytest.mark.parametrize("check, answer, accepted, words", EXERCISES)
def test_exercise_checkers_accept_the_solution_and_say_why_a_slip_is_wrong(check, answer, accepted, words, capsys):
    assert check(answer) is accepted
    out = printed(capsys)
    assert out.startswith("Correct: " if accepted else "Not yet: ") and words in out, out


def test_the_conv1d_checker_accepts_the_librarys_own_merge_of_a_conv1d_adapter(capsys):
    def library_merge(conv, lora_A, lora_B, scaling):
        layer = LibLoRALinear.from_linear(conv, r=lora_A.shape[0], alpha=scaling * lora_A.shape[0])  # shares conv
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        layer.merge()

    assert check_merge_conv1d(library_merge)
    assert printed(capsys).startswith("Correct: ")
