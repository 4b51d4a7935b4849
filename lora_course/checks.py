"""Exercise checkers: each takes the learner's answer and says whether it holds, and why not."""

import torch

from .data import slot_phrases, slots_realized
from .experiments import loglog_slope, train_lora
from .fused import FusedLoRALinear
from .intrinsic import find_d90
from .lora import LoRALinear, add_lora, count_parameters
from .lowrank import (dense_cost, effective_rank, energy_captured, low_rank_error, rank_for_energy,
                      stable_rank, storage_cost)
from .memory import training_budget
from .skeletons import llama_7b_config, meta_gpt2, meta_lora_counts, preset_shape


# --- shared by every checker -------------------------------------------------------------

def report(ok: bool, message: str) -> bool:
    """Print a one-line verdict for the learner and return whether the answer holds."""
    print(("Correct: " if ok else "Not yet: ") + message)
    return bool(ok)


# --- notebook 03: LoRALinear from scratch -----------------------------------------------

def check_lora_param_count(answer: int, d_model: int = 4096, n_layers: int = 32, r: int = 8,
                           targets: int = 2) -> bool:
    """Exercise: trainable LoRA parameters on `targets` square (d_model x d_model) projections
    in each of `n_layers` layers, counted from real (meta-device) LoRALinear layers."""
    with torch.device("meta"):
        layer = LoRALinear(d_model, d_model, r=r, bias=False)
    expected = count_parameters(layer)[0] * targets * n_layers
    if answer == expected:
        return report(True, f"{expected:,d} trainable parameters: (d + k) * r per projection, "
                            f"{targets} projections in each of {n_layers} layers.")
    return report(False, f"you said {answer:,d}. Count A (r x k) and B (d x r) for one projection, "
                         "then multiply by the projections per layer and the layers.")


def check_lora_forward(forward_fn) -> bool:
    """Exercise: `forward_fn(x, W0, b, A, B, alpha, r)` must compute LoRALinear's output."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(12, 6, r=3, alpha=5).eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(6, 3, generator=g))  # non-zero, so the update counts
    x = torch.randn(4, 12, generator=g)
    try:
        got = forward_fn(x, layer.base_layer.weight, layer.base_layer.bias,
                         layer.lora_A, layer.lora_B, layer.alpha, layer.r)
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        return report(False, f"your function raised {type(e).__name__}: {e}")
    expected = layer(x)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return report(False, f"expected a tensor of shape {tuple(expected.shape)}, got "
                             f"{getattr(got, 'shape', type(got).__name__)}")
    if torch.allclose(got, expected, atol=1e-5):
        return report(True, "h = x W0^T + b + (alpha / r) (x A^T) B^T, the same as LoRALinear.")
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    if torch.allclose(got, base, atol=1e-5):
        return report(False, "that is the frozen layer alone; add the low-rank branch.")
    return report(False, "the numbers differ from LoRALinear's; check the scaling alpha / r "
                         "and the order of A and B.")


# --- notebooks 01 and 02: low rank, effective rank, intrinsic dimension -----------------

def _is_blank(answer) -> bool:
    """An exercise still at its placeholder: `...` (Ellipsis) or None."""
    return answer is None or answer is Ellipsis


def _not_filled_in(what: str) -> bool:
    """The verdict for a blank answer: not yet, and what to fill in."""
    return report(False, f"fill in {what}, then run this cell again.")


def _call_learner_fn(fn, *args):
    """Call the learner's function on `args`; returns (number, None) or (None, verdict message)."""
    try:
        out = fn(*args)
    except NotImplementedError:
        return None, "fill in the body of your function (it still raises NotImplementedError), then run this cell again."
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        return None, f"your function raised {type(e).__name__}: {e}"
    try:
        return float(out), None
    except (TypeError, ValueError, RuntimeError):
        return None, f"your function returned {type(out).__name__} {str(out)[:40]!r}; return one number (a float or a 0-d tensor)."


def _spectra_for_checks():
    """A few test spectra (descending, non-negative) that tell common mistakes apart."""
    g = torch.Generator().manual_seed(0)
    spectra = [torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)]
    for shape in [(9, 6), (5, 8)]:
        spectra.append(torch.linalg.svdvals(torch.randn(*shape, generator=g, dtype=torch.float64)))
    spectra.append(torch.tensor([10.0] + [1.0] * 20, dtype=torch.float64))
    return spectra


def _close(got: float, want: float, rel: float, floor: float = 0.0) -> bool:
    """|got - want| <= rel * max(floor, |want|); False for NaN (so NaN never passes)."""
    return abs(got - want) <= rel * max(floor, abs(want))


