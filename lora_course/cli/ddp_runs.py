"""The experiment each torchrun process runs (`python -m lora_course.distributed` under torchrun).

Every process (rank) builds the same model from the same seed, trains notebook 06's task
with `train.train` on its own slice of every global batch, and DistributedDataParallel
averages the gradients after each backward, through `distributed.counting_allreduce`,
which counts the bytes. gloo on CPU, NCCL on CUDA, from the same code. `run` returns the
record rank 0 writes:

- `runs[method]`: loss curve (mean over ranks), all-reduced bytes per step, trainable
  parameters, and whether every rank ended with the same parameters (a SHA-256 per rank);
- `reference[method]` (`--reference`): one process on the global batch, for comparison;
- `unused` (`--unused`): a targeted module the forward skips, with `find_unused_parameters`
  False (the error), True, and with the skipped adapters frozen;
- `fsdp` (`--fsdp`): FSDP1's flat-buffer error on a LoRA model, then FSDP2 `fully_shard`
  training with per-rank parameter, gradient and optimizer bytes against `memory.training_budget`,
  and the bytes one step all-gathers and reduce-scatters, for LoRA and full fine-tuning.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..data import batches, make_splits, shard_batches
from ..distributed import ByteCounter, CollectiveCounter, fsdp_traffic, sharded_bytes
from ..memory import training_budget
from ..runtime import seed_everything
from ..skeletons import transformer_blocks
from ..train import TrainConfig, train
from .common import adapt, build_model

__all__ = ["Rank", "run"]

LR = {"lora": 1e-2, "full": 2e-3}


class Rank:
    """This process's place in the group: rank, world size, device, backend (a group of one without torchrun)."""

    def __init__(self):
        if "RANK" not in os.environ:  # plain `python -m`: a group of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            self.device, self.backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
            torch.cuda.set_device(self.device)
        else:
            self.device, self.backend = torch.device("cpu"), "gloo"
        dist.init_process_group(self.backend, device_id=self.device if self.backend == "nccl" else None)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the group: free DDP/FSDP state while the group is alive, then destroy it."""
        gc.collect()  # DDP's reducer and FSDP's hooks sit in reference cycles holding gloo work: free them now
        dist.destroy_process_group()


def _replica_gap(model) -> float:
    """Largest |difference| between any rank's parameters and rank 0's (0.0: identical replicas)."""
    flat = torch.cat([p.detach().float().flatten() for _, p in sorted(model.state_dict().items())])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    gap = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def _digest(model) -> str:
    """SHA-256 of every parameter's bytes, in order (equal digests: equal replicas)."""
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        t = p.to_local() if hasattr(p, "to_local") else p
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build(args, method: str, device):
    """(model, tokenizer): `--model`, LoRA'd (alpha = 2 r) or fully trainable, seeded identically on every rank."""
    seed_everything(args.seed)
    model, tokenizer, _, _ = build_model(args.model, seed=args.seed)
    return adapt(model, method, args.targets, args.r, 2 * args.r).to(device), tokenizer


def _config(args, rank: Rank, method: str, steps: int | None = None, shard=True, **overrides) -> TrainConfig:
    return TrainConfig(**{"steps": steps or args.steps, "batch_size": args.batch_size, "lr": LR[method],
                          "seed": args.seed, "device": str(rank.device), "progress": False, "n_eval": 16,
                          "memory_steps": 1, "warmup_steps": 0, "shard": (rank.rank, rank.world) if shard else None,
                          **overrides})


def ddp_run(args, rank: Rank, method: str, find_unused: bool = False, prepare=None, steps=None) -> dict:
    """Train `method` under DDP; return what rank 0 reports."""
    model, tokenizer = _build(args, method, rank.device)
    if prepare is not None:
        prepare(model)
    ddp = DistributedDataParallel(model, device_ids=[rank.device.index] if rank.backend == "nccl" else None,
                                  find_unused_parameters=find_unused)
    counter = ByteCounter().attach(ddp)
    splits = make_splits()
    record = train(ddp, tokenizer, splits.train, splits.validation, _config(args, rank, method, steps))
    digests = rank.gather(_digest(model))
    return {
        "trainable_params": record.trainable_params, "total_params": record.total_params,
        "bytes_per_element": next(p for p in model.parameters() if p.requires_grad).element_size(),
        "allreduce_bytes_per_step": counter.per_step, "losses": rank.mean(record.losses),
        "val_loss": record.final_val_loss, "time_per_step_s": record.time_per_step,
        "digests": digests, "replicas_identical": len(set(digests)) == 1, "max_replica_diff": _replica_gap(model),
    }


def reference_run(args, rank: Rank, method: str) -> dict:
    """One process, no DDP, on the whole global batch (batch_size x world size): rank 0 only."""
    model, tokenizer = _build(args, method, rank.device)
    splits = make_splits()
    config = _config(args, rank, method, shard=False, batch_size=args.batch_size * rank.world)
    record = train(model, tokenizer, splits.train, splits.validation, config)
    return {"batch_size": config.batch_size, "losses": record.losses}


