"""Memory arithmetic of fine-tuning: what full fine-tuning and LoRA cost, predicted and measured.

Training memory has four parts (Rajbhandari et al., "ZeRO", 2019, arXiv:1910.02054, section 3.1):

    weights      every parameter, in the training precision                 P x bytes(precision)
    gradients    one per *trainable* parameter, same precision              T x bytes(precision)
    optimizer    AdamW keeps two moments per trainable parameter (fp32)     T x 2 x 4
    master       mixed precision keeps an fp32 copy of trainable weights    T x 4   (optional)
    activations  what autograd saves for the backward pass (depends on batch and sequence)

LoRA shrinks T from P to a few million, so gradients and optimizer state all but vanish;
the frozen weights and the activations remain.

`peak_memory(fn)` measures what a piece of code really allocates, on CUDA with the caching
allocator's peak counter and on CPU by tracking every allocation the CPU allocator reports
to the PyTorch profiler (see its docstring for why). `measure_training_peak` applies it
to a few AdamW steps of a model built inside the measurement (`train_steps`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from .validate import check_int

__all__ = [
    "DTYPE_BYTES",
    "OPTIMIZER_STATES",
    "MemoryBudget",
    "dtype_bytes",
    "training_budget",
    "gpt2_activation_bytes",
    "gpt2_training_budget",
    "peak_memory",
    "PeakMemory",
    "optimizer_state_bytes",
    "StepMemory",
    "resident_bytes",
    "training_step_memory",
    "train_steps",
    "measure_training_peak",
    "format_bytes",
    "lora_trainable_params",
    "compare_budgets",
]

# Bytes per element of the precisions a learner meets.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_DTYPE_ALIASES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}

# Optimizer state tensors per trainable parameter.
OPTIMIZER_STATES = {
    "adamw": 2,          # exp_avg (m) and exp_avg_sq (v)
    "adam": 2,
    "sgd": 0,            # plain SGD keeps nothing
    "sgd_momentum": 1,   # one momentum buffer
}


def _precision_name(precision) -> str:
    name = _DTYPE_ALIASES.get(precision, precision)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown precision {precision!r}; use one of {sorted(DTYPE_BYTES)} (or a torch dtype)")
    return name


def dtype_bytes(precision) -> int:
    """Bytes per element: `dtype_bytes("bf16") == 2`; accepts torch dtypes too."""
    return DTYPE_BYTES[_precision_name(precision)]


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes of each part of a training step's memory; `total` is their sum."""

    weights: int
    gradients: int
    optimizer: int
    master_weights: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        """The budget as the lesson card adds it: every part held at once."""
        return self.weights + self.gradients + self.optimizer + self.master_weights + self.activations

    @property
    def peak(self) -> int:
        """The predicted peak of a training step (after the first, once optimizer state exists).

        Backward frees each layer's saved activations as it creates that layer's weight
        gradients, so the two overlap in time instead of adding up: the peak is near
        weights + optimizer state + master weights + max(activations, gradients).
        """
        return self.weights + self.optimizer + self.master_weights + max(self.activations, self.gradients)

    def parts(self) -> dict[str, int]:
        """The non-zero parts by name, in order (for bars and tables)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def summary(self, unit: str = "GB") -> str:
        """One line, e.g. `weights 14.0 + gradients 14.0 + optimizer 56.0 = 84.0 GB`."""
        parts = " + ".join(f"{k} {format_bytes(v, unit, suffix=False)}" for k, v in self.parts().items())
        return f"{parts} = {format_bytes(self.total, unit)}"


def format_bytes(n: int | float, unit: str = "GB", suffix: bool = True) -> str:
    """Bytes in decimal units (GB = 1e9, as the lesson card counts) or binary (GiB = 2**30)."""
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    if unit not in scale:
        raise ValueError(f"unit must be one of {list(scale)}, got {unit!r}")
    value = f"{n / scale[unit]:.1f}"
    return f"{value} {unit}" if suffix else value


def training_budget(
    n_params: int,
    n_trainable: int | None = None,
    *,
    precision="fp16",
    optimizer: str = "adamw",
    optimizer_precision="fp32",
    master_weights: bool = False,
    activations: int = 0,
) -> MemoryBudget:
    """Bytes to train a model of `n_params` parameters of which `n_trainable` learn.

    `n_trainable=None` means full fine-tuning (every parameter trains). Weights and
    gradients are held in `precision`; optimizer moments in `optimizer_precision` (fp32,
    as PyTorch keeps them for fp32 master weights and as the lesson card counts: AdamW =
    2 x 4 = 8 bytes per trainable parameter). `master_weights=True` adds the fp32 copy
    of the trainable weights that mixed-precision training updates (none if already fp32).
    `activations` (bytes) is added as given: see `gpt2_activation_bytes`.
    """
    if n_trainable is None:
        n_trainable = n_params
    if n_params < 0 or n_trainable < 0 or n_trainable > n_params:
        raise ValueError(f"need 0 <= n_trainable <= n_params, got n_trainable={n_trainable}, n_params={n_params}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATES)}")
    w = dtype_bytes(precision)
    master = n_trainable * 4 if master_weights and _precision_name(precision) != "fp32" else 0
    return MemoryBudget(
        weights=n_params * w,
        gradients=n_trainable * w,
        optimizer=n_trainable * OPTIMIZER_STATES[optimizer] * dtype_bytes(optimizer_precision),
        master_weights=master,
        activations=int(activations),
    )


def lora_trainable_params(d_model: int, n_layers: int, r: int, n_targets: int = 2) -> int:
    """LoRA parameters for `n_targets` square d x d projections per layer (q, v: 2): r (d + d) each."""
    for name, v in {"d_model": d_model, "n_layers": n_layers, "r": r, "n_targets": n_targets}.items():
        check_int(name, v, minimum=1)
    return n_layers * n_targets * r * (d_model + d_model)


def compare_budgets(
    n_params: int,
    d_model: int,
    n_layers: int,
    r: int = 8,
    n_targets: int = 2,
    precision="fp16",
    optimizer: str = "adamw",
    master_weights: bool = False,
) -> dict:
    """Full fine-tuning vs LoRA budgets for one model (activations left out: they depend on the batch).

    Returns {"full": MemoryBudget, "lora": MemoryBudget, "trainable": LoRA parameter count,
    "saving": full.total / lora.total}. The memory widget draws these; tests call it directly.
    """
    trainable = lora_trainable_params(d_model, n_layers, r, n_targets)
    full = training_budget(n_params, precision=precision, optimizer=optimizer, master_weights=master_weights)
    lora = training_budget(n_params + trainable, trainable, precision=precision, optimizer=optimizer,
                           master_weights=master_weights)
    return {"full": full, "lora": lora, "trainable": trainable, "saving": full.total / lora.total}


# --------------------------------------------------------------------------- activations

# What one GPT-2 block saves for backward, in elements per token (d = n_embd), counted with
# torch.autograd.graph.saved_tensors_hooks on transformers' GPT-2 (SDPA attention, dropout 0):
_BLOCK_SAVED_ALWAYS = {
    "attention": 6,    # q, k, v and the attention output (also attn.c_proj's input): no T x T matrix with SDPA
    "layer_norms": 2,  # ln_1 and ln_2 inputs (their mean and 1/std add 4 numbers per token)
    "gelu": 16,        # gelu_new is tanh-based elementwise maths: x, tanh(.), 0.5 x, 1 + tanh(.), each 4 d
}
# A linear layer saves its input only to compute its own weight gradient: full fine-tuning
# saves all of these; LoRA saves the input of an adapted layer (and the r-dim A x) only.
# (attn.c_proj's input is counted above, with the attention.)
_LINEAR_INPUTS = {"attn.c_attn": 1, "attn.c_proj": 0, "mlp.c_fc": 1, "mlp.c_proj": 4}


def gpt2_activation_bytes(
    config,
    batch_size: int,
    seq_len: int,
    *,
    lora_targets=None,
    lora_r: int = 8,
    precision="fp32",
) -> int:
    """Estimate the activation memory of one GPT-2 training step, in bytes.

    Per token (N = batch_size * seq_len tokens) and per block, autograd keeps:
    attention 6 d, layer-norm inputs 2 d, GELU internals 16 d, and the input of every
    linear layer whose *weight* trains (c_attn d, c_fc d, MLP c_proj 4 d). Full
    fine-tuning (`lora_targets=None`) therefore keeps 30 d per block; LoRA on c_attn only
    keeps 24 d + d + r: frozen layers need no input for a weight gradient. The LM head
    adds the final layer norm (2 d) and 3 V: the saved log-softmax output plus, at the
    start of backward, the loss's and the logits' gradients, which are live together.
    `lora_targets` takes GPT-2 names (`"c_attn"`, `"c_proj"`, `"attn.c_proj"`,
    `"mlp.c_proj"`, `"c_fc"`).

    Counted for SDPA attention (transformers' default) in eager PyTorch. GPT-2's default
    dropout (0.1) adds about 1% (boolean masks); `attn_implementation="eager"` would add
    the T x T attention scores per head, which this estimate leaves out.
    """
    d = config.n_embd
    if lora_targets is None:  # full fine-tuning: every linear layer's input is saved
        linear = sum(_LINEAR_INPUTS.values()) * d
    else:
        names = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets)
        linear = 0
        for name in names:
            matched = [k for k in _LINEAR_INPUTS if k == name or k.endswith("." + name)]
            if not matched:
                raise ValueError(f"unknown GPT-2 target {name!r}; use some of {list(_LINEAR_INPUTS)}")
            linear += sum(_LINEAR_INPUTS[k] * d + lora_r for k in matched)  # input (shared) + A x (r)
    per_block = sum(_BLOCK_SAVED_ALWAYS.values()) * d + linear
    return _activation_total(per_block, config, batch_size, seq_len, precision)


def _activation_total(per_block: int, config, batch_size: int, seq_len: int, precision) -> int:
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    per_token = L * per_block + 2 * d + 3 * V
    return int(dtype_bytes(precision) * batch_size * seq_len * per_token)


def gpt2_training_budget(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    optimizer: str = "adamw",
    precision="fp32",
) -> MemoryBudget:
    """The calculator applied to a built GPT-2 (`GPT2LMHeadModel`), with or without LoRA.

    Counts parameters (tied embeddings once), finds LoRA layers to decide which
    activation estimate applies, and returns weights + gradients + optimizer + activations.
    """
    from .lora import count_parameters, lora_layers

    trainable, total = count_parameters(model)
    layers = lora_layers(model)
    targets = sorted({".".join(n.split(".")[-2:]) for n in layers}) if layers else None
    r = next(iter(layers.values())).r if layers else 8
    acts = gpt2_activation_bytes(model.config, batch_size, seq_len, lora_targets=targets, lora_r=r, precision=precision)
    return training_budget(total, trainable, precision=precision, optimizer=optimizer, activations=acts)


# --------------------------------------------------------------------------- measurement

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


def train_steps(model: torch.nn.Module, steps: int = 3, *, batch_size: int = 4, seq_len: int = 32,
                lr: float = 1e-4, seed: int = 0) -> float:
    """AdamW on the trainable parameters, `steps` steps on one fixed random batch of token ids.

    Enough to measure a training step's memory, or to move every LoRA B away from zero.
    `model` is a causal LM taking `input_ids` and `labels` (e.g. `GPT2LMHeadModel`); the
    batch (batch_size, seq_len) comes from a generator seeded with `seed`. The model is
    left in eval mode; returns the last step's loss.
    """
    check_int("steps", steps, minimum=1)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add_lora(model, ...) or unfreeze some first")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g).to(params[0].device)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def measure_training_peak(build: Callable[[], torch.nn.Module], steps: int = 3, *, batch_size: int = 4,
                          seq_len: int = 32, lr: float = 1e-4, device="cpu") -> tuple[torch.nn.Module, int]:
    """Build a model with `build()` and `train_steps` it, all inside `peak_memory`: (model, peak bytes).

    Building inside the measurement lets the CPU count see every byte the step frees (see
    `peak_memory`), so the figure is the whole training step: weights, gradients, AdamW
    state and activations. Compare it with `gpt2_training_budget(model, ...).peak`.
    """
    def run():
        model = build().to(device)
        train_steps(model, steps, batch_size=batch_size, seq_len=seq_len, lr=lr)
        return model

    return peak_memory(run, device=device)


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
