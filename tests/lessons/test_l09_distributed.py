"""Notebook 09's lesson module: the hook's check, the pictures, the widget and the exercise checkers."""

import re

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lora_course.distributed import scale_table  # noqa: E402
from lora_course.lessons.common import Problem  # noqa: E402
from lora_course.lessons.l09_distributed import (  # noqa: E402
    check_comm_hook,
    check_scaling_prediction,
    check_token_prediction,
    counting_allreduce,
    draw_fsdp_step,
    draw_losses,
    draw_ring_allreduce,
    draw_scale,
    scale_widget,
    shipped_ddp_bytes,
)
from lora_course.skeletons import lora_counts  # noqa: E402

RECORD = {  # the shape of a torchrun record, as `python -m lora_course.distributed` writes it
    "world_size": 2, "batch_size_per_rank": 4, "global_batch_size": 8,
    "runs": {m: {"losses": [3.0, 2.5, 2.0]} for m in ("lora", "full")},
    "reference": {m: {"losses": [3.0, 2.5, 2.0]} for m in ("lora", "full")},
}


def _blank(state, bucket):
    raise NotImplementedError


def _summed(state, bucket):  # forgets to divide by the world size
    buffer = bucket.buffer()
    state.per_step[-1] += buffer.numel() * buffer.element_size()
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _numbers(state, bucket):  # counts elements, not bytes
    state.per_step[-1] += bucket.buffer().numel()
    return counting_allreduce(type("S", (), {"per_step": [0]})(), bucket)


def _no_future(state, bucket):
    state.per_step[-1] += bucket.buffer().numel() * 4
    return bucket.buffer()


def test_check_comm_hook_passes_the_reference():
    assert "4 bytes" in check_comm_hook(counting_allreduce)


@pytest.mark.parametrize("hook, words", [
    (..., "fill in count_and_allreduce"),
    (_blank, "NotImplementedError"),
    (_summed, "divide by dist.get_world_size()"),
    (_numbers, "multiply by element_size()"),
    (_no_future, "must return a torch.futures.Future"),
])
def test_check_comm_hook_says_what_is_wrong(hook, words):
    with pytest.raises(Problem, match=re.escape(words)):
        check_comm_hook(hook)


def test_shipped_ddp_bytes_are_the_trainable_gradients():
    for targets in (("c_attn",), None):
        nbytes, trainable = shipped_ddp_bytes(counting_allreduce, targets)
        assert nbytes == 4 * trainable


def test_pictures_draw():
    fig = draw_ring_allreduce(4)
    assert len(fig.axes) == 6  # 2 (N-1) steps
    fig = draw_fsdp_step(lora_counts("LLaMA-7B"), n_blocks=2)
    bars = fig.axes[0].patches
    assert len(bars) == 2 * (2 * 2 + 3 * 2)  # LoRA and full: forward (gather, compute), backward (+ reduce-scatter)
    assert min(b.get_width() for b in bars) == pytest.approx(0.03)  # LoRA's reduce-scatter, drawn visible
    assert draw_losses(RECORD).axes
    ax = draw_scale(scale_table(), "Ethernet 100 Gb/s")
    assert len(ax.patches) == 3 * 4  # models x (method, engine)
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 3  # DDP where a replica does not fit: full 7B, full 70B, LoRA 70B
    plt.close("all")


def test_scale_widget_has_three_sliders_and_draws():
    widget = scale_widget(scale_table)
    kinds = sorted(type(c).__name__ for c in widget.children[:-1])
    assert kinds == ["FloatLogSlider", "FloatLogSlider", "IntSlider"]
    widget.f(**widget.kwargs)
    plt.close("all")


def test_check_token_prediction_measures_ddp_with_the_hook(verdict):
    right = verdict(check_token_prediction(" Different ", counting_allreduce), True)  # the word, however written
    assert "measured, DDP's gradients differ" in right and "weighs 5x" in right
    wrong = verdict(check_token_prediction("equal", counting_allreduce), False)
    assert "you predicted equal" in wrong and ": different." in wrong
    for blank in (None, ...):
        assert "fill in my_prediction" in verdict(check_token_prediction(blank, counting_allreduce), False)
    assert '"equal" or "different"' in verdict(check_token_prediction("same", counting_allreduce), False)


def _growth(world_sizes=(8, 64)):
    keys = (("LLaMA-7B", "lora", "DDP"), ("LLaMA-7B", "full", "FSDP"))
    t = [{(r["model"], r["method"], r["engine"]): r["s[Ethernet 100 Gb/s]"] for r in scale_table(world_size=n)}
         for n in world_sizes]
    return [t[1][k] / t[0][k] for k in keys]


def test_check_scaling_prediction_recomputes_the_table(verdict):
    lora, full = _growth()
    assert lora > 2 and 1 < full < 1.3  # latency-bound vs bandwidth-bound
    right = verdict(check_scaling_prediction([1.1 * lora, 0.9 * full], scale_table), True)
    assert f"x{lora:.2f} for LoRA under DDP" in right and "follows the latency" in right
    assert "mostly latency" in verdict(check_scaling_prediction([full, full], scale_table), False)  # bytes-bound guess
    assert "mostly bandwidth" in verdict(check_scaling_prediction([lora, 63 / 7], scale_table), False)  # (N-1) guess
    for blank in (None, ..., [..., 1.1]):
        assert "fill in answer" in verdict(check_scaling_prediction(blank, scale_table), False)
    for junk in ("3 and 1", [3], [3, "1"], [True, 1.0]):
        assert "give two numbers" in verdict(check_scaling_prediction(junk, scale_table), False)
