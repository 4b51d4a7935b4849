"""LoRA under data parallelism: what DDP and FSDP move and hold, measured with torch.distributed.

    torchrun --standalone --nproc_per_node=2 -m lora_course.distributed --steps 3
    python -m lora_course.distributed --nproc 2 --steps 3      # the same, checked first, then torchrun

Every process (rank) builds the same model from the same seed, trains notebook 06's task
with `train.train` on its own slice of every global batch, and DistributedDataParallel
averages the gradients with an all-reduce after each backward. gloo on CPU, NCCL on CUDA,
from the same code. A DDP communication hook counts the bytes each step all-reduces: DDP
puts only parameters with `requires_grad` into its buckets, so under LoRA the bytes on
the wire fall from the whole model to the adapter. Rank 0 writes a JSON record:

- `runs[method]`: loss curve (mean over ranks), all-reduced bytes per step, trainable
  parameters, and whether every rank ended with the same parameters (a SHA-256 per rank);
- `reference[method]` (`--reference`): one process on the global batch, for comparison;
- `unused` (`--unused`): a targeted module the forward skips, with `find_unused_parameters`
  False (the error), True, and with the skipped adapters frozen;
- `fsdp` (`--fsdp`): FSDP1's flat-buffer error on a LoRA model, then FSDP2 `fully_shard`
  training with per-rank parameter, gradient and optimizer bytes against `memory.training_budget`.

Bad input exits with status 2 and one line. Under torchrun itself rank 0 says the line and
exits 2 while the other ranks wait (up to a minute) to be stopped, so torchrun's failure
report names rank 0. The `--nproc` launcher checks first and says only the line, except for
`--targets`, which needs the model and is checked inside each process.

The paper side: `ring_allreduce_seconds` and `scale_table` put the bytes against the
bandwidth of a ring all-reduce, 2 (N-1)/N x bytes / bandwidth (Patarasuk & Yuan, 2009),
for GPT-2 124M, LLaMA-7B and a 70B LLaMA, next to a step's compute time from FLOPs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from .validate import check_int, check_positive

__all__ = [
    "BANDWIDTHS",
    "SCALE_MODELS",
    "UsageError",
    "allreduce_bytes",
    "ring_allreduce_seconds",
    "step_flops",
    "scale_table",
    "ByteCounter",
    "torchrun_command",
    "launch",
    "parse_args",
    "main",
]

MODELS = ("tiny-gpt2", "gpt2-random")
METHODS = ("lora", "full")

# Link bandwidths one way, bytes per second: a 100 Gb/s Ethernet NIC, and NVLink 4 on an
# H100 SXM (900 GB/s both ways together, 450 GB/s each way).
BANDWIDTHS = {"Ethernet 100 Gb/s": 12.5e9, "NVLink 450 GB/s": 450e9}


OTHER_RANKS_WAIT_S = 60  # on bad input under torchrun, how long ranks > 0 wait for torchrun to stop them


class UsageError(Exception):
    """Bad input from the command line: the message says what to change."""


# --------------------------------------------------------------------------- on paper

def allreduce_bytes(n_trainable: int, bytes_per_element: int = 4) -> int:
    """Bytes DDP all-reduces per step: one gradient per trainable parameter."""
    check_int("n_trainable", n_trainable, minimum=0)
    check_int("bytes_per_element", bytes_per_element, minimum=1)
    return n_trainable * bytes_per_element


def ring_allreduce_seconds(nbytes: float, world_size: int, bandwidth: float) -> float:
    """Time of a ring all-reduce of `nbytes` over `world_size` ranks: 2 (N-1)/N x bytes / bandwidth.

    Each rank sends (and receives) N-1 chunks of bytes/N in the reduce-scatter and N-1
    more in the all-gather; `bandwidth` is bytes per second one way on the slowest link.
    One rank has nobody to talk to: 0 seconds.
    """
    check_int("world_size", world_size, minimum=1)
    check_positive("bandwidth", bandwidth, hint="bytes per second, e.g. 12.5e9 for 100 Gb/s Ethernet")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return 2 * (world_size - 1) / world_size * nbytes / bandwidth


def step_flops(n_params: int, n_trainable: int, tokens: int) -> int:
    """FLOPs of one training step: 2 P per token forward, 2 P backward to the activations, 2 T for weight grads.

    Full fine-tuning (T = P) gives the familiar 6 P per token; LoRA (T << P) about 4 P:
    the backward pass still runs through every frozen layer, it only skips their weight gradients.
    """
    return (4 * n_params + 2 * n_trainable) * tokens


def _scale_models():
    from .skeletons import gpt2_config, llama_7b_config, llama_70b_config

    return {
        "GPT-2 124M": (lambda: gpt2_config("small"), ["c_attn"]),
        "LLaMA-7B": (llama_7b_config, ["q_proj", "v_proj"]),
        "LLaMA-70B": (llama_70b_config, ["q_proj", "v_proj"]),
    }


SCALE_MODELS = ("GPT-2 124M", "LLaMA-7B", "LLaMA-70B")
_COUNTS: dict[tuple[str, int], dict] = {}


def _counts(model: str, r: int) -> dict:
    """Total and LoRA-trainable parameters of a `SCALE_MODELS` model, counted on the meta device (cached)."""
    from .lora import add_lora
    from .skeletons import meta_lora_counts

    if model not in SCALE_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {list(SCALE_MODELS)}")
    if (model, r) not in _COUNTS:
        config, targets = _scale_models()[model]
        _COUNTS[model, r] = meta_lora_counts(config(), lambda m: add_lora(m, targets, r=r)) | {"targets": targets}
    return _COUNTS[model, r]


def scale_table(world_size: int = 8, r: int = 8, tokens_per_rank: int = 8 * 2048, grad_bytes: int = 2,
                gpu_flops: float = 989e12, mfu: float = 0.4, bandwidths: dict | None = None,
                models=SCALE_MODELS) -> list[dict]:
    """One row per model and method: all-reduce bytes, ring time at each bandwidth, compute time.

    Defaults: 8 ranks, bf16 gradients, 8 sequences of 2048 tokens per rank, an H100's 989
    dense bf16 TFLOP/s at 40% utilisation. LoRA is rank `r` on q, v (LLaMA) or c_attn
    (GPT-2). Compute time is `step_flops` / (gpu_flops x mfu). `ratio` is the slowest
    link's communication time over compute time: above 1, the all-reduce (unless hidden
    under the backward pass) sets the pace.
    """
    check_int("world_size", world_size, minimum=1)
    check_int("tokens_per_rank", tokens_per_rank, minimum=1)
    bandwidths = BANDWIDTHS if bandwidths is None else bandwidths
    rows = []
    for model in models:
        c = _counts(model, r)
        for method, total, trainable in (("full", c["base"], c["base"]), ("lora", c["total"], c["trainable"])):
            nbytes = allreduce_bytes(trainable, grad_bytes)
            compute = step_flops(total, trainable, tokens_per_rank) / (gpu_flops * mfu)
            row = {"model": model, "method": method, "params": total, "trainable": trainable,
                   "allreduce_bytes": nbytes, "compute_s": compute}
            for name, bw in bandwidths.items():
                row[f"ring_s[{name}]"] = ring_allreduce_seconds(nbytes, world_size, bw)
            row["ratio"] = max(row[f"ring_s[{name}]"] for name in bandwidths) / compute
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- measured

class ByteCounter:
    """DDP communication hook state: bytes all-reduced in each training step.

    `hook` is DDP's default all-reduce (average) plus a count of each bucket's bytes;
    `new_step` (a forward pre-hook on the DDP module) opens a new step on each training forward.
    """

    def __init__(self):
        self.per_step: list[int] = []

    def new_step(self, module, args):
        if module.training:
            self.per_step.append(0)

    @staticmethod
    def hook(state: "ByteCounter", bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buffer = bucket.buffer()  # the bucket's gradients, flattened into one tensor
        state.per_step[-1] += buffer.numel() * buffer.element_size()
        return allreduce_hook(None, bucket)

    def attach(self, ddp) -> "ByteCounter":
        ddp.register_comm_hook(self, ByteCounter.hook)
        ddp.register_forward_pre_hook(self.new_step)
        return self


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line and status 2
            self.exit(2, f"error: {message} (python -m lora_course.distributed --help lists the options)\n")

    p = Parser(prog="torchrun --nproc_per_node=N -m lora_course.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None,
                   help="launch this many processes with torchrun (checked first); omit when run under torchrun")
    p.add_argument("--model", default="tiny-gpt2", help=f"one of {', '.join(MODELS)} (default tiny-gpt2)")
    p.add_argument("--methods", default="lora,full", help="comma-separated, from lora, full (default both)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="rows per rank per step (global: x world size)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="c_attn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="also train one process on the global batch")
    p.add_argument("--unused", action="store_true", help="find_unused_parameters with a skipped targeted module")
    p.add_argument("--fsdp", action="store_true", help="FSDP1's error and FSDP2 fully_shard with LoRA")
    p.add_argument("--out", default="runs/distributed.json", help="JSON record rank 0 writes")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def _check(args, world_size: int) -> None:
    """Every check that needs no process group: raise UsageError with one line."""
    from .data import make_splits

    for m in args.methods or ["(none)"]:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; use lora, full or both (lora,full)")
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; use one of {', '.join(MODELS)}")
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--r", args.r),
                        ("world size (--nproc / --nproc_per_node)", world_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    n_train = len(make_splits().train)
    if args.batch_size * world_size > n_train:
        raise UsageError(f"{world_size} processes x --batch-size {args.batch_size} = "
                         f"{args.batch_size * world_size} records per step, but the task has {n_train} training "
                         "records to shard; use fewer processes or a smaller --batch-size")


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The torchrun command line for `nproc` processes on this machine (a free port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lora_course.distributed", *args]


def launch(nproc: int, args: list[str], **run_kwargs) -> subprocess.CompletedProcess:
    """Run `torchrun_command(nproc, args)` with one intra-op thread per process (and no OMP notice).

    The processes import this same `lora_course` (its folder goes first on PYTHONPATH).
    Returns the finished process (text output captured unless `run_kwargs` say otherwise).
    """
    here = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}
    run_kwargs = {"capture_output": True, "text": True, "env": env, **run_kwargs}
    return subprocess.run(torchrun_command(nproc, args), **run_kwargs)


# --------------------------------------------------------------------------- inside each process

class _Rank:
    """This process's place in the group: rank, world size, device, backend."""

    def __init__(self):
        import torch.distributed as dist

        if "RANK" not in os.environ:  # plain `python -m`: a group of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
            self.backend = "nccl"
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
        dist.init_process_group(self.backend, device_id=self.device if self.backend == "nccl" else None)
        self.dist = dist

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the group: free DDP/FSDP state while the group is alive, then destroy it."""
        gc.collect()  # DDP's reducer and FSDP's hooks sit in reference cycles holding gloo work: free them now
        self.dist.destroy_process_group()


def _digest(model) -> str:
    """SHA-256 of every parameter's bytes, in order (equal digests: equal replicas)."""
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        t = p.to_local() if hasattr(p, "to_local") else p
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build(args, method: str, device):
    """(model, tokenizer): the base model of `--model`, LoRA'd or fully trainable, seeded identically on every rank."""
    from .lora import add_lora
    from .models import load_model, toy_gpt2
    from .runtime import seed_everything
    from .skeletons import gpt2_config

    seed_everything(args.seed)
    model, tokenizer, _ = load_model("tiny-gpt2", device="cpu", fast=False, verbose=False)
    if args.model == "gpt2-random":  # GPT-2 124M's shape, random weights; the shipped BPE ids fit its vocab
        model = toy_gpt2(gpt2_config("small"), seed=args.seed)
    if method == "lora":
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        try:
            add_lora(model, targets, r=args.r, alpha=2 * args.r)
        except (ValueError, TypeError) as err:
            raise UsageError(str(err).splitlines()[0]) from None
    else:
        model.requires_grad_(True)
    return model.to(device), tokenizer