def _check_spectrum_fn(fn, reference, what: str, hint: str, success: str) -> bool:
    """Shared loop of the rank-measure exercises: `fn(S)` must match `reference(S)` on every test spectrum."""
    if _is_blank(fn):
        return _not_filled_in(what)
    if not callable(fn):
        return report(False, f"pass your function itself (the name, without calling it), not {fn!r}.")
    for S in _spectra_for_checks():
        got, problem = _call_learner_fn(fn, S.clone())
        if problem:
            return report(False, problem)
        want = reference(S)
        if not _close(got, want, 1e-6):
            return report(False, f"for S = {[round(float(s), 3) for s in S[:5]]}... you returned {got:.4f}, "
                                 f"expected {want:.4f}. {hint}")
    return report(True, success)


def check_break_even_rank(d: int, k: int, answer) -> bool:
    """Exercise: the largest r at which a rank-r factorisation, (d + k) r numbers, is still
    smaller than the dense d x k matrix."""
    if _is_blank(answer):
        return _not_filled_in(f"the largest rank r (an int) for a {d} x {k} matrix")
    expected = max(r for r in range(min(d, k) + 1) if storage_cost(d, k, r) < dense_cost(d, k))
    if answer == expected:
        return report(True, f"r = {expected}: (d + k) r = {storage_cost(d, k, expected):,d} < d k = "
                            f"{dense_cost(d, k):,d}, and one more rank would not be.")
    return report(False, f"you said {answer!r}. Solve (d + k) r < d k for the largest whole r "
                         f"(d = {d}, k = {k}).")


def check_low_rank_error_fn(error_fn) -> bool:
    """Exercise: `error_fn(S, r)` must return ||M - M_r||_F of the best rank-r approximation
    from the singular values S alone."""
    if _is_blank(error_fn):
        return _not_filled_in("your function error_fn(S, r)")
    if not callable(error_fn):
        return report(False, f"pass your function itself (the name, without calling it), not {error_fn!r}.")
    for S in _spectra_for_checks():
        for r in range(len(S) + 1):
            got, problem = _call_learner_fn(error_fn, S.clone(), r)
            if problem:
                return report(False, problem if problem.startswith("fill in") else f"{problem} (for r = {r})")
            want = float(low_rank_error(S, r, "fro"))
            if not _close(got, want, 1e-9, floor=1.0):
                if _close(got, float(low_rank_error(S, r, "spectral")), 1e-9, floor=1.0):
                    return report(False, "that is the spectral-norm error s_{r+1}; the Frobenius error "
                                         "adds up all the dropped singular values, squared.")
                if r + 1 <= len(S) and _close(got, float(low_rank_error(S, r + 1, "fro")), 1e-9, floor=1.0):
                    return report(False, "off by one: you dropped s_{r+1} too. The best rank-r "
                                         "approximation keeps s_1..s_r and drops s_{r+1}, s_{r+2}, ...")
                return report(False, f"for S = {[round(float(s), 3) for s in S[:5]]}..., r = {r} you "
                                     f"returned {got:.6g}, expected {want:.6g}.")
    return report(True, "||M - M_r||_F = sqrt(s_{r+1}^2 + ... ), Eckart-Young's error, for every r.")


def check_rank_for_energy(S, fraction: float, answer) -> bool:
    """Exercise: the smallest r whose top-r singular values hold `fraction` of the energy."""
    if _is_blank(answer):
        return _not_filled_in(f"the smallest rank r (an int) that keeps {fraction:.0%} of the energy")
    expected = rank_for_energy(S, fraction)
    if answer == expected:
        return report(True, f"r = {expected} keeps {100 * energy_captured(S, expected):.2f}% of sum s_i^2.")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer <= len(S):
        return report(False, f"you said {answer!r}; answer with an int rank between 0 and {len(S)}.")
    # The classic slip: counting sum s_i instead of sum s_i^2.
    plain = [float(s) for s in S]
    unsquared = next(r for r in range(len(plain) + 1) if sum(plain[:r]) >= fraction * sum(plain) - 1e-12)
    kept = f"r = {answer} keeps {100 * energy_captured(S, answer):.2f}% of sum s_i^2"
    if answer == unsquared:
        return report(False, f"{kept}. Energy is the sum of the *squared* singular values, not of s_i.")
    side = "too few" if answer < expected else "more than needed: a smaller r already gets there"
    return report(False, f"{kept}: {side}.")


