"""Data parallelism with LoRA: the bytes DDP and FSDP put on the wire, measured and on paper.

Measured. `counting_allreduce` is a DDP communication hook: it counts each gradient
bucket's bytes into a `ByteCounter`, then averages the bucket across the ranks (what DDP
does without a hook). DDP buckets only parameters that require grad, so under LoRA the
bytes fall from the model to the adapter. `CollectiveCounter` counts every collective a
block of code runs, FSDP's all-gathers and reduce-scatters included. `run_local` runs a
function on N local CPU processes joined in a gloo group (forked, so a function defined in
a notebook works) and `measure_ddp` measures one model's DDP traffic with it.

On paper. A ring collective over N ranks takes `ring_steps` steps; in each, every rank
sends 1/N of the payload to its neighbour (Patarasuk & Yuan, 2009): an all-reduce is 2 (N-1)
steps (reduce-scatter, then all-gather), the other two N-1. Its time is the alpha-beta model

    time = base latency + steps x step latency + steps x payload / N / bandwidth

with the latencies of NCCL's own cost model (NCCL 2.30, src/graph/tuning.cc, ring
algorithm, Simple protocol): 8.4 us per collective, 3.4 us per step over NVLink and 14 us
per step over the network. `ddp_traffic` and `fsdp_traffic` list what one training step
sends; `scale_table` puts both engines, LoRA and full fine-tuning, against a step's compute.

The command line (`python -m lora_course.distributed`, or under torchrun) is lora_course/cli/distributed.py.
"""

from __future__ import annotations

import math
import pickle
import queue
import runpy
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import training_budget
from .skeletons import lora_counts
from .validate import check_int, check_positive

__all__ = ["Link", "LINKS", "Collective", "ring_steps", "collective_seconds", "ring_schedule", "ddp_traffic",
           "fsdp_traffic", "sharded_bytes", "step_flops", "SCALE_MODELS", "scale_table", "ByteCounter",
           "counting_allreduce", "CollectiveCounter", "run_local", "DDPMeasurement", "measure_ddp"]

DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb: 25 MiB per all-reduce
DDP_FIRST_BUCKET_BYTES = 2**20  # ... except the first bucket (the last layers' gradients, ready first): 1 MiB


@dataclass(frozen=True)
class Link:
    """A link between ranks: bandwidth one way (bytes/s) and the latencies of the alpha-beta model (s)."""

    bandwidth: float
    step_latency: float  # per ring step (one message to the neighbour)
    base_latency: float = 8.4e-6  # per collective (NCCL's ring / Simple base latency)


# A 100 Gb/s network (12.5 GB/s), and NVLink 4 on an H100 SXM (900 GB/s both ways together, 450 GB/s each way).
LINKS = {"Ethernet 100 Gb/s": Link(12.5e9, 14e-6), "NVLink 450 GB/s": Link(450e9, 3.4e-6)}


@dataclass(frozen=True)
class Collective:
    """`calls` collectives of one kind whose payloads (the whole, unsharded tensors) add up to `nbytes`."""

    kind: str  # "all-reduce", "all-gather" or "reduce-scatter"
    nbytes: int
    calls: int = 1
    label: str = ""


def ring_steps(kind: str, world_size: int) -> int:
    """Steps of a ring `kind` over `world_size` ranks: 2 (N-1) for an all-reduce, N-1 for the others."""
    check_int("world_size", world_size, minimum=1)
    steps = {"all-reduce": 2 * (world_size - 1), "all-gather": world_size - 1, "reduce-scatter": world_size - 1}
    if kind not in steps:
        raise ValueError(f"unknown collective {kind!r}; use one of {list(steps)}")
    return steps[kind]


def collective_seconds(c: Collective, world_size: int, link: Link) -> float:
    """The alpha-beta time of `c` on a ring: calls x (base + steps x step latency) + steps x bytes / N / bandwidth."""
    check_positive("bandwidth", link.bandwidth, hint="bytes per second, e.g. 12.5e9 for 100 Gb/s Ethernet")
    if c.nbytes < 0 or link.step_latency < 0 or link.base_latency < 0:
        raise ValueError(f"bytes and latencies must be >= 0, got {c.nbytes} bytes, {link}")
    steps = ring_steps(c.kind, world_size)
    if steps == 0 or c.calls == 0:  # one rank has nobody to talk to
        return 0.0
    return c.calls * (link.base_latency + steps * link.step_latency) + steps * c.nbytes / world_size / link.bandwidth