def _config(args, rank: _Rank, method: str, steps: int | None = None, shard=True, **overrides):
    from .train import TrainConfig

    lr = {"lora": 1e-2, "full": 2e-3}[method]
    return TrainConfig(**{"steps": steps or args.steps, "batch_size": args.batch_size, "lr": lr, "seed": args.seed,
                          "device": str(rank.device), "progress": False, "n_eval": 16, "memory_steps": 1,
                          "warmup_steps": 0, "shard": (rank.rank, rank.world) if shard else None, **overrides})


def _ddp_run(args, rank: _Rank, method: str, find_unused: bool = False, prepare=None, steps=None) -> dict:
    """Train `method` under DDP; return what rank 0 reports."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .data import make_splits
    from .train import train

    model, tokenizer = _build(args, method, rank.device)
    if prepare is not None:
        prepare(model)
    ddp = DDP(model, device_ids=[rank.device.index] if rank.backend == "nccl" else None,
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
        "digests": digests, "replicas_identical": len(set(digests)) == 1,
    }


def _reference_run(args, rank: _Rank, method: str) -> dict:
    """One process, no DDP, on the whole global batch (batch_size x world size): rank 0 only."""
    from .data import make_splits
    from .train import train

    model, tokenizer = _build(args, method, rank.device)
    splits = make_splits()
    config = _config(args, rank, method, shard=False, batch_size=args.batch_size * rank.world)
    record = train(model, tokenizer, splits.train, splits.validation, config)
    return {"batch_size": config.batch_size, "losses": record.losses}


def _skip_last_block(model) -> None:
    """Make the forward skip the last transformer block (as layer dropping does): its adapters get no gradient."""
    def skip(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    model.transformer.h[-1].register_forward_hook(skip, with_kwargs=True)


def _freeze_last_block(model) -> None:
    _skip_last_block(model)
    model.transformer.h[-1].requires_grad_(False)


def _unused_runs(args, rank: _Rank) -> dict:
    out = {}
    try:
        _ddp_run(args, rank, "lora", find_unused=False, prepare=_skip_last_block, steps=2)
        out["error"] = None
    except RuntimeError as err:  # raised by the second forward, on every rank alike
        out["error"] = str(err).strip().splitlines()[0]
    fixed = _ddp_run(args, rank, "lora", find_unused=True, prepare=_skip_last_block, steps=2)
    frozen = _ddp_run(args, rank, "lora", find_unused=False, prepare=_freeze_last_block, steps=2)
    for name, run in (("find_unused_parameters=True", fixed), ("frozen skipped adapters", frozen)):
        out[name] = {k: run[k] for k in ("trainable_params", "allreduce_bytes_per_step", "losses",
                                         "replicas_identical")}
    return out


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def _fsdp_runs(args, rank: _Rank) -> dict:
    """FSDP1 with flat buffers (the error), then FSDP2 fully_shard per block, trained and measured."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from .data import make_splits, shard_batches
    from .memory import training_budget
    from .train import train

    out = {}
    model, tokenizer = _build(args, "lora", rank.device)
    try:
        FullyShardedDataParallel(model, use_orig_params=False, device_id=rank.device)
        out["fsdp1_flat_error"] = None
    except ValueError as err:
        out["fsdp1_flat_error"] = str(err).strip().splitlines()[0]

    model, tokenizer = _build(args, "lora", rank.device)
    mesh = init_device_mesh(rank.device.type, (rank.world,))
    for block in model.transformer.h:  # one shard group per block: each parameter is its own DTensor
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    splits = make_splits()
    record = train(model, tokenizer, splits.train, splits.validation, _config(args, rank, "lora"))
    model.train()  # one more backward to see the gradient shards (train() frees them after every step)
    batch = next(shard_batches(iter([_first_batch(tokenizer, splits.train, args.batch_size * rank.world)]),
                               rank.rank, rank.world))
    model(**{k: v.to(rank.device) for k, v in batch.items()}).loss.backward()
    model.reshard()  # the root group stays gathered after a forward without backward (validation): shard it
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    measured = {"weights": _local_bytes(params), "gradients": _local_bytes(p.grad for p in trainable),
                "optimizer": record.optimizer_state_bytes}
    budget = training_budget(record.total_params, record.trainable_params, precision="fp32")
    out["fully_shard"] = {
        "trainable_params": record.trainable_params, "total_params": record.total_params,
        "losses": rank.mean(record.losses),
        "per_rank": rank.gather(measured),
        "predicted_per_rank": {k: getattr(budget, k) / rank.world for k in ("weights", "gradients", "optimizer")},
        "unsharded": {k: getattr(budget, k) for k in ("weights", "gradients", "optimizer")},
        "adamw_step_bytes": 4 * len(trainable),  # AdamW's `step` counter: one fp32 scalar per parameter tensor
    }
    return out


