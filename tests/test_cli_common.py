"""lora_course.cli.common: the one usage-error path both command lines share, and their model builders."""

import pytest

from lora_course.cli.common import Parser, UsageError, adapt, build_model, check_at_least, run_command, split_targets
from lora_course.lora import count_parameters
from lora_course.models import toy_gpt2


def test_argparse_errors_are_one_line_and_status_2(capsys):
    parser = Parser("python -m tool", prog="tool")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "(python -m tool --help lists the options)" in err


def test_run_command_turns_a_usage_error_into_status_2(capsys):
    def bad():
        check_at_least(steps=(5, 1), batch_size=(0, 1))

    assert run_command(bad) == 2
    assert capsys.readouterr().err == "error: --batch-size must be at least 1, got 0\n"
    assert run_command(lambda: {"a dict": "is no status"}) == 0 and run_command(lambda: 3) == 3
    said = []
    assert run_command(bad, report=said.append) == 2 and isinstance(said[0], UsageError)


def test_adapt_lora_or_full_and_bad_targets_are_usage_errors():
    assert split_targets(" c_attn, ,c_proj ") == ["c_attn", "c_proj"]
    lora = adapt(toy_gpt2(), "lora", "c_attn", r=2, alpha=4)
    assert 0 < count_parameters(lora)[0] < count_parameters(lora)[1]
    full = adapt(toy_gpt2(), "full", "ignored", r=2, alpha=4)
    assert count_parameters(full)[0] == count_parameters(full)[1]
    with pytest.raises(UsageError, match="matched no module"):
        adapt(toy_gpt2(), "lora", "q_proj", r=2, alpha=4)


def test_gpt2_random_is_gpt2_small_shaped_and_seeded():
    model, tokenizer, said, shipped = build_model("gpt2-random", seed=0)
    assert count_parameters(model)[1] == 124_439_808 and not shipped and "gpt2-random" in said
    assert max(tokenizer("records to sentences")["input_ids"]) < model.config.vocab_size
