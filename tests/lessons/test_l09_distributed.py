"""Notebook 09's lesson module: the pictures, the ring-time widget's view and the exercise checkers."""

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lora_course.distributed import ring_allreduce_seconds, scale_table  # noqa: E402
from lora_course.lessons.l09_distributed import (  # noqa: E402
    check_allreduce_bytes,
    check_lora_allreduce_bytes_fn,
    check_ring_time,
    draw_bytes,
    draw_checkpointing,
    draw_losses,
    draw_scale,
    ring_view,
    ring_widget,
    table_rows,
)

RECORD = {  # the shape of a torchrun record, as `lora_course.distributed` writes it
    "world_size": 2, "batch_size_per_rank": 4,
    "runs": {m: {"allreduce_bytes_per_step": [n * 4] * 3, "trainable_params": n, "bytes_per_element": 4,
                 "losses": [3.0, 2.5, 2.0]} for m, n in (("lora", 16384), ("full", 1874688))},
    "reference": {"lora": {"batch_size": 8, "losses": [3.0, 2.5, 2.0]}},
}


@pytest.fixture
def verdict(capsys):
    def check(result, expected):
        line = capsys.readouterr().out
        assert result is expected and line.startswith("Correct: " if expected else "Not yet: ")
        return line
    return check


def test_pictures_draw():
    for fig in (draw_bytes(RECORD), draw_losses(RECORD)):
        assert fig.axes
    ok = {"peak_bytes": 2e6, "ms": 3.0, "error": None}
    fig = draw_checkpointing({"no checkpointing": ok, "reentrant": {**ok, "error": "x"}, "non-reentrant": ok})
    assert len(fig.axes[0].patches) == 2  # the variant that failed is not drawn
    ax = draw_scale(scale_table())
    assert len(ax.patches) == 3 * 2 * 3  # models x methods x (compute + 2 bandwidths)
    plt.close("all")


def test_table_rows_one_line_per_row():
    rows = scale_table()
    lines = table_rows(rows)
    assert len(lines) == len(rows) + 1 and "GPT-2 124M" in lines[1]


def test_ring_view_follows_its_sliders():
    slow, fast = ring_view(8, 12.5), ring_view(8, 450)
    assert slow["summary"] != fast["summary"]
    full = next(r for r in slow["rows"] if r["method"] == "full")
    assert full["ring_s[12.5 GB/s]"] == pytest.approx(ring_allreduce_seconds(full["allreduce_bytes"], 8, 12.5e9))
    assert ring_view(64, 12.5)["summary"] != slow["summary"]


def test_ring_widget_has_two_sliders_and_no_dropdown():
    widget = ring_widget()
    kinds = sorted(type(c).__name__ for c in widget.children[:-1])
    assert kinds == ["FloatLogSlider", "IntSlider"]
    plt.close("all")


def test_check_allreduce_bytes(verdict):
    verdict(check_allreduce_bytes(...), False)
    verdict(check_allreduce_bytes(12 * 8 * (768 + 2304) * 2), True)
    assert "trainable parameters" in verdict(check_allreduce_bytes(12 * 8 * (768 + 2304)), False)
    assert "fp32" in verdict(check_allreduce_bytes(12 * 8 * (768 + 2304) * 4), False)
    assert "whole model" in verdict(check_allreduce_bytes(248_879_616), False)
    verdict(check_allreduce_bytes("many"), False)


def test_check_lora_allreduce_bytes_fn(verdict):
    verdict(check_lora_allreduce_bytes_fn(...), False)
    right = verdict(check_lora_allreduce_bytes_fn(lambda n, d_in, d_out, r, b: n * r * (d_in + d_out) * b), True)
    assert "589,824 bytes" in right
    assert "trainable parameters" in verdict(
        check_lora_allreduce_bytes_fn(lambda n, d_in, d_out, r, b: n * r * (d_in + d_out)), False)
    assert "frozen weight" in verdict(check_lora_allreduce_bytes_fn(lambda n, d_in, d_out, r, b: n * d_in * d_out * b),
                                      False)
    assert "r (d_in + d_out)" in verdict(check_lora_allreduce_bytes_fn(lambda n, d_in, d_out, r, b: n * r * d_in * b),
                                         False)

    def unfinished(n, d_in, d_out, r, b):
        raise NotImplementedError

    assert "fill in" in verdict(check_lora_allreduce_bytes_fn(unfinished), False)


def test_check_ring_time(verdict):
    verdict(check_ring_time(...), False)
    verdict(check_ring_time(lambda b, n, bw: 2 * (n - 1) / n * b / bw), True)
    assert "(N-1)/N" in verdict(check_ring_time(lambda b, n, bw: 2 * b / bw), False)
    assert "all-gather" in verdict(check_ring_time(lambda b, n, bw: (n - 1) / n * b / bw), False)

    def unfinished(b, n, bw):
        raise NotImplementedError

    assert "fill in" in verdict(check_ring_time(unfinished), False)
    assert "raised ZeroDivisionError" in verdict(check_ring_time(lambda b, n, bw: 1 / 0), False)