def check_effective_rank_fn(effective_rank_fn) -> bool:
    """Exercise: `effective_rank_fn(S)` must return Roy & Vetterli's exp(entropy of s_i / sum s_j)."""
    return _check_spectrum_fn(
        effective_rank_fn, effective_rank, "your function effective_rank_fn(S)",
        hint="Normalise p_i = s_i / sum(s), then exp(-sum p_i log p_i).",
        success="exp(H(p)) with p_i = s_i / sum s_j: 1 for one direction, n for n equal ones.")


def check_stable_rank_fn(stable_rank_fn) -> bool:
    """Exercise: `stable_rank_fn(S)` must return ||M||_F^2 / ||M||_2^2 from the singular values."""
    return _check_spectrum_fn(
        stable_rank_fn, stable_rank, "your function stable_rank_fn(S)",
        hint="||M||_F^2 = sum s_i^2 and ||M||_2 = s_1.",
        success="sum s_i^2 / s_1^2: how many directions of the largest size the energy would fill.")


def check_d90(scores: dict, threshold: float, answer) -> bool:
    """Exercise: the smallest subspace size d in `scores` ({d: accuracy}) that reaches `threshold`.

    None is a real answer here (no d reached it), so the blank placeholder is `...`.
    """
    if answer is Ellipsis:
        return _not_filled_in("the smallest d from scores (an int), or None if no d reaches the threshold")
    expected = find_d90(scores, threshold)
    if answer == expected:
        return report(True, f"d90 = {expected}" + ("" if expected is None else
                            f": accuracy {scores[expected]:.3f} >= {threshold:.3f}, and no smaller d got there."))
    if answer is not None and answer not in scores:
        return report(False, f"you said {answer!r}, which is not one of the sizes tried: {sorted(scores)}.")
    return report(False, f"you said {answer!r}. Take the smallest d whose accuracy is >= {threshold:.3f} "
                         "(None if no d reached it).")


# --- notebook 04: rank and alpha --------------------------------------------------------

def _is_number(answer) -> bool:
    return isinstance(answer, (int, float)) and not isinstance(answer, bool) and answer == answer


def check_eckart_young_floor(answer: float, singular_values, r: int) -> bool:
    """Exercise: the smallest ||dW - dW*||_F any rank-r LoRA update can reach, for a target
    with these singular values (computed by hand from the spectrum)."""
    S = [float(s) for s in singular_values]
    expected = float(low_rank_error(S, min(r, len(S)), norm="fro"))
    if _is_blank(answer):
        return _not_filled_in(f"my_floor: the error left by the best rank-{r} update")
    if not _is_number(answer):
        return report(False, f"you said {answer!r}; give a number: the error left by the best rank-{r} update.")
    if abs(answer - expected) <= 1e-3 * max(1.0, expected):
        return report(True, f"{expected:.4f} = sqrt of the sum of the squared singular values "
                            f"after the first {r}: the directions a rank-{r} update must leave out.")
    if abs(answer - expected ** 2) <= 1e-3 * max(1.0, expected ** 2):
        return report(False, "that is the squared error; take the square root.")
    return report(False, f"you said {answer:.4f}. Keep the top {r} singular values; the error is "
                         "the root of the sum of squares of the ones left out.")


def check_alpha_for_scaling(answer: float, r: int, scaling: float, use_rslora: bool = False) -> bool:
    """Exercise: which alpha gives this scaling at rank r (alpha / r, or alpha / sqrt(r) with
    rsLoRA)? Checked against a real LoRALinear built with the learner's alpha."""
    rule = "alpha / sqrt(r)" if use_rslora else "alpha / r"
    if _is_blank(answer):
        return _not_filled_in(f"the alpha that gives scaling {rule} = {scaling:g} at r={r}")
    try:
        layer = LoRALinear(r, r, r=r, alpha=answer, use_rslora=use_rslora)
    except (TypeError, ValueError) as e:
        return report(False, f"LoRALinear refused alpha={answer!r}: {e}")
    if abs(layer.scaling - scaling) <= 1e-6 * scaling:
        return report(True, f"alpha={answer:g} gives scaling {rule} = {layer.scaling:g} at r={r}.")
    return report(False, f"alpha={answer:g} gives scaling {layer.scaling:g}, not {scaling:g}; "
                         f"solve scaling = {rule} for alpha.")