def skip_last_block(model) -> None:
    """Make the forward skip the last transformer block in every step: its adapters never get a gradient."""
    def skip(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    transformer_blocks(model)[-1].register_forward_hook(skip, with_kwargs=True)


def freeze_last_block(model) -> None:
    skip_last_block(model)
    transformer_blocks(model)[-1].requires_grad_(False)


def unused_runs(args, rank: Rank) -> dict:
    """The error of a skipped adapter under DDP's default, and its two fixes."""
    out = {}
    try:
        ddp_run(args, rank, "lora", find_unused=False, prepare=skip_last_block, steps=2)
        out["error"] = None
    except RuntimeError as err:  # raised by the second forward, on every rank alike
        out["error"] = str(err).strip().splitlines()[0]
    fixed = ddp_run(args, rank, "lora", find_unused=True, prepare=skip_last_block, steps=2)
    frozen = ddp_run(args, rank, "lora", find_unused=False, prepare=freeze_last_block, steps=2)
    for name, run in (("find_unused_parameters=True", fixed), ("frozen skipped adapters", frozen)):
        out[name] = {k: run[k] for k in ("trainable_params", "allreduce_bytes_per_step", "losses",
                                         "replicas_identical", "max_replica_diff")}
    return out


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def _shard(model, world: int, device):
    """FSDP2 per block (each parameter its own DTensor, so frozen and trainable never share a buffer), then the root."""
    mesh = init_device_mesh(device.type, (world,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _predicted_traffic(model, world: int) -> dict[str, int]:
    """`distributed.fsdp_traffic` of `model` as `_shard` wraps it, with FSDP2's padding of each parameter's dim 0."""
    blocks = list(transformer_blocks(model))
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    trainable = [[p for p in b.parameters() if p.requires_grad] for b in blocks]
    traffic = fsdp_traffic([sharded_bytes(b.parameters(), world) for b in blocks],
                           [sharded_bytes(t, world) for t in trainable], sharded_bytes(root, world),
                           sharded_bytes([p for p in root if p.requires_grad], world))
    totals = {"all-gather": 0, "reduce-scatter": 0}
    for c in traffic:
        totals[c.kind] += c.nbytes
    return totals


def _counted_step(model, batch: dict) -> dict:
    """Bytes and calls of each collective in one forward and backward of a sharded model."""
    model.train()
    model.reshard()  # start from shards, as every training step after the first does
    with CollectiveCounter() as comm:
        model(**batch).loss.backward()
    model.reshard()  # the root stays gathered through the step: shard it, so parameters() are the shards again
    return {"bytes": {k: v for k, v in comm.bytes.items() if v}, "calls": {k: v for k, v in comm.calls.items() if v}}


def fsdp_runs(args, rank: Rank) -> dict:
    """FSDP1 with flat buffers (the error), FSDP2 trained and measured, and one full fine-tuning step's traffic."""
    out = {}
    model, tokenizer = _build(args, "lora", rank.device)
    try:
        FullyShardedDataParallel(model, use_orig_params=False, device_id=rank.device)
        out["fsdp1_flat_error"] = None
    except ValueError as err:
        out["fsdp1_flat_error"] = str(err).strip().splitlines()[0]

    model, tokenizer = _build(args, "lora", rank.device)
    predicted = {"lora": _predicted_traffic(model, rank.world)}
    splits = make_splits()
    record = train(_shard(model, rank.world, rank.device), tokenizer, splits.train, splits.validation,
                   _config(args, rank, "lora"))
    global_batch = next(batches(tokenizer, splits.train, args.batch_size * rank.world, seed=0))
    batch = {k: v.to(rank.device) for k, v in next(shard_batches(iter([global_batch]), rank.rank, rank.world)).items()}
    traffic = {"lora": _counted_step(model, batch)}  # its gradient shards stay for the memory count below
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    measured = {"weights": _local_bytes(params), "gradients": _local_bytes(p.grad for p in trainable),
                "optimizer": record.optimizer_state_bytes}
    full, _ = _build(args, "full", rank.device)
    predicted["full"] = _predicted_traffic(full, rank.world)
    traffic["full"] = _counted_step(_shard(full, rank.world, rank.device), batch)
    budget = training_budget(record.total_params, record.trainable_params, precision="fp32")
    out["fully_shard"] = {
        "trainable_params": record.trainable_params, "total_params": record.total_params,
        "losses": rank.mean(record.losses),
        "per_rank": rank.gather(measured),
        "predicted_per_rank": {k: getattr(budget, k) / rank.world for k in ("weights", "gradients", "optimizer")},
        "unsharded": {k: getattr(budget, k) for k in ("weights", "gradients", "optimizer")},
        "adamw_step_bytes": 4 * len(trainable),  # AdamW's `step` counter: one fp32 scalar per parameter tensor
        "traffic": traffic, "predicted_traffic": predicted,
    }
    return out


def run(args) -> dict:
    """Every experiment `args` asks for, in one process group; rank 0's record (also written to `args.out`)."""
    rank = Rank()
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if rank.world == 1:
            rank.say("world size 1: DDP runs, but there is nobody to all-reduce with; "
                     "launch with torchrun --nproc_per_node=2 (or --nproc 2) to see the traffic")
        t0 = time.perf_counter()
        record = {"world_size": rank.world, "backend": rank.backend, "device": rank.device.type,
                  "model": args.model, "steps": args.steps, "batch_size_per_rank": args.batch_size,
                  "global_batch_size": args.batch_size * rank.world, "targets": args.targets, "r": args.r,
                  "runs": {}, "reference": {}}
        for method in args.methods:
            record["runs"][method] = run_ = ddp_run(args, rank, method)
            rank.say(f"{method}: {run_['allreduce_bytes_per_step'][0]:,d} bytes all-reduced per step, "
                     f"final loss {run_['losses'][-1]:.3f}")
            if args.reference:
                if rank.rank == 0:
                    record["reference"][method] = reference_run(args, rank, method)
                dist.barrier()
        if args.unused:
            record["unused"] = unused_runs(args, rank)
        if args.fsdp:
            record["fsdp"] = fsdp_runs(args, rank)
        record["wall_seconds"] = time.perf_counter() - t0
        dist.barrier()  # the last collective: every rank is done with its peers before any leaves
        return record
    finally:
        rank.close()
