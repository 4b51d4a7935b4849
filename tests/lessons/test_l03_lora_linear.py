"""Notebook 03's lesson module: the build checks (on the notebook's layer and on deliberately wrong ones),
the picture, the small model, the overhead table, the parameter-budget widget and the exercise checkers."""

import math

import pytest
import torch
from torch import nn

from lora_course import LoRALinear as LibLoRALinear
from lora_course import add_lora, count_parameters
from lora_course.lessons.l03_lora_linear import (
    check_conv1d_forward,
    check_count,
    check_forward,
    check_init,
    check_lora_param_count,
    check_merge,
    check_recover_update,
    check_swap,
    check_unmerge,
    compare_with_library,
    draw_lora_structure,
    lora_parameter_budget,
    lora_parameter_budget_widget,
    random_shapes,
    recovery_task,
    thread_times_us,
    toy_model,
    unmerged_overhead,
)

# ----------------------------------------------------------------------------- the notebook's layer

class LoRALinear(nn.Module):
    """The layer notebook 03 builds, written the same way."""

    def __init__(self, base_layer, r, alpha):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        d, k = base_layer.weight.shape
        self.lora_A = nn.Parameter(torch.empty(r, k))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(d, r))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False

    def forward(self, x):
        h = self.base_layer(x)
        if not self.merged:
            h = h + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T
        return h

    @torch.no_grad()
    def merge(self):
        self.base_layer.weight += self.scaling * self.lora_B @ self.lora_A
        self.merged = True


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora_by_name(model, names, r, alpha, cls=LoRALinear, freeze=True):
    if freeze:
        model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, cls(getattr(parent, child), r, alpha))
    return model


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


