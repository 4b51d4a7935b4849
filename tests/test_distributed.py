"""lora_course.distributed and its command line: torchrun with 2 gloo processes, the bad-input paths, the hook and
the collective counter on local processes, and the alpha-beta arithmetic at scale."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from lora_course.cli.distributed import launch, main, torchrun_command
from lora_course.distributed import (
    LINKS,
    Collective,
    CollectiveCounter,
    Link,
    collective_seconds,
    ddp_traffic,
    fsdp_traffic,
    measure_ddp,
    ring_schedule,
    ring_steps,
    run_local,
    scale_table,
    sharded_bytes,
    step_flops,
)
from lora_course.lora import add_lora
from lora_course.models import toy_gpt2, toy_gpt2_config
from lora_course.skeletons import lora_counts


def _record(tmp_path, *args, env=None):
    """`python -m lora_course.distributed ARGS --out record.json` as a learner types it; the JSON record and the
    finished process."""
    out = tmp_path / "record.json"
    done = subprocess.run([sys.executable, "-m", "lora_course.distributed", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done


STEPS = 3


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun of 2 processes, as a learner types it, serving the two tests below (each of its parts is a
    separate run inside it): the launcher checks the arguments, then runs `torchrun --nproc_per_node=2 -m
    lora_course.distributed --steps 3 --reference --unused --fsdp`."""
    return _record(tmp_path_factory.mktemp("torchrun"), "--nproc", "2", "--steps", str(STEPS), "--reference",
                   "--unused", "--fsdp")


def test_torchrun_two_processes_steps_3(two_processes):
    """The acceptance run: DDP's traffic, identical replicas, and two processes following one."""
    record, done = two_processes
    assert done.stderr == ""  # no OMP notice, no warnings
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["global_batch_size"] == 8
    runs = record["runs"]
    for method in ("lora", "full"):
        run = runs[method]
        # DDP all-reduces exactly one fp32 gradient per trainable parameter, every step.
        assert run["allreduce_bytes_per_step"] == [run["trainable_params"] * 4] * STEPS
        assert run["replicas_identical"] and len(run["digests"]) == 2 and run["max_replica_diff"] == 0.0
        # Two processes on 4 rows each follow one process on 8 rows.
        ref = record["reference"][method]
        assert ref["batch_size"] == 8
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-4
    assert runs["lora"]["trainable_params"] < runs["full"]["trainable_params"]
    assert runs["lora"]["allreduce_bytes_per_step"][0] < 0.01 * runs["full"]["allreduce_bytes_per_step"][0]
    assert runs["full"]["losses"][-1] < runs["full"]["losses"][0]


def test_unused_module_and_fsdp(two_processes):
    record, done = two_processes
    assert done.stderr == ""
    unused = record["unused"]
    assert "find_unused_parameters=True" in unused["error"]
    found, frozen = unused["find_unused_parameters=True"], unused["frozen skipped adapters"]
    assert found["replicas_identical"] and frozen["replicas_identical"]
    assert found["max_replica_diff"] == frozen["max_replica_diff"] == 0.0
    # find_unused_parameters=True still all-reduces the skipped adapters (as zeros); freezing them sends less.
    # (These runs take 2 steps of their own, whatever --steps says.)
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
    # One FSDP step, counted on every collective: the prediction byte for byte, 4 blocks + the root.
    traffic = shard["traffic"]
    for method in ("lora", "full"):
        assert traffic[method]["bytes"] == shard["predicted_traffic"][method]
        assert traffic[method]["calls"]["all-gather"] == 4 + 1 + 4  # forward: blocks + root; backward: blocks
    assert traffic["lora"]["calls"]["reduce-scatter"] == 4 and traffic["full"]["calls"]["reduce-scatter"] == 5
    assert traffic["lora"]["bytes"]["reduce-scatter"] == 4 * shard["trainable_params"]
    assert traffic["lora"]["bytes"]["all-gather"] > traffic["full"]["bytes"]["all-gather"]  # the adapters, too


