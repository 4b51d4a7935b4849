"""Notebook 08's lesson module: the style tasks, serving helpers, the widget's logic and the exercise checkers."""

import copy

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from lora_course import add_lora, save_adapter  # noqa: E402
from lora_course.data import Record, batches, make_splits  # noqa: E402
from lora_course.lessons.l08_variants import (  # noqa: E402
    STYLES,
    check_dora_forward,
    check_mixed_rows,
    check_pissa_init,
    check_pissa_prediction,
    draw_style_scores,
    magnitude_direction_change,
    row_texts,
    serving_widget,
    style_matches,
    style_scores,
    style_target,
    train_style_adapter,
)
from lora_course.models import load_model  # noqa: E402
from lora_course.runtime import num_threads  # noqa: E402
from lora_course.serving import MultiAdapterModel, mixed_rows  # noqa: E402

RECORD = Record(name="sorted", kind="function", args="2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices: one thread is fastest (and far faster than two on a busy machine)."""
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer, _ = load_model("tiny-gpt2", verbose=False)
    return model, tokenizer, list(make_splits(n_validation=16, n_test=16, seed=0).train)


@pytest.fixture(scope="module")
def server(shipped, tmp_path_factory):
    base, tokenizer, records = shipped
    server = MultiAdapterModel(copy.deepcopy(base))
    root = tmp_path_factory.mktemp("styles")
    for i, style in enumerate(STYLES[:2]):
        model = add_lora(copy.deepcopy(base), ["c_attn"], r=4, alpha=8)
        train_style_adapter(model, tokenizer, records, style, steps=3, seed=i)
        server.load_adapter(save_adapter(model, root / style), style)
    return server.eval()


def test_styles_write_every_field_and_their_forms_tell_them_apart():
    assert style_target(RECORD, "sentence") == " sorted is a function that takes two arguments."
    assert style_target(RECORD, "call") == " sorted(a, b)  # function"
    assert style_target(RECORD, "question") == " What is sorted? A function with two arguments."
    for style in STYLES:
        text = style_target(RECORD, style)
        assert style_matches(text, RECORD, style) and style_matches(text, RECORD, style, exact=False)
        assert [s for s in STYLES if style_matches(text, RECORD, s, exact=False)] == [style]
    other = Record(name="zip", kind="class", args="0")
    assert style_matches(style_target(other, "call"), RECORD, "call", exact=False)
    assert not style_matches(style_target(other, "call"), RECORD, "call")
    with pytest.raises(ValueError, match="style"):
        style_target(RECORD, "poem")
    with pytest.raises(ValueError, match="style"):
        style_matches("x", RECORD, "poem")


def test_style_batches_score_the_answer_only(shipped):
    _, tokenizer, records = shipped
    batch = next(batches(tokenizer, records, batch_size=4, target=lambda r: style_target(r, "call")))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        scored = labels[labels != -100]
        assert scored[-1] == tokenizer.eos_token_id  # the answer ends with EOS
        text = tokenizer.decode(scored[:-1])
        assert "#" in text and "|" not in text  # the call style's answer, not the prompt
        assert mask.sum() == (ids != tokenizer.eos_token_id).sum() + 1  # padding is masked


def test_training_moves_only_the_adapter(shipped):
    base, tokenizer, records = shipped
    model = add_lora(copy.deepcopy(base), ["c_attn"], r=4, alpha=8)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_style_adapter(model, tokenizer, records, "question", steps=3)
    assert len(losses) == 3 and not model.training
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert any(torch.count_nonzero(layer.lora_B) for layer in [model.transformer.h[0].attn.c_attn])


def test_row_texts_and_style_scores(server, shipped):
    _, tokenizer, records = shipped
    names = ["sentence", None, "call"]
    texts = row_texts(server, tokenizer, records[:3], names)
    alone = [row_texts(server, tokenizer, [r], [n])[0] for r, n in zip(records[:3], names)]
    assert texts == alone
    server.set_adapter("call")
    scores = style_scores(server, tokenizer, records[:4], [None, "sentence"])
    assert set(scores) == {None, "sentence"} and set(scores[None]) == set(STYLES)
    assert all(0 <= v <= 1 for row in scores.values() for v in row.values())
    assert server.active_adapter == "call"
    ax = draw_style_scores(scores)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "sentence"]


def test_magnitude_direction_change():
    W0 = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert magnitude_direction_change(W0, W0) == pytest.approx((0.0, 0.0), abs=1e-6)
    dM, dD = magnitude_direction_change(W0, 2 * W0)
    assert dM == pytest.approx(W0.norm(dim=1).mean().item(), rel=1e-5) and dD == pytest.approx(0.0, abs=1e-6)
    dM, dD = magnitude_direction_change(W0, -W0)
    assert dM == pytest.approx(0.0, abs=1e-5) and dD == pytest.approx(2.0, rel=1e-5)