def ring_schedule(world_size: int) -> list[dict]:
    """Who sends what to whom in a ring all-reduce of N chunks over N ranks, step by step.

    Each step: {"phase": "reduce-scatter" or "all-gather", "sends": [(src, dst, chunk)],
    "summed": N x N list, how many ranks' values rank i's copy of chunk c holds after the step}.
    Reduce-scatter: rank i sends chunk (i - s) mod N and its neighbour adds it in; after N-1
    steps rank i holds the whole sum of chunk i + 1. All-gather passes the sums on around the ring.
    """
    n = check_int("world_size", world_size, minimum=2)
    summed = [[1] * n for _ in range(n)]
    steps = []
    for phase, offset in (("reduce-scatter", 0), ("all-gather", 1)):
        for s in range(n - 1):
            sends = [(i, (i + 1) % n, (i + offset - s) % n) for i in range(n)]
            before = [row[:] for row in summed]
            for src, dst, chunk in sends:
                summed[dst][chunk] = before[src][chunk] + (before[dst][chunk] if phase == "reduce-scatter" else 0)
            steps.append({"phase": phase, "sends": sends, "summed": [row[:] for row in summed]})
    return steps


def ddp_traffic(grad_bytes: int, bucket_bytes: int = DDP_BUCKET_BYTES,
                first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES) -> list[Collective]:
    """One DDP step: the trainable gradients all-reduced, one collective per bucket.

    DDP's buckets (as rebuilt after the first step): the first holds up to `first_bucket_bytes`,
    each next one up to `bucket_bytes`. Counted by bytes alone: a bucket holds whole tensors, so
    one larger than the cap gets a bucket of its own and a real count can be higher.
    """
    check_int("grad_bytes", grad_bytes, minimum=0)
    check_int("bucket_bytes", bucket_bytes, minimum=1)
    first = min(check_int("first_bucket_bytes", first_bucket_bytes, minimum=1), bucket_bytes)
    calls = 0 if grad_bytes == 0 else 1 + math.ceil(max(grad_bytes - first, 0) / bucket_bytes)
    return [Collective("all-reduce", grad_bytes, calls, "backward: all-reduce the gradients")]


def fsdp_traffic(unit_params: Sequence[int], unit_grads: Sequence[int], root_params: int = 0,
                 root_grads: int = 0) -> list[Collective]:
    """One FSDP step (FSDP2 `fully_shard` per block, then the root), in bytes of whole tensors.

    Every block's parameters are all-gathered before its forward and, freed after it, again
    before its backward, frozen or not; the root's (embeddings, head) once, as FSDP keeps the
    root gathered through the step. Each unit's trainable gradients are reduce-scattered.
    """
    if len(unit_params) != len(unit_grads):
        raise ValueError(f"one gradient size per unit: {len(unit_params)} units, {len(unit_grads)} gradient sizes")
    grads = [g for g in [*unit_grads, root_grads] if g]
    return [Collective("all-gather", sum(unit_params) + root_params, len(unit_params) + bool(root_params),
                       "forward: all-gather the parameters"),
            Collective("all-gather", sum(unit_params), len(unit_params), "backward: all-gather them again"),
            Collective("reduce-scatter", sum(grads), len(grads), "backward: reduce-scatter the gradients")]