class BNotZero(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        nn.init.normal_(self.lora_B, std=0.02)


class BaseNotFrozen(LoRALinear):
    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        self.base_layer.requires_grad_(True)


class CardInitA(LoRALinear):
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


class BlankForward(LoRALinear):
    def forward(self, x):
        raise NotImplementedError


class NoMerge(LoRALinear):
    merge = None  # the step not written yet


def verdict(capsys):
    return capsys.readouterr().out


def test_the_notebooks_layer_passes_every_build_check(capsys):
    assert check_init(LoRALinear)
    assert check_forward(LoRALinear)
    assert check_count(count_trainable, LoRALinear)
    assert check_merge(LoRALinear)
    assert check_swap(add_lora_by_name, LoRALinear)
    out = verdict(capsys)
    assert out.count("Correct: ") == 5 and "Not yet" not in out
    assert "dL/dA = 0 and dL/dB equals the library's" in out


def test_random_shapes_are_seeded_and_can_show_a_wrong_scaling():
    shapes = random_shapes()
    assert shapes == random_shapes() and len(set(shapes)) == len(shapes)
    for d, k, r, alpha in shapes:
        assert 2 <= r <= min(d, k) and alpha != r
    assert len({(d, k) for d, k, _, _ in shapes}) > 1


@pytest.mark.parametrize("cls, check, words", [
    (WrongScalingAttribute, check_init, "you scale by alpha; LoRA scales by alpha / r"),
    (WrongScalingInForward, check_forward, "you scale by alpha; LoRA scales by alpha / r"),
    (RsLoRAScaling, check_forward, "rsLoRA's alpha / sqrt(r)"),
    (NoScaling, check_forward, "the scaling alpha / r is missing"),
    (BNotZero, check_init, "lora_B is not zero at the start"),
    (BaseNotFrozen, check_init, "the base layer still trains"),
    (BaseNotFrozen, check_forward, "your W0 got a gradient"),
    (CardInitA, check_init, "kaiming_uniform_(A, a=math.sqrt(5))"),
    (BothZero, check_init, "your A is all zeros"),
    (TransposedA, check_init, "lora_A has shape"),
    (CopiesTheBase, check_init, "shared, not copied"),
    (MergeForgetsScaling, check_merge, "the scaling alpha / r is missing"),
    (MergeForgetsFlag, check_merge, "the update counts twice"),
    (MergeDoesNothing, check_merge, "left base_layer.weight as it was"),
    (NoMerge, check_merge, "no merge() yet"),
    (BlankForward, check_forward, "fill in your forward"),
])
def test_each_wrong_layer_is_caught_with_a_message_that_says_why(cls, check, words, capsys):
    assert check(cls) is False
    out = verdict(capsys)
    assert out.startswith("Not yet: ") and words in out, out


def test_a_check_gives_the_same_verdict_every_run_and_leaves_the_callers_random_state(capsys):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert check_forward(LoRALinear) and check_merge(LoRALinear)
    assert torch.equal(torch.random.get_rng_state(), state)
    first = verdict(capsys)
    assert check_forward(LoRALinear) and check_merge(LoRALinear)
    assert verdict(capsys) == first


def test_a_class_that_does_not_take_base_r_alpha_is_reported_not_raised(capsys):
    class Wrong(nn.Module):
        def __init__(self, d, k):
            super().__init__()

    assert check_init(Wrong) is False
    assert "raised TypeError" in verdict(capsys)
    assert check_init(LoRALinear(nn.Linear(4, 4), 2, 4)) is False  # an instance, not the class
    assert "pass your class itself" in verdict(capsys)


def test_count_check_tells_all_parameters_from_trainable_ones(capsys):
    assert check_count(..., LoRALinear) is False
    assert "fill in" in verdict(capsys)
    assert check_count(lambda m: sum(p.numel() for p in m.parameters()), LoRALinear) is False
    assert "including the frozen base" in verdict(capsys)


def test_swap_check_catches_an_unfrozen_model_a_missed_layer_and_an_extra_one(capsys):
    assert check_swap(..., LoRALinear) is False
    assert "fill in" in verdict(capsys)
    assert check_swap(lambda m, n, r, a: add_lora_by_name(m, n, r, a, freeze=False), LoRALinear) is False
    assert "Freeze the rest of the model" in verdict(capsys)
    assert check_swap(lambda m, n, r, a: add_lora_by_name(m, n[:1], r, a), LoRALinear) is False
    assert "attn.v_proj is still a Linear" in verdict(capsys)
    assert check_swap(lambda m, n, r, a: add_lora_by_name(m, n + ["attn.k_proj"], r, a), LoRALinear) is False
    assert "you also wrapped ['attn.k_proj']" in verdict(capsys)


def test_compare_with_library_is_float32_close_for_the_right_layer_and_not_for_a_wrong_one():
    diffs = compare_with_library(LoRALinear)
    assert set(diffs) == {"output", "grad_A", "grad_B", "merged_weight", "trainable_count"}
    assert max(diffs.values()) < 1e-5
    assert compare_with_library(WrongScalingInForward)["output"] > 1e-2
    assert compare_with_library(MergeForgetsScaling)["merged_weight"] > 1e-2
    assert compare_with_library(BaseNotFrozen)["trainable_count"] > 0


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
    (_LibraryScalesByAlpha, check_init, "does not start with B = 0 and scaling alpha / r"),
    (_LibraryScalesByAlpha, check_forward, "does not compute W0 x + b + (alpha / r)"),
    (_LibraryBNotZero, check_init, "does not start with B = 0"),
    (_LibraryBNotZero, check_forward, "at step 0"),
    (_LibraryNotFrozen, check_init, "trains"),
    (_LibraryNotFrozen, check_forward, "lets W0 get a gradient"),
    (_LibraryMergeForgetsScaling, check_merge, "does not merge to W0 + (alpha / r) B A"),
])
def test_a_broken_library_fails_the_checks_of_a_right_layer_and_is_named(broken, check, words, monkeypatch, capsys):
    import lora_course.lessons.l03_lora_linear as lesson

    monkeypatch.setattr(lesson, "LoRALinear", broken)
    assert check(LoRALinear) is False
    out = verdict(capsys)
    assert "the library, not your layer, is off" in out and words in out, out


# ----------------------------------------------------------------------------- the picture and the model