def test_world_size_one_works_and_says_so(tmp_path):
    record, done = _record(tmp_path, "--steps", "1", "--methods", "lora", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "world size 1" in done.stdout
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


def test_alpha_beta_by_hand():
    ethernet = Link(10e9, step_latency=1e-5, base_latency=0.0)
    # 4 ranks, 1 GB at 10 GB/s: 6 steps of 1/4 GB each, 0.15 s, plus 6 x 10 us.
    assert collective_seconds(Collective("all-reduce", 10**9), 4, ethernet) == pytest.approx(0.15 + 6e-5)
    assert collective_seconds(Collective("all-gather", 10**9, calls=2), 4, ethernet) == pytest.approx(0.075 + 6e-5)
    assert collective_seconds(Collective("all-reduce", 10**9), 1, ethernet) == 0  # nobody to talk to
    # Toward 2 x bytes / bandwidth as N grows, when the latency is left out.
    assert collective_seconds(Collective("all-reduce", 10**9), 1024, Link(1e9, 0.0, 0.0)) == pytest.approx(2, rel=1e-3)
    # NCCL's ring / Simple latencies: a small all-reduce on NVLink costs its latency, not 0.
    tiny = collective_seconds(Collective("all-reduce", 1000), 8, LINKS["NVLink 450 GB/s"])
    assert tiny == pytest.approx(8.4e-6 + 14 * 3.4e-6 + 14 / 8 * 1000 / 450e9)
    assert [ring_steps(k, 8) for k in ("all-reduce", "all-gather", "reduce-scatter")] == [14, 7, 7]
    for bad in [dict(c=Collective("all-reduce", -1), world_size=2, link=ethernet),
                dict(c=Collective("all-reduce", 1), world_size=0, link=ethernet),
                dict(c=Collective("all-reduce", 1), world_size=2, link=Link(0, 1e-6)),
                dict(c=Collective("broadcast", 1), world_size=2, link=ethernet)]:
        with pytest.raises(ValueError):
            collective_seconds(**bad)


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_ring_schedule_sums_every_chunk_on_every_rank(n):
    steps = ring_schedule(n)
    assert [s["phase"] for s in steps] == ["reduce-scatter"] * (n - 1) + ["all-gather"] * (n - 1)
    for step in steps:  # each rank sends one chunk to its neighbour per step
        assert sorted(src for src, _, _ in step["sends"]) == list(range(n))
        assert all(dst == (src + 1) % n for src, dst, _ in step["sends"])
    after_rs = steps[n - 2]["summed"]
    assert all(after_rs[i][(i + 1) % n] == n for i in range(n))  # rank i holds the whole sum of chunk i + 1
    assert steps[-1]["summed"] == [[n] * n for _ in range(n)]
    with pytest.raises(ValueError):
        ring_schedule(1)


def test_ddp_and_fsdp_traffic_by_hand():
    (c,) = ddp_traffic(60 * 2**20)  # 60 MiB of gradients: a 1 MiB first bucket, then 25 + 25 + 9 MiB
    assert (c.kind, c.nbytes, c.calls) == ("all-reduce", 60 * 2**20, 4)
    assert [ddp_traffic(n)[0].calls for n in (0, 2**20, 2**20 + 1, 26 * 2**20, 26 * 2**20 + 1)] == [0, 1, 2, 2, 3]
    assert ddp_traffic(60 * 2**20, first_bucket_bytes=25 * 2**20)[0].calls == 3  # bucket_cap_mb set: no small first
    fwd, bwd, rs = fsdp_traffic([10, 10, 10], [1, 0, 1], root_params=5, root_grads=0)
    assert (fwd.nbytes, fwd.calls) == (35, 4) and (bwd.nbytes, bwd.calls) == (30, 3)
    assert (rs.kind, rs.nbytes, rs.calls) == ("reduce-scatter", 2, 2)
    with pytest.raises(ValueError):
        fsdp_traffic([1, 2], [1])
    # FSDP2 pads each parameter's dim 0 to a multiple of the world size.
    assert sharded_bytes([torch.zeros(5, 3), torch.zeros(4)], 2) == (6 * 3 + 4) * 4


def test_step_flops():
    assert step_flops(10, 10, 3) == 6 * 10 * 3  # full fine-tuning: 6 P per token
    assert step_flops(10, 0, 3) == 4 * 10 * 3  # nothing trains: forward + backward to the activations


def test_scale_table_rows_by_hand():
    rows = {(r["model"], r["method"], r["engine"]): r for r in scale_table(world_size=8)}
    assert len(rows) == 12
    full, lora = rows["GPT-2 small (124M)", "full", "DDP"], rows["GPT-2 small (124M)", "lora", "DDP"]
    assert full["trainable"] == 124_439_808  # GPT-2 small, tied embeddings counted once
    assert lora["trainable"] == 12 * 8 * (768 + 3 * 768)  # r (in + out) per c_attn, 12 layers
    nbytes = 2 * full["trainable"]  # bf16 gradients
    assert full["bytes"] == nbytes and full["calls"] == 11  # 237 MiB: a 1 MiB bucket, then ten of up to 25 MiB
    latency = 11 * (8.4e-6 + 14 * 14e-6)  # 11 buckets, each 8.4 us + 14 steps of 14 us
    assert full["s[Ethernet 100 Gb/s]"] == pytest.approx(latency + 2 * 7 / 8 * nbytes / 12.5e9)
    assert full["compute_s"] == pytest.approx(6 * full["trainable"] * 8 * 2048 / (989e12 * 0.4))
    c = lora_counts("LLaMA-70B")
    fsdp = rows["LLaMA-70B", "lora", "FSDP"]
    assert fsdp["bytes"] == 2 * (2 * c["blocks"] * c["block"] + c["root"] + c["blocks"] * c["block_trainable"])
    for model in ("GPT-2 small (124M)", "LLaMA-7B", "LLaMA-70B"):
        assert rows[model, "lora", "DDP"]["bytes"] < 0.01 * rows[model, "full", "DDP"]["bytes"]
        assert rows[model, "lora", "FSDP"]["bytes"] > 0.6 * rows[model, "full", "FSDP"]["bytes"]  # the base, gathered
    assert rows["LLaMA-7B", "lora", "DDP"]["trainable"] == 4_194_304
    assert rows["LLaMA-7B", "lora", "DDP"]["fits"] and not rows["LLaMA-70B", "lora", "DDP"]["fits"]
    assert rows["LLaMA-70B", "lora", "FSDP"]["ratio"] > 1  # a slow link: longer than the compute


def _toy_lora():
    return add_lora(toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32), seed=0), ["c_attn"], r=4)