def sharded_bytes(params, world_size: int) -> int:
    """Bytes of `params` as FSDP2 all-gathers them: dim 0 padded to a multiple of `world_size`."""
    return sum(math.ceil(p.shape[0] / world_size) * world_size * (p.numel() // max(p.shape[0], 1)) * p.element_size()
               for p in params)


def step_flops(n_params: int, n_trainable: int, tokens: int) -> int:
    """FLOPs of one training step: 2 P per token forward, 2 P backward to the activations, 2 T for weight grads.

    Full fine-tuning (T = P) gives the familiar 6 P per token; LoRA (T << P) about 4 P:
    the backward pass still runs through every frozen layer, it only skips their weight gradients.
    """
    return (4 * n_params + 2 * n_trainable) * tokens


SCALE_MODELS = ("GPT-2 small (124M)", "LLaMA-7B", "LLaMA-70B")  # names in skeletons.MODELS


def _engine_traffic(engine: str, c: dict, method: str, nbytes: int) -> list[Collective]:
    full = method == "full"
    if engine == "DDP":
        return ddp_traffic(nbytes * (c["total"] if full else c["trainable"]))
    block_grads = c["block"] if full else c["block_trainable"]
    return fsdp_traffic([nbytes * c["block"]] * c["blocks"], [nbytes * block_grads] * c["blocks"],
                        nbytes * c["root"], nbytes * c["root"] * full)


def scale_table(world_size: int = 8, r: int = 8, tokens_per_rank: int = 8 * 2048, nbytes: int = 2,
                gpu_flops: float = 989e12, mfu: float = 0.4, gpu_memory: float = 80e9,
                links: dict[str, Link] | None = None, models: Sequence[str] = SCALE_MODELS) -> list[dict]:
    """One row per model, method (full, lora) and engine (DDP, FSDP): bytes, collectives, time per link, compute.

    Defaults: 8 ranks, bf16 weights and gradients (`nbytes` 2), 8 sequences of 2048 tokens
    per rank, an H100 SXM (989 dense bf16 TFLOP/s, at 40% utilisation; 80 GB). LoRA is rank
    `r` on each model's `skeletons.MODELS` targets. "fits" says whether a whole replica's
    weights, gradients and AdamW state (`memory.training_budget`, bf16, activations left out)
    fit one GPU, as DDP needs. "ratio" is the slowest link's time over the compute time.
    """
    check_int("tokens_per_rank", tokens_per_rank, minimum=1)
    links = LINKS if links is None else links
    rows = []
    for model in models:
        c = lora_counts(model, r)
        for method, total, trainable in (("full", c["base"], c["base"]), ("lora", c["total"], c["trainable"])):
            compute = step_flops(total, trainable, tokens_per_rank) / (gpu_flops * mfu)
            fits = training_budget(total, trainable, precision="bf16").total <= gpu_memory
            for engine in ("DDP", "FSDP"):
                traffic = _engine_traffic(engine, c | {"total": total}, method, nbytes)
                row = {"model": model, "method": method, "engine": engine, "params": total, "trainable": trainable,
                       "fits": fits, "bytes": sum(t.nbytes for t in traffic), "calls": sum(t.calls for t in traffic),
                       "compute_s": compute, "traffic": traffic}
                for name, link in links.items():
                    row[f"s[{name}]"] = sum(collective_seconds(t, world_size, link) for t in traffic)
                row["ratio"] = max(row[f"s[{name}]"] for name in links) / compute
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- measured


class ByteCounter:
    """State of a DDP communication hook: the bytes all-reduced in each training step (`per_step`).

    `attach` registers a hook (default `counting_allreduce`) with this state and a forward
    pre-hook that opens a new step on every training forward.
    """

    def __init__(self):
        self.per_step: list[int] = []

    def new_step(self, module, args) -> None:
        if module.training:
            self.per_step.append(0)

    def attach(self, ddp: DistributedDataParallel, hook: Callable | None = None) -> "ByteCounter":
        ddp.register_comm_hook(self, hook or counting_allreduce)
        ddp.register_forward_pre_hook(self.new_step)
        return self


def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and would read this file's as strings
    """DDP communication hook: count the bucket's bytes, then average it over the ranks (DDP's own all-reduce).

    `state` is a `ByteCounter`, `bucket` a `dist.GradBucket`; returns a Future of the averaged (n,) buffer.
    """
    buffer = bucket.buffer()  # (n,) this bucket's gradients, flattened
    state.per_step[-1] += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size())
    work = dist.all_reduce(buffer, async_op=True)  # the sum over the ranks, in place
    return work.get_future().then(lambda fut: fut.value()[0])


def _tensor_bytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_tensor_bytes(a) for a in arg)
    return 0