def test_the_picture_draws_each_matrix_as_wide_as_its_input_and_tall_as_its_output():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = draw_lora_structure(d=96, k=64, r=4)
    plt.close("all")
    assert sizes == {"W0": (64, 96), "A": (64, 4), "B": (4, 96)}


def test_toy_model_has_llama_names_and_add_lora_adapts_it():
    model = toy_model()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {f"attn.{p}_proj" for p in "qkvo"} | {"mlp.up_proj", "mlp.down_proj"}
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model(x)
        adapted = add_lora(toy_model(), ["q_proj", "v_proj"], r=4, alpha=8)
        assert torch.equal(adapted(x), want)
    assert count_parameters(adapted)[0] == 2 * (32 + 32) * 4


def test_thread_times_count_this_threads_work_for_each_function():
    idle, busy = thread_times_us([lambda: None, lambda: sum(range(20_000))], number=10, repeat=3)
    assert 0 <= idle < busy
    busy_first = thread_times_us([lambda: sum(range(20_000)), lambda: None], number=10, repeat=3)
    assert busy_first[1] < busy_first[0]


def test_unmerged_overhead_rows():
    rows = unmerged_overhead(k=64, d=64, r=4, tokens=(1, 8))
    assert [row["tokens"] for row in rows] == [1, 8]
    for row in rows:
        assert row["merged_us"] > 0 and row["unmerged_us"] > 0
        assert row["ratio"] == pytest.approx(row["unmerged_us"] / row["merged_us"])
        assert row["extra_us_per_token"] == pytest.approx((row["unmerged_us"] - row["merged_us"]) / row["tokens"])


# ----------------------------------------------------------------------------- the parameter budget

@pytest.mark.parametrize("d, k, r", [(4096, 4096, 8), (2304, 768, 4), (64, 128, 1)])
def test_parameter_budget(d, k, r):
    budget = lora_parameter_budget(d, k, r)
    assert budget["full"] == d * k and budget["lora"] == (d + k) * r
    assert budget["reduction_pct"] == pytest.approx(100 * (1 - (d + k) * r / (d * k)))


def test_parameter_budget_rejects_impossible_rank():
    with pytest.raises(ValueError, match="exceeds min"):
        lora_parameter_budget(64, 32, 33)


def test_parameter_budget_widget_builds_and_redraws():
    import matplotlib

    matplotlib.use("Agg")
    ui = lora_parameter_budget_widget(d=768, k=768, r=4)
    assert [c.description for c in ui.children[:3]] == ["d (out)", "k (in)", "r"]
    ui.children[2].value = 16  # moving the slider re-runs the redraw without error
    assert ui.children[2].value == 16


def test_play_shows_the_live_widget_and_a_static_copy_of_its_view(monkeypatch):
    import ipywidgets

    from lora_course.lessons import common

    shown, drawn = [], []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    widget = ipywidgets.interactive(lambda r: drawn.append(r), r=ipywidgets.IntSlider(value=3, min=1, max=8))
    drawn.clear()  # interactive draws once when it is built
    common.play(widget)
    assert shown == [widget] and drawn == [3]  # the static copy uses the sliders' current value
    widget.children[0].value = 5  # the live widget redraws itself
    assert drawn == [3, 5]
    common.play(widget)
    assert drawn == [3, 5, 5]


# ----------------------------------------------------------------------------- exercises

def conv1d_right(x, W, b, A, B, scaling):
    return x @ W + b + scaling * (x @ A.T) @ B.T


@torch.no_grad()
def unmerge_right(layer):
    layer.base_layer.weight -= layer.scaling * layer.lora_B @ layer.lora_A
    layer.merged = False


def no_grad(fn):
    return torch.no_grad()(fn)