def test_widget_every_control_changes_the_table(server, shipped, monkeypatch):
    _, tokenizer, records = shipped
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj.data))
    widget = serving_widget(server, tokenizer, records)
    controls = widget.children[:3]
    assert [c.description for c in controls] == ["row 1", "row 2", "row 3"]
    widget.f(**widget.kwargs)
    first = shown[-1]
    assert "<table>" in first and "none" in first
    for control in controls:
        options = list(control.options)
        before = shown[-1]
        control.value = options[(options.index(control.value) + 1) % len(options)]
        widget.f(**widget.kwargs)
        assert shown[-1] != before, control.description


# ----------------------------------------------------------------------------- checkers

def test_dora_forward_checker(verdict):
    def right(x, W0, bias, lora_A, lora_B, magnitude, scaling):
        V = W0 + scaling * lora_B @ lora_A
        return x @ ((magnitude / V.norm(dim=1))[:, None] * V).T + bias

    def plain_lora(x, W0, bias, lora_A, lora_B, magnitude, scaling):
        return x @ (W0 + scaling * lora_B @ lora_A).T + bias

    def wrong_norm(x, W0, bias, lora_A, lora_B, magnitude, scaling):
        V = W0 + scaling * lora_B @ lora_A
        return x @ ((magnitude / V.norm())[:, None] * V).T + bias

    def blank(*args):
        raise NotImplementedError

    verdict(check_dora_forward(right), True)
    assert "plain LoRA" in verdict(check_dora_forward(plain_lora), False)
    assert "dim=1" in verdict(check_dora_forward(wrong_norm), False)
    assert "fill in" in verdict(check_dora_forward(blank), False)
    assert "shape" in verdict(check_dora_forward(lambda *a: torch.zeros(2)), False)
    assert "got ellipsis" in verdict(check_dora_forward(lambda *a: ...), False)


def test_pissa_init_checker(verdict):
    def right(W0, r, scaling):
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = torch.sqrt(S[:r] / scaling)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root
        return A, B, W0 - scaling * B @ A

    def uneven_split(W0, r, scaling):
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        A, B = Vh[:r], U[:, :r] * S[:r] / scaling
        return A, B, W0 - scaling * B @ A

    def smallest(W0, r, scaling):
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = torch.sqrt(S[-r:] / scaling)
        A, B = root[:, None] * Vh[-r:], U[:, -r:] * root
        return A, B, W0 - scaling * B @ A

    def no_residual(W0, r, scaling):
        A, B, _ = right(W0, r, scaling)
        return A, B, W0

    verdict(check_pissa_init(right), True)
    assert "split" in verdict(check_pissa_init(uneven_split), False)
    assert "top r" in verdict(check_pissa_init(smallest), False)
    assert "give back W0" in verdict(check_pissa_init(no_residual), False)
    assert "three tensors" in verdict(check_pissa_init(lambda *a: (1, 2)), False)
    assert "raised" in verdict(check_pissa_init(lambda *a: 1 / 0), False)


def _mixed_right(x, result, rows, output):
    out = result.clone()
    for name in dict.fromkeys(n for n in rows if n is not None):
        idx = torch.tensor([i for i, n in enumerate(rows) if n == name])
        out[idx] = output(name, x[idx], result[idx])
    return out


def test_mixed_rows_checker_blank_right_and_each_slip(verdict):
    verdict(check_mixed_rows(...), False)

    def blank(x, result, rows, output):
        raise NotImplementedError

    assert "fill in" in verdict(check_mixed_rows(blank), False)
    verdict(check_mixed_rows(_mixed_right), True)
    verdict(check_mixed_rows(mixed_rows), True)

    def per_row(x, result, rows, output):  # right rows, one call per row
        out = result.clone()
        for i, name in enumerate(rows):
            if name is not None:
                out[i:i + 1] = output(name, x[i:i + 1], result[i:i + 1])
        return out

    assert "called the adapters 4 times" in verdict(check_mixed_rows(per_row), False)

    def in_place(x, result, rows, output):
        for name in dict.fromkeys(n for n in rows if n is not None):
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name])
            result[idx] = output(name, x[idx], result[idx])
        return result

    assert "in place" in verdict(check_mixed_rows(in_place), False)

    def first_adapter_for_all(x, result, rows, output):
        name = next(n for n in rows if n is not None)
        return output(name, x, result)

    assert "row 1 (adapter None) is wrong: a None row keeps the base output" in \
        verdict(check_mixed_rows(first_adapter_for_all), False)
    assert "shape" in verdict(check_mixed_rows(lambda *a: 3), False)


def test_pissa_prediction_checker_blank_unknown_right_and_wrong(verdict, shipped, capsys):
    base, tokenizer, records = shipped
    verdict(check_pissa_prediction(..., base, tokenizer, records), False)
    assert '"yes" or "no"' in verdict(check_pissa_prediction("maybe", base, tokenizer, records), False)
    said_yes = check_pissa_prediction("yes", base, tokenizer, records, r=2, steps=3)
    line = capsys.readouterr().out
    assert "PiSSA" in line and "LoRA" in line and line.startswith("Correct" if said_yes else "Not yet")
    assert "the answer is" in verdict(check_pissa_prediction("no" if said_yes else "yes", base, tokenizer, records,
                                                             r=2, steps=3), False)