class CollectiveCounter(TorchDispatchMode):
    """`with CollectiveCounter() as c:` counts the collectives run inside: `c.bytes[kind]`, `c.calls[kind]`.

    Bytes are each collective's payload, the whole tensor (an all-gather's output, a
    reduce-scatter's input), as `fsdp_traffic` counts them.
    """

    KINDS = {"allgather": "all-gather", "reducescatter": "reduce-scatter", "allreduce": "all-reduce"}

    def __init__(self):
        super().__init__()
        self.bytes = dict.fromkeys(self.KINDS.values(), 0)
        self.calls = dict.fromkeys(self.KINDS.values(), 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.__name__.replace("_", "")
            kind = next((k for key, k in self.KINDS.items() if key in name), None)
            if kind is not None:
                self.bytes[kind] += max(_tensor_bytes(a) for a in args)
                self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank(fn, rank: int, world: int, port: int, args, results, timeout: float) -> None:
    """One forked process of `run_local`: join the group, run `fn`, send back its result or its exception."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        dist.barrier()  # every rank has connected to every other before any can finish and close its connections
        try:
            out = (True, fn(rank, world, *args))
        finally:
            dist.destroy_process_group()
    except Exception as err:  # sent to the parent, which raises it
        out = (False, err)
    try:
        payload = pickle.dumps(out)
    except Exception as err:  # an unpicklable result or exception: say what it was
        payload = pickle.dumps((False, RuntimeError(f"rank {rank}: {type(err).__name__}: {err}")))
    results.put((rank, payload))


def run_local(fn: Callable, nprocs: int = 2, *args, timeout: float = 120.0) -> list:
    """`fn(rank, world_size, *args)` in `nprocs` forked CPU processes joined in a gloo group; results by rank.

    Forked, so `fn` may be defined anywhere, a notebook included. Results must pickle
    (return numbers, lists or NumPy arrays, not tensors). The first rank's exception is
    raised here; a rank that hangs or dies is stopped after `timeout` seconds.
    """
    check_int("nprocs", nprocs, minimum=1)
    ctx = mp.get_context("fork")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_local_rank, args=(fn, rank, nprocs, port, args, results, timeout), daemon=True)
             for rank in range(nprocs)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    try:
        while len(got) < nprocs:
            try:
                rank, payload = results.get(timeout=0.2)
                got[rank] = pickle.loads(payload)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"run_local: a rank {'died' if dead else 'hung'} ({len(got)} of "
                                       f"{nprocs} answered in {timeout:g} s)") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    for rank in range(nprocs):
        if not got[rank][0]:
            raise got[rank][1]
    return [got[rank][1] for rank in range(nprocs)]


@dataclass
class DDPMeasurement:
    """What `measure_ddp` saw: bytes all-reduced per step on every rank, and rank 0's gradients after the last."""

    bytes_per_step: list[list[int]]  # [rank][step]
    grads: dict[str, torch.Tensor]


def _ddp_rank(rank: int, world: int, build, input_ids, hook, steps: int, labels):
    model = build().train()
    ddp = DistributedDataParallel(model)
    counter = ByteCounter().attach(ddp, hook)
    rows, targets = input_ids.chunk(world)[rank], labels.chunk(world)[rank]  # this rank's share of the global batch
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        ddp(input_ids=rows, labels=targets).loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return counter.per_step, grads if rank == 0 else None


def measure_ddp(build: Callable[[], torch.nn.Module], input_ids: torch.Tensor, hook: Callable | None = None,
                nprocs: int = 2, steps: int = 1, timeout: float = 120.0,
                labels: torch.Tensor | None = None) -> DDPMeasurement:
    """Train-step a causal LM under DDP on `nprocs` local ranks with a comm hook; what it all-reduced.

    Every rank calls `build()` (the same model: seed it) and back-propagates the language-model
    loss of its rows of `input_ids` (B, T), B divisible by `nprocs`, against the same rows of
    `labels` (B, T; default `input_ids`, -100 masks a target); no optimizer step.
    `hook(state: ByteCounter, bucket) -> Future` defaults to `counting_allreduce`.
    """
    labels = input_ids if labels is None else labels
    if input_ids.shape[0] % nprocs or labels.shape != input_ids.shape:
        raise ValueError(f"the batch of {input_ids.shape[0]} rows must split evenly over {nprocs} ranks, and labels "
                         f"{tuple(labels.shape)} match input_ids {tuple(input_ids.shape)}")
    out = run_local(_ddp_rank, nprocs, build, input_ids, hook, steps, labels, timeout=timeout)
    return DDPMeasurement([per_step for per_step, _ in out], {n: torch.from_numpy(g) for n, g in out[0][1].items()})


if __name__ == "__main__":  # `python -m lora_course.distributed` (and torchrun): the command line
    runpy.run_module("lora_course.cli.distributed", run_name="__main__")
