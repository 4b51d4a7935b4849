"""lora_course.distributed: torchrun with 2 gloo processes, the bad-input paths, and the arithmetic at scale."""

import json
import os
import subprocess
import sys

import pytest

from lora_course.distributed import (
    BANDWIDTHS,
    allreduce_bytes,
    launch,
    main,
    ring_allreduce_seconds,
    scale_table,
    step_flops,
    torchrun_command,
)


def _launch(tmp_path, nproc, *args):
    out = tmp_path / "record.json"
    done = launch(nproc, [*args, "--out", str(out)], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done


def test_torchrun_two_processes_steps_3(tmp_path):
    """The acceptance run: `torchrun --nproc_per_node=2 -m lora_course.distributed --steps 3`, its JSON checked."""
    record, done = _launch(tmp_path, 2, "--steps", "3", "--reference")
    assert done.stderr == ""  # no OMP notice, no warnings
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["global_batch_size"] == 8
    runs = record["runs"]
    for method in ("lora", "full"):
        run = runs[method]
        # DDP all-reduces exactly one fp32 gradient per trainable parameter, every step.
        assert run["allreduce_bytes_per_step"] == [run["trainable_params"] * 4] * 3
        assert run["replicas_identical"] and len(run["digests"]) == 2
        # Two processes on 4 rows each follow one process on 8 rows.
        ref = record["reference"][method]
        assert ref["batch_size"] == 8
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-4
    assert runs["lora"]["trainable_params"] < runs["full"]["trainable_params"]
    assert runs["lora"]["allreduce_bytes_per_step"][0] < 0.01 * runs["full"]["allreduce_bytes_per_step"][0]
    assert runs["full"]["losses"][-1] < runs["full"]["losses"][0]


def test_unused_module_and_fsdp(tmp_path):
    record, done = _launch(tmp_path, 2, "--steps", "2", "--methods", "lora", "--unused", "--fsdp")
    assert done.stderr == ""
    unused = record["unused"]
    assert "find_unused_parameters=True" in unused["error"]
    found, frozen = unused["find_unused_parameters=True"], unused["frozen skipped adapters"]
    assert found["replicas_identical"] and frozen["replicas_identical"]
    # find_unused_parameters=True still all-reduces the skipped adapters (as zeros); freezing them sends less.
    assert found["allreduce_bytes_per_step"] == [found["trainable_params"] * 4] * 2
    assert frozen["allreduce_bytes_per_step"] == [frozen["trainable_params"] * 4] * 2
    assert frozen["trainable_params"] == found["trainable_params"] * 3 // 4  # 1 of the 4 blocks frozen
    assert found["losses"] == pytest.approx(frozen["losses"], abs=1e-5)

    fsdp = record["fsdp"]
    assert "uniform `requires_grad`" in fsdp["fsdp1_flat_error"]
    shard = fsdp["fully_shard"]
    assert shard["losses"] == pytest.approx(record["runs"]["lora"]["losses"], abs=1e-4)  # FSDP trains as DDP does
    for rank in shard["per_rank"]:
        assert rank["weights"] == shard["predicted_per_rank"]["weights"]
        assert rank["gradients"] == shard["predicted_per_rank"]["gradients"]
        assert rank["optimizer"] == shard["predicted_per_rank"]["optimizer"] + shard["adamw_step_bytes"]


def test_world_size_one_works_and_says_so(tmp_path):
    out = tmp_path / "one.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_course.distributed", "--steps", "1", "--methods", "lora",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world size 1" in done.stdout
    record = json.loads(out.read_text())
    assert record["world_size"] == 1 and record["runs"]["lora"]["replicas_identical"]


@pytest.mark.parametrize("argv, words", [
    (["--nproc", "200"], "training records to shard"),
    (["--nproc", "2", "--batch-size", "400"], "use fewer processes"),
    (["--nproc", "2", "--methods", "lora,dora"], "unknown method 'dora'"),
    (["--nproc", "2", "--model", "llama"], "unknown --model 'llama'"),
    (["--nproc", "0"], "must be at least 1"),
    (["--nproc", "2", "--steps", "0"], "--steps must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("error: ")


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--frobnicate"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_torchrun_command_names_the_module():
    cmd = torchrun_command(2, ["--steps", "3"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "lora_course.distributed", "--steps", "3"]


def test_ring_allreduce_by_hand():
    # 4 ranks, 1 GB at 10 GB/s: each rank moves 2 x 3/4 GB, 0.15 s.
    assert ring_allreduce_seconds(1e9, 4, 10e9) == pytest.approx(0.15)
    assert ring_allreduce_seconds(1e9, 1, 10e9) == 0  # nobody to talk to
    # Toward 2 x bytes / bandwidth as N grows.
    assert ring_allreduce_seconds(1e9, 1024, 1e9) == pytest.approx(2.0, rel=1e-3)
    for bad in [dict(nbytes=-1, world_size=2, bandwidth=1), dict(nbytes=1, world_size=0, bandwidth=1),
                dict(nbytes=1, world_size=2, bandwidth=0)]:
        with pytest.raises(ValueError):
            ring_allreduce_seconds(**bad)


def test_allreduce_bytes_and_flops():
    assert allreduce_bytes(1000, 2) == 2000
    with pytest.raises(ValueError):
        allreduce_bytes(-1)
    assert step_flops(10, 10, 3) == 6 * 10 * 3  # full fine-tuning: 6 P per token
    assert step_flops(10, 0, 3) == 4 * 10 * 3  # nothing trains: forward + backward to the activations


def test_scale_table_gpt2_row_by_hand():
    rows = {(r["model"], r["method"]): r for r in scale_table(world_size=8)}
    assert len(rows) == 6
    full, lora = rows["GPT-2 124M", "full"], rows["GPT-2 124M", "lora"]
    assert full["trainable"] == 124_439_808  # GPT-2 small, tied embeddings counted once
    assert lora["trainable"] == 12 * 8 * (768 + 3 * 768)  # r (in + out) per c_attn, 12 layers
    nbytes = 2 * full["trainable"]  # bf16 gradients
    assert full["allreduce_bytes"] == nbytes
    eth = BANDWIDTHS["Ethernet 100 Gb/s"]
    assert full["ring_s[Ethernet 100 Gb/s]"] == pytest.approx(2 * 7 / 8 * nbytes / eth)
    assert full["compute_s"] == pytest.approx(6 * full["trainable"] * 8 * 2048 / (989e12 * 0.4))
    for model in ("GPT-2 124M", "LLaMA-7B", "LLaMA-70B"):
        assert rows[model, "lora"]["allreduce_bytes"] < 0.01 * rows[model, "full"]["allreduce_bytes"]
        assert rows[model, "lora"]["ratio"] < rows[model, "full"]["ratio"]
    assert rows["LLaMA-7B", "lora"]["trainable"] == 4_194_304


def test_launcher_checks_then_runs_torchrun(tmp_path):
    out = tmp_path / "launched.json"
    done = subprocess.run([sys.executable, "-m", "lora_course.distributed", "--nproc", "2", "--steps", "1",
                           "--methods", "lora", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["world_size"] == 2


def test_bad_input_under_torchrun_itself_one_line_from_rank_0(tmp_path):
    """Under torchrun rank 0 says why and exits 2 before joining a group; the others wait until torchrun stops them."""
    done = launch(2, ["--batch-size", "400", "--out", str(tmp_path / "x.json")], timeout=300)
    assert done.returncode != 0 and not (tmp_path / "x.json").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: 2 processes x --batch-size 400 = 800 records per step, but the task has 608 training "
                     "records to shard; use fewer processes or a smaller --batch-size"]
    assert "exitcode  : 2" in done.stderr
