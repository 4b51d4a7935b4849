"""LoRA under data parallelism, from a terminal: what DDP and FSDP move and hold, measured with torch.distributed.

    torchrun --standalone --nproc_per_node=2 -m lora_course.distributed --steps 3
    python -m lora_course.distributed --nproc 2 --steps 3      # the same, checked first, then torchrun

Under torchrun each process runs `cli.ddp_runs.run` (its docstring lists the record) and rank
0 writes the JSON record to `--out`. Bad input exits with status 2 and one line. Under
torchrun itself rank 0 says the line and exits 2 while the other ranks wait (up to a minute)
to be stopped, so torchrun's failure report names rank 0. The `--nproc` launcher checks
first and says only the line, except for `--targets`, which needs the model and is checked
inside each process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..data import make_splits
from .common import Parser, UsageError, check_at_least, print_error, run_command
from .ddp_runs import run

__all__ = ["MODELS", "METHODS", "parse_args", "check", "torchrun_command", "launch", "main"]

MODELS = ("tiny-gpt2", "gpt2-random")
METHODS = ("lora", "full")
OTHER_RANKS_WAIT_S = 60  # on bad input under torchrun, how long ranks > 0 wait for torchrun to stop them


def parse_args(argv=None):
    p = Parser("python -m lora_course.distributed", prog="torchrun --nproc_per_node=N -m lora_course.distributed",
               description=__doc__.split("\n\n")[0])
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
    p.add_argument("--fsdp", action="store_true", help="FSDP1's error, FSDP2 fully_shard with LoRA, its traffic")
    p.add_argument("--out", default="runs/distributed.json", help="JSON record rank 0 writes")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def check(args, world_size: int) -> None:
    """Every check that needs no process group: raise UsageError with one line."""
    for m in args.methods or ["(none)"]:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; use lora, full or both (lora,full)")
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; use one of {', '.join(MODELS)}")
    check_at_least(steps=(args.steps, 1), batch_size=(args.batch_size, 1), r=(args.r, 1))
    if world_size < 1:
        raise UsageError(f"the world size (--nproc / --nproc_per_node) must be at least 1, got {world_size}")
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
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}
    run_kwargs = {"capture_output": True, "text": True, "env": env, **run_kwargs}
    return subprocess.run(torchrun_command(nproc, args), **run_kwargs)


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


def _launch_or_run(args, argv: list[str]) -> int:
    if args.nproc is not None:  # the launcher: check here, then run torchrun
        if "RANK" in os.environ:
            raise UsageError("--nproc launches torchrun; under torchrun leave it out")
        check(args, args.nproc)
        return launch(args.nproc, _without_nproc(argv), capture_output=False).returncode
    check(args, int(os.environ.get("WORLD_SIZE", "1")))
    record = run(args)
    if os.environ.get("RANK", "0") == "0":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    return 0


def _report_on_rank_0(err: UsageError) -> None:
    if os.environ.get("RANK", "0") == "0" or "TORCHELASTIC_RUN_ID" not in os.environ:
        print_error(err)
    else:  # under torchrun let rank 0 fail first: torchrun stops every worker at the first failure,
        time.sleep(OTHER_RANKS_WAIT_S)  # perhaps before rank 0 had printed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(_launch_or_run, parse_args(argv), argv, report=_report_on_rank_0)


if __name__ == "__main__":
    raise SystemExit(main())
