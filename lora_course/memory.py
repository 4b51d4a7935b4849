"""Memory arithmetic of fine-tuning: what full fine-tuning and LoRA cost, predicted (measured by `measure`).

Training memory has four parts (Rajbhandari et al., "ZeRO", 2019, arXiv:1910.02054, section 3.1):

    weights      every parameter, in the training precision                 P x bytes(precision)
    gradients    one per *trainable* parameter, same precision              T x bytes(precision)
    optimizer    AdamW keeps two moments per trainable parameter (fp32)     T x 2 x 4
    master       mixed precision keeps an fp32 copy of trainable weights    T x 4   (optional)
    activations  what autograd saves for the backward pass (depends on batch and sequence)

LoRA shrinks T from P to a few million, so gradients and optimizer state all but vanish;
the frozen weights and the activations remain.

The predictions are here; what a step really allocates is measured by `lora_course.measure`
(`peak_memory`, `training_step_memory`), and `lora_course.train.measure_training_peak`
measures a few AdamW steps of a model built inside the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .validate import check_choice, check_int

__all__ = [
    "DTYPE_BYTES",
    "OPTIMIZER_STATES",
    "MemoryBudget",
    "dtype_bytes",
    "training_budget",
    "gpt2_activation_bytes",
    "gpt2_training_budget",
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
    check_choice("unit", unit, scale)
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

