"""Measuring what code really costs: wall-clock or CPU time, and peak memory, on the path that runs.

Time: medians of repeated runs (`torch.utils.benchmark`), which handle warm-up and threads;
`timer="cpu"` counts this thread's CPU time instead, which a busy machine disturbs less.
Compare ratios measured in one run, never absolute numbers across runs. Where the package
compares variants it times them in interleaved rounds and keeps each one's fastest round
(`fastest_of_rounds`): load on a shared machine only ever adds time.

Memory: `peak_memory(fn)` measures what a piece of code allocates, on CUDA with the caching
allocator's peak counter and on CPU by tracking every allocation the CPU allocator reports
to the PyTorch profiler (see its docstring for why); `training_step_memory` splits a
training step into what is held between steps and the step's peak above it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import benchmark

from .validate import check_choice, check_int

__all__ = ["median_ms", "wall_and_cpu_ms", "fastest_of_rounds", "generation_ms", "peak_memory", "PeakMemory",
           "StepMemory", "resident_bytes", "training_step_memory", "optimizer_state_bytes", "TIMERS"]

# the clocks median_ms can time by: the wall clock, or this thread's CPU time
TIMERS = {"wall": time.perf_counter, "cpu": time.thread_time}


def median_ms(fn: Callable[[], object], min_run_time: float = 0.2, timer: str = "wall") -> float:
    """Median milliseconds of `fn()`, repeated for at least `min_run_time` seconds (CUDA synchronised).

    `timer="cpu"` measures this thread's CPU time (CPU work only), which other processes on a
    shared machine disturb far less than the wall clock.
    """
    check_choice("timer", timer, TIMERS)
    if torch.cuda.is_available():
        fn()
        torch.cuda.synchronize()
        stmt = "fn(); torch.cuda.synchronize()"
    else:
        stmt = "fn()"
    timer = benchmark.Timer(stmt=stmt, globals={"fn": fn, "torch": torch}, timer=TIMERS[timer])
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def wall_and_cpu_ms(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[float, float]:
    """Milliseconds of one call `fn()`: wall clock (CUDA synchronised on both sides when `device` is CUDA) and
    this process's CPU time, which other processes on a busy machine disturb far less. CPU time counts every
    thread, idle spinning included: on one thread (`runtime.num_threads(1)`) it is the call's own work."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - wall), 1e3 * (time.process_time() - cpu)


def fastest_of_rounds(timings: dict[str, Callable[[], float | tuple[float, ...]]], rounds: int
                      ) -> dict[str, float | tuple[float, ...]]:
    """Call every timing once per round, in order, for `rounds` rounds; keep each one's fastest round.

    Interleaving exposes every variant to the same changes in a shared machine's load, and load
    only ever adds time, so the least-disturbed round is the best estimate. A timing returns a
    number, or a tuple of numbers (e.g. wall and CPU time) whose fastest is kept element by element.
    """
    check_int("rounds", rounds, minimum=1)
    seen: dict[str, list] = {name: [] for name in timings}
    for _ in range(rounds):
        for name, timing in timings.items():
            seen[name].append(timing())
    return {name: tuple(map(min, zip(*v))) if isinstance(v[0], tuple) else min(v) for name, v in seen.items()}


def generation_ms(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int = 16,
                  min_run_time: float = 0.2) -> tuple[float, torch.Tensor]:
    """Median milliseconds of greedy `model.generate(prompt)`, and the tokens it generated.

    Sampling is off and exactly `max_new_tokens` are generated, so every repeat does the
    same work.
    """
    def generate():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=0)

    model.eval()
    tokens = generate()
    return median_ms(generate, min_run_time), tokens


# --------------------------------------------------------------------------- memory

# Lines the profiler's C++ side writes to stderr while we measure: Kineto's time-stamped
# start/stop notices, its failed GPU count on a CUDA build of torch with no GPU driver
# (torch 2.14's profiler asks on stop; we profile the CPU only), and the CPU allocator's note
# that a block allocated before profiling was freed (expected: see peak_memory). Everything
# else written to stderr is passed on.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "gpuGetDeviceCount failed", "Memory block of unknown size",
                   "daemon config loader", "IpcFabricConfigClient")