def fit_lora(W0, x, y, r, steps=300, lr=1e-2, train_base=False, zero_A=False):
    d, k = W0.shape
    layer = LibLoRALinear(k, d, r=r, alpha=2 * r, bias=False)
    with torch.no_grad():
        layer.base_layer.weight.copy_(W0)
        if zero_A:
            layer.lora_A.zero_()
    params = [layer.lora_A, layer.lora_B]
    if train_base:
        layer.base_layer.requires_grad_(True)
        params.append(layer.base_layer.weight)
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = (layer(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer


def blank_fn(*args):
    raise NotImplementedError


# (checker, answer, accepted, words the verdict must contain): the blank, the solution, the plausible slips
EXERCISES = [
    (check_lora_param_count, ..., False, "fill in"),
    (check_lora_param_count, 4_194_304, True, "Correct: 4,194,304"),
    (check_lora_param_count, 4_194_304 // 2, False, "one projection per layer"),
    (check_lora_param_count, 4_194_304 // 32, False, "that is one layer"),
    (check_lora_param_count, 2 * 32 * 4096 * 4096, False, "full d x k"),
    (check_lora_param_count, 12345, False, "Count A"),
    (check_conv1d_forward, ..., False, "fill in"),
    (check_conv1d_forward, blank_fn, False, "fill in"),
    (check_conv1d_forward, conv1d_right, True, "Correct"),
    (check_conv1d_forward, lambda x, W, b, A, B, s: x @ W + b, False, "frozen layer alone"),
    (check_conv1d_forward, lambda x, W, b, A, B, s: x @ W.T + b + s * (x @ A.T) @ B.T, False,
     "Conv1D stores W as (in, out)"),
    (check_conv1d_forward, lambda x, W, b, A, B, s: x @ W + b + (x @ A.T) @ B.T, False,
     "the scaling alpha / r is missing"),
    (check_conv1d_forward, lambda x, W, b, A, B, s: x @ W + b + s * (x @ B) @ A, False, "(x A^T) B^T"),
    (check_conv1d_forward, lambda x, W, b, A, B, s: (x @ W + b)[:, :2], False, "expected a tensor of shape"),
    (check_unmerge, ..., False, "fill in"),
    (check_unmerge, blank_fn, False, "fill in"),
    (check_unmerge, unmerge_right, True, "Correct"),
    (check_unmerge, lambda layer: None, False, "still holds the update"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.add_(layer.scaling * layer.lora_B @ layer.lora_A)),
     False, "added the update again"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.sub_(layer.lora_B @ layer.lora_A)), False,
     "without the scaling"),
    (check_unmerge, no_grad(lambda layer: layer.base_layer.weight.sub_(layer.scaling * layer.lora_B @ layer.lora_A)),
     False, "merged is still True"),
    (check_recover_update, ..., False, "fill in"),
    (check_recover_update, blank_fn, False, "fill in"),
    (check_recover_update, fit_lora, True, "Correct"),
    (check_recover_update, lambda W0, x, y, r: fit_lora(W0, x, y, r, steps=20, train_base=True), False,
     "W0 changed"),
    (check_recover_update, lambda W0, x, y, r: fit_lora(W0, x, y, r, zero_A=True), False, "still zero"),
    (check_recover_update, lambda W0, x, y, r: fit_lora(W0, x, y, r, steps=10), False, "train longer"),
    (check_recover_update, lambda W0, x, y, r: fit_lora(W0, x, y, r=2), False, "rank 2; use r = 4"),
    (check_recover_update, lambda W0, x, y, r: W0, False, "return the trained LoRA layer"),
]


@pytest.mark.parametrize("check, answer, accepted, words", EXERCISES)
def test_exercise_checkers_accept_the_solution_and_say_why_a_slip_is_wrong(check, answer, accepted, words, capsys):
    assert check(answer) is accepted
    out = verdict(capsys)
    assert out.startswith("Correct: " if accepted else "Not yet: ") and words in out, out


def test_recovery_task_has_a_rank_two_update():
    task = recovery_task()
    assert torch.linalg.matrix_rank(task["delta_star"]) == 2
    residual = task["y"] - task["x"] @ (task["W0"] + task["delta_star"]).T
    assert 0.005 < residual.std() < 0.02  # the data's noise, 0.01
