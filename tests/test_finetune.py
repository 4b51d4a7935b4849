"""python -m lora_course.finetune: the notebook's experiment from a terminal, and its bad-input errors."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_course import load_adapter, merge_lora
from lora_course.finetune import main
from lora_course.models import toy_gpt2
from lora_course.skeletons import gpt2_config


def test_gpt2_random_runs_saves_a_peft_adapter_that_reloads_and_merges(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_course.finetune", "--model", "gpt2-random", "--steps", "2", "--device", "cpu",
           "--batch-size", "2", "--val-records", "4", "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "trainable parameters" in done.stdout and "LoRA (fp32, cpu)" in done.stdout  # fp32: the CPU's default
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 2 and record["precision"] == "fp32"
    assert record["trainable_params"] == 12 * 8 * (768 + 3 * 768)  # r (in + out) on each c_attn
    assert record["lora"]["r"] == 8 and record["lora"]["target_modules"] == ["c_attn"]

    from peft import PeftModel

    base = toy_gpt2(gpt2_config("small"), seed=0)  # the CLI's base: seed 0 (124M parameters, built once)
    ours = load_adapter(copy.deepcopy(base), out)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.randint(0, 8192, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, their_logits = ours(ids).logits, theirs(ids).logits
        base_logits = base(ids).logits
        assert (ours_logits - base_logits).abs().max() > 0  # two steps moved B off zero
        assert (ours_logits - their_logits).abs().max().item() < 1e-4
        merged_logits = merge_lora(ours)(ids).logits
    assert (merged_logits - ours_logits).abs().max().item() < 1e-4  # merged in fp32: same model


def test_bf16_autocast_trains_in_bf16_and_saves_fp32_factors(tmp_path, capsys, monkeypatch):
    """--precision bf16 on the shipped model (bf16 matmuls are slow on CPUs without native bf16, so not on
    GPT-2's 124M shape): each training step's loss is computed under bf16 autocast, and the LoRA factors stay
    fp32, in training and on disk."""
    import lora_course.train

    autocast = []  # (enabled, dtype) at each training step's loss
    target_loss = lora_course.train.target_loss

    def recording(model, batch):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return target_loss(model, batch)

    monkeypatch.setattr(lora_course.train, "target_loss", recording)
    out = tmp_path / "run"
    argv = ["--steps", "2", "--precision", "bf16", "--device", "cpu", "--batch-size", "2", "--val-records", "4",
            "--eval-records", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert autocast == [(True, torch.bfloat16)] * 2
    assert "LoRA (bf16 autocast, cpu)" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["precision"] == "bf16 autocast" and record["steps"] == 2
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    assert any(name.endswith("lora_B.weight") and t.abs().max() > 0 for name, t in saved.items())  # it trained


def exit_code(argv) -> int:
    """main's status, also when argparse exits on its own."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown --model"),
    (["--r", "1000"], "exceeds"),
    (["--targets", "q_proj,v_proj"], "matched no module"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--val-records", "0"], "--val-records must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--method", "prefix"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    steps = [] if "--steps" in argv else ["--steps", "1"]
    assert exit_code([*argv, *steps, "--out", str(out), "--no-progress", "--eval-records", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unwritable_or_occupied_output_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert exit_code(["--out", str(a_file / "sub"), "--steps", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert exit_code(["--out", "/proc/lora-course-test", "--steps", "1"]) == 2
    assert "cannot write" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "adapter_config.json").write_text("{}")
    assert exit_code(["--out", str(busy), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "adapter_config.json").read_text() == "{}"