def check_smallest_rank(answer: int, singular_values, max_relative_error: float) -> bool:
    """Exercise: the smallest r whose Eckart-Young floor is at most `max_relative_error` times
    ||dW*||_F, for a target with these singular values."""
    S = [float(s) for s in singular_values]
    total = sum(s * s for s in S) ** 0.5
    floors = [float(low_rank_error(S, r, norm="fro")) / total for r in range(len(S) + 1)]
    expected = next(r for r, f in enumerate(floors) if f <= max_relative_error)
    if _is_blank(answer):
        return _not_filled_in("my_rank: an int rank")
    if isinstance(answer, int) and not isinstance(answer, bool) and answer == expected:
        return report(True, f"r={expected}: its floor is {floors[expected]:.3f} of ||dW*||, and "
                            f"r={expected - 1} leaves {floors[expected - 1]:.3f}." if expected > 0
                      else "r=0: the target is already that small.")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer <= len(S):
        side = "too small: its floor is" if answer < expected else "more than needed; already r={} reaches".format(expected)
        return report(False, f"r={answer} is {side} {floors[min(answer, expected)]:.3f} of ||dW*||.")
    return report(False, f"you said {answer!r}; answer with an int rank between 0 and {len(S)}.")


def check_fixed_scaling_update_sizes(answer, target, ranks, lr: float = 1e-3, step: int = 10) -> bool:
    """Exercise: ||dW||_F after `step` constant-rate Adam steps at each rank in `ranks` with
    alpha = 2 r (scaling alpha / r = 2 at every rank), on `target`. Checked by re-running them."""
    ranks = list(ranks)
    if _is_blank(answer):
        return _not_filled_in(f"one ||dW||_F per rank in {ranks}, after {step} Adam steps at lr={lr:g} with alpha = 2 * r")
    try:
        sizes = [float(x) for x in answer]
    except (TypeError, ValueError):
        return report(False, f"give a list of {len(ranks)} numbers (one ||dW||_F per rank), not {answer!r}.")
    if len(sizes) != len(ranks):
        return report(False, f"you gave {len(sizes)} numbers for {len(ranks)} ranks {ranks}.")

    def measured(alpha_of_r):
        return [train_lora(target, r, alpha_of_r(r), lr, step, schedule="constant").update_norms[step] for r in ranks]

    def close(a, b):
        return all(abs(x - y) <= 2e-2 * y for x, y in zip(a, b))

    expected = measured(lambda r: 2 * r)
    if close(sizes, expected):
        slope = loglog_slope(ranks, expected)
        trend = "grows" if slope > 0 else "shrinks"
        return report(True, f"with the scaling held at 2, the early update {trend} with r (about r^{slope:+.1f}): "
                            "the shrinking under a fixed alpha was alpha / r's doing. What is left comes from A: "
                            "dW = scaling * B A adds up r random rank-one pieces.")
    if close(sizes, measured(lambda r: 8)):
        return report(False, "those are section 3's sizes at a fixed alpha = 8; set alpha = 2 * r at each rank.")
    return report(False, f"these are not the sizes after {step} steps; train each rank with "
                         f"train_lora(target, r, 2 * r, {lr:g}, {step}, schedule='constant') and read update_norms[{step}].")


def check_early_stopping(answer, task, r: int = 64, steps: int = 50, lr: float = 3e-2) -> bool:
    """Exercise: test MSE of a rank-r LoRA trained for only `steps` steps on `task` (a small
    RegressionTask), checked by re-running it; the verdict compares it with no fine-tuning."""
    if _is_blank(answer):
        return _not_filled_in(f"the test MSE of rank {r} after {steps} steps")
    if not _is_number(answer):
        return report(False, f"you said {answer!r}; give the test MSE (a number) of rank {r} after {steps} steps.")
    run = train_lora(task.target, r, lr=lr, steps=steps, task=task)
    base = (task.X_test @ task.target.W0.T - task.Y_test).square().mean().item()  # W0 alone, no fine-tuning
    if abs(answer - run.test_loss) > 1e-2 * run.test_loss:
        return report(False, f"you said {answer:.3f}; train_lora(target, {r}, lr={lr:g}, steps={steps}, task=...) "
                             "and read its test_loss.")
    verdict = ("still worse than" if run.test_loss > base else "better than")
    return report(True, f"r={r} after {steps} steps tests at {run.test_loss:.2f}, {verdict} no fine-tuning "
                        f"({base:.2f}) on these {task.n_train} examples.")


# --- notebook 05: LoRA inside a transformer ---------------------------------------------

def _is_whole_number(answer) -> bool:
    return isinstance(answer, int) and not isinstance(answer, bool)