@contextlib.contextmanager
def _filtered_stderr_fd():
    """Capture C-level stderr (fd 2) and re-emit it, minus the profiler's own notices."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (some embedded consoles)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not any(n in line for n in _PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))


class PeakMemory:
    """Peak bytes allocated between `start()` and `stop()`, above what was allocated at the start.

    The measurement behind `peak_memory`, split in two for code that cannot wrap the work in
    one function (e.g. a training loop's callbacks). CUDA: the caching allocator's peak
    counter. CPU: the PyTorch profiler's allocation events (see `peak_memory`).
    """

    def __init__(self, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"peak_memory measures 'cuda' or 'cpu', got {self.device.type!r}; "
                "on Apple MPS run the measurement on the CPU (device='cpu')"
            )
        self._started = False

    def start(self) -> "PeakMemory":
        if self._started:
            raise RuntimeError("this PeakMemory is already measuring; stop() it first")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._stderr = _filtered_stderr_fd()
            self._stderr.__enter__()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.start()
        self._started = True
        return self

    def stop(self) -> int:
        """End the measurement and return the peak bytes."""
        if not self._started:
            raise RuntimeError("this PeakMemory was not started; call start() first")
        self._started = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_allocated(self.device) - self._base, 0)
        from torch.autograd import DeviceType

        try:
            self._profiler.stop()
        finally:
            self._stderr.__exit__(None, None, None)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak


def peak_memory(fn: Callable[[], Any], device=None) -> tuple[Any, int]:
    """Run `fn()` and return `(its result, peak bytes allocated during it above the start)`.

    `device=None` measures CUDA when it is available, else the CPU.

    CUDA: `torch.cuda.reset_peak_memory_stats` then `max_memory_allocated` minus what was
    allocated at the start: the caching allocator's own count of live tensor bytes.

    CPU: the PyTorch profiler with `profile_memory=True`. PyTorch's CPU allocator reports
    every allocation and free (with its size) to the profiler, so summing those events in
    time order gives the live bytes after each one, and their maximum is the peak. We
    chose it because it sees *all* tensor memory (autograd's saved activations,
    gradients, optimizer state, temporaries inside kernels) at the allocator itself.
    Process RSS would include Python, libraries and freed-but-cached pages; a
    TorchDispatchMode sees operator outputs but not when their storage dies or views
    share it. Blocks allocated before `fn` and freed inside it are not reported (the
    allocator never told the profiler their size), so their release is not subtracted:
    for an exact CPU figure, let `fn` create what it frees (e.g. build the model and the
    optimizer inside it, or call `zero_grad(set_to_none=True)` before measuring).
    """
    tracker = PeakMemory(device).start()
    try:
        result = fn()
    finally:
        peak = tracker.stop()
    return result, peak


@dataclass(frozen=True)
class StepMemory:
    """What training holds, measured: `resident` bytes kept between steps (weights, buffers and the optimizer's
    state) and `step_peak`, the most one training step allocates above them (activations, gradients,
    temporaries such as a dequantized weight). `total` is the training footprint."""

    resident: int
    step_peak: int

    @property
    def total(self) -> int:
        return self.resident + self.step_peak


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the model's parameters and buffers (each storage once: tied weights count once; 4-bit codes are
    buffers), plus the optimizer's state."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) + (optimizer_state_bytes(optimizer) if optimizer is not None else 0)


def training_step_memory(model: torch.nn.Module, step: Callable[[], Any], optimizer: torch.optim.Optimizer,
                         device=None) -> StepMemory:
    """Run `step()` (one forward, backward and optimizer step that ends in `zero_grad(set_to_none=True)`) once so
    the optimizer's state exists, then measure a second step with `peak_memory`."""
    step()
    optimizer.zero_grad(set_to_none=True)
    _, peak = peak_memory(step, device=device)
    return StepMemory(resident_bytes(model, optimizer), peak)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in `optimizer.state` tensors, measured (AdamW: exp_avg, exp_avg_sq, step).

    Optimizers create their state lazily, so this is 0 before the first `step()`. Sharded
    state (FSDP2's DTensors) counts this process's shard only.
    """
    if not isinstance(getattr(optimizer, "state", None), dict):
        raise TypeError(f"expected a torch.optim.Optimizer (something with a .state dict), "
                        f"got {type(optimizer).__name__}")
    return sum(
        _local(t).numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t