def test_measure_ddp_counts_the_adapter_and_averages_like_one_process():
    rows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    got = measure_ddp(_toy_lora, rows, steps=2)
    model = _toy_lora().train()
    model(input_ids=rows, labels=rows).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = 4 * sum(p.numel() for _, p in trainable)
    assert got.bytes_per_step == [[want, want], [want, want]]
    assert max((got.grads[n] - p.grad).abs().max().item() for n, p in trainable) < 1e-6
    with pytest.raises(ValueError, match="split evenly"):
        measure_ddp(_toy_lora, rows[:3])
    with pytest.raises(ValueError, match="labels"):
        measure_ddp(_toy_lora, rows, labels=rows[:, :8])


def test_measure_ddp_labels_each_rank_averages_its_own_targets():
    rows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = rows.clone()
    labels[2:, 4:] = -100  # rank 1 keeps 3 targets per row, rank 0 all 15
    state = torch.get_rng_state()  # the forked ranks build their LoRA (A's random init) from this state
    got = measure_ddp(_toy_lora, rows, labels=labels)
    halves = []  # one process on each rank's rows: DDP must give the mean of the two ranks' gradients
    for part in (slice(0, 2), slice(2, 4)):
        torch.set_rng_state(state)
        model = _toy_lora().train()
        model(input_ids=rows[part], labels=labels[part]).loss.backward()
        halves.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert max((got.grads[n] - (halves[0][n] + halves[1][n]) / 2).abs().max().item() for n in halves[0]) < 1e-6


def _collectives(rank, world):
    t = torch.full((4,), float(rank + 1))
    with CollectiveCounter() as comm:
        dist.all_reduce(t)
        out = torch.empty(8)
        dist.all_gather_into_tensor(out, t)
        dist.reduce_scatter_tensor(torch.empty(4), out)
    return t.tolist(), comm.bytes, comm.calls


def test_run_local_and_the_collective_counter():
    (t0, nbytes, calls), (t1, _, _) = run_local(_collectives, 2)
    assert t0 == t1 == [3.0] * 4  # 1 + 2 on both ranks
    assert nbytes == {"all-reduce": 16, "all-gather": 32, "reduce-scatter": 32}  # whole tensors, not shards
    assert calls == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1}


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("rank one")
    return rank


def test_run_local_raises_a_rank_s_exception():
    with pytest.raises(KeyError, match="rank one"):
        run_local(_fails_on_rank_1, 2)
    assert run_local(lambda rank, world, x: (rank, world, x), 3, "x") == [(0, 3, "x"), (1, 3, "x"), (2, 3, "x")]


def test_bad_input_under_torchrun_itself_one_line_from_rank_0(tmp_path):
    """Under torchrun rank 0 says why and exits 2 before joining a group; the others wait until torchrun stops them."""
    done = launch(2, ["--batch-size", "400", "--out", str(tmp_path / "x.json")], timeout=300)
    assert done.returncode != 0 and not (tmp_path / "x.json").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: 2 processes x --batch-size 400 = 800 records per step, but the task has 608 training "
                     "records to shard; use fewer processes or a smaller --batch-size"]
    assert "exitcode  : 2" in done.stderr