def check_llama_qkvo_params(answer) -> bool:
    """Exercise 05.1: trainable parameters of LoRA r=16 on q_proj, k_proj, v_proj, o_proj of LLaMA-7B."""
    if _is_blank(answer):
        return _not_filled_in("the number of trainable parameters (an int)")
    if not _is_whole_number(answer):
        return report(False, f"you gave {answer!r}; answer with a whole number of parameters (an int).")
    truth = meta_lora_counts(llama_7b_config(),
                             lambda m: add_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16))["trainable"]
    if answer == truth:
        return report(True, f"{truth:,d} = 32 layers x 4 projections x r (d_in + d_out).")
    return report(False, f"you gave {answer:,d}. Each adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "count layers and targets.")


def check_full_finetune_bytes(answer) -> bool:
    """Exercise 05.2: bytes of weights + gradients + AdamW state for full fp32 fine-tuning of GPT-2 small."""
    if _is_blank(answer):
        return _not_filled_in("the number of bytes (an int)")
    if not _is_whole_number(answer):
        return report(False, f"you gave {answer!r}; answer with a whole number of bytes (an int).")
    n_params = preset_shape("GPT-2 small (124M)")[0]
    truth = training_budget(n_params, precision="fp32", optimizer="adamw").total
    if answer == truth:
        return report(True, f"{truth:,d} bytes = 16 bytes x {n_params:,d} parameters.")
    return report(False, f"you gave {answer:,d}. In fp32 a weight is 4 bytes, its gradient 4, AdamW's two moments 8: "
                         "multiply by the parameter count (tied embeddings count once).")


def check_fused_untouched_rows(start, stop, d: int = 768) -> bool:
    """Exercise 05.3: which output features [start, stop) of GPT-2's c_attn does a q,v fused adapter never change?"""
    from transformers.pytorch_utils import Conv1D

    if _is_blank(start) or _is_blank(stop):
        return _not_filled_in("start and stop (two ints, the untouched rows are start..stop-1)")
    layer = FusedLoRALinear.from_linear(Conv1D(3 * d, d), r=1, alpha=1)
    torch.nn.init.ones_(layer.lora_B)
    zero_rows = (layer.delta_weight() == 0).all(dim=1).nonzero().flatten()
    truth = (int(zero_rows[0]), int(zero_rows[-1]) + 1)
    if (start, stop) == truth:
        return report(True, f"rows {truth[0]}..{truth[1] - 1}, the k slice, get exactly zero update.")
    return report(False, "c_attn's output is [q | k | v], each d wide; which slice did enable_lora=(True, False, True) "
                         "leave out?")


# --- notebook 06: fine-tuning GPT-2 ------------------------------------------------------

def check_gpt2_c_attn_lora_params(answer: int, r: int = 8) -> bool:
    """Exercise 06.1: trainable parameters of LoRA rank r on c_attn of GPT-2 124M, counted on the meta device."""
    if _is_blank(answer):
        return _not_filled_in("the number of trainable parameters")
    model = meta_gpt2("small")
    with torch.device("meta"):
        add_lora(model, ["c_attn"], r=r)
    truth = count_parameters(model)[0]
    if answer == truth:
        return report(True, f"{truth:,d} = 12 layers x r x (768 + 2304), c_attn mapping d to 3d.")
    return report(False, f"you gave {answer!r}. One adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "c_attn is 768 -> 2304, in 12 layers.")


def check_adam_moment_bytes(answer: int, n_trainable: int) -> bool:
    """Exercise 06.2: bytes of AdamW's two fp32 moments for `n_trainable` trainable parameters."""
    if _is_blank(answer):
        return _not_filled_in("the bytes of AdamW's state")
    truth = training_budget(n_trainable, precision="fp32", optimizer="adamw").optimizer
    if answer == truth:
        return report(True, f"{truth:,d} bytes = 2 moments x 4 bytes x {n_trainable:,d} trainable parameters.")
    return report(False, f"you gave {answer!r}. AdamW keeps exp_avg and exp_avg_sq, each fp32 (4 bytes), "
                         "per trainable parameter.")


def check_task_sentence(record, text: str) -> bool:
    """Exercise 06.3: does `text` realise every field of `record` (notebook 06's slot accuracy)?"""
    if _is_blank(text):
        return _not_filled_in("a sentence for the record")
    if not isinstance(text, str):
        return report(False, f"write the sentence as a str, got {type(text).__name__}.")
    hits = slots_realized(text, record)
    missing = [k for k, ok in hits.items() if not ok]
    if not missing:
        return report(True, f"all {len(hits)} slots realised, slot accuracy 1.0.")
    wanted = ", ".join(repr(slot_phrases(record)[k]) for k in missing)
    return report(False, f"slot accuracy {1 - len(missing) / len(hits):.2f}; missing {missing}: "
                         f"the metric looks for {wanted}.")