def _first_batch(tokenizer, records, batch_size: int):
    from .data import batches

    return next(batches(tokenizer, records, batch_size, seed=0))


def _run(args) -> dict:
    rank = _Rank()
    try:
        _check(args, rank.world)
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
            record["runs"][method] = _ddp_run(args, rank, method)
            rank.say(f"{method}: {record['runs'][method]['allreduce_bytes_per_step'][0]:,d} bytes all-reduced "
                     f"per step, final loss {record['runs'][method]['losses'][-1]:.3f}")
            if args.reference:
                if rank.rank == 0:
                    record["reference"][method] = _reference_run(args, rank, method)
                rank.dist.barrier()
        if args.unused:
            record["unused"] = _unused_runs(args, rank)
        if args.fsdp:
            record["fsdp"] = _fsdp_runs(args, rank)
        record["wall_seconds"] = time.perf_counter() - t0
        rank.dist.barrier()  # the last collective: every rank is done with its peers before any leaves
        if rank.rank == 0:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
            rank.say(f"wrote {out}")
        return record
    finally:
        rank.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc is not None:  # the launcher: check here, then run torchrun
            if "RANK" in os.environ:
                raise UsageError("--nproc launches torchrun; under torchrun leave it out")
            _check(args, args.nproc)
            rest = _without_nproc(list(sys.argv[1:] if argv is None else argv))
            return launch(args.nproc, rest, capture_output=False).returncode
        if "RANK" in os.environ:
            _check(args, int(os.environ["WORLD_SIZE"]))
        _run(args)
    except UsageError as err:
        if os.environ.get("RANK", "0") == "0" or "TORCHELASTIC_RUN_ID" not in os.environ:
            print(f"error: {err}", file=sys.stderr)
        else:  # under torchrun let rank 0 fail first: torchrun stops every worker at the first failure,
            time.sleep(OTHER_RANKS_WAIT_S)  # perhaps before rank 0 had printed
        return 2
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
