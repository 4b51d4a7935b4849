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
    check_bytes_prediction,
    check_comm_hook,
    check_ring_time,
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


def test_check_bytes_prediction(verdict):
    verdict(check_bytes_prediction(..., counting_allreduce), False)
    right = verdict(check_bytes_prediction(65_536 + 4 * 8 * (128 + 512) * 4, counting_allreduce), True)
    assert "147,456" in right
    assert "c_fc's adapters alone" in verdict(check_bytes_prediction(81_920, counting_allreduce), False)
    assert "c_attn alone" in verdict(check_bytes_prediction(65_536, counting_allreduce), False)
    assert "trainable parameters" in verdict(check_bytes_prediction(36_864, counting_allreduce), False)
    assert "r (d_in + d_out)" in verdict(check_bytes_prediction(1, counting_allreduce), False)
    assert "one number" in verdict(check_bytes_prediction("many", counting_allreduce), False)


def test_check_ring_time(verdict):
    verdict(check_ring_time(...), False)
    verdict(check_ring_time(lambda b, n, bw, lat: 2 * (n - 1) * lat + 2 * (n - 1) / n * b / bw), True)
    assert "leaves out the latency" in verdict(check_ring_time(lambda b, n, bw, lat: 2 * (n - 1) / n * b / bw), False)
    assert "bytes / N" in verdict(check_ring_time(lambda b, n, bw, lat: 2 * (n - 1) * lat + 2 * b / bw), False)

    def unfinished(b, n, bw, lat):
        raise NotImplementedError

    assert "fill in" in verdict(check_ring_time(unfinished), False)
    assert "raised ZeroDivisionError" in verdict(check_ring_time(lambda b, n, bw, lat: 1 / 0), False)
