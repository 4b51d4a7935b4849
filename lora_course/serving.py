"""Many LoRA adapters on one base model: load by name, switch, mix in one batch, delete.

One frozen base model stays in memory; each adapter adds only its A and B (and DoRA's
magnitude) to the layers it targets. Three ways to serve:

    set_adapter("sql")                   every row uses one adapter, unmerged: base + s B A x
    merge_adapter()                      the active adapter folded into W: plain-model speed,
                                         until unmerge_adapter() takes it out again
    model(x, adapter_names=[...])        a mixed batch: row i uses adapter_names[i], or none
                                         ("__base__" or None, as in PEFT)

In a mixed batch each layer computes the base output for the whole batch once, then adds
each adapter's update to its own rows, so row i equals what a batch of that row alone,
with that adapter active, would give. Adapters are read in PEFT's format (`save_adapter`,
PEFT's `save_pretrained`); everything is checked before the model changes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .adapters import AdapterError, read_adapter, read_config
from .adapters import save_adapter as write_adapter
from .embedding import shared_weights
from .layers import is_adaptable, is_linear, replace_module
from .lora import LoRAConfig, LoRALinear, lora_layers, variant_class
from .measure import TIMERS, fastest_of_rounds, median_ms
from .merging import check_merge, merge_layer
from .validate import check_choice

__all__ = ["BASE", "mixed_rows", "MultiAdapterLinear", "MultiAdapterModel", "serving_latency", "mixed_batch_costs"]

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def mixed_rows(x: torch.Tensor, result: torch.Tensor, rows: Sequence, output) -> torch.Tensor:
    """A mixed batch: row i gets adapter rows[i] (None: the base output), each adapter run once on its rows.

    x (batch, ..., in) and result = base(x) (batch, ..., out); `output(name, x_rows,
    result_rows)` is one adapter's output for some rows. Each distinct adapter gathers its
    rows, computes once and scatters back, so the cost grows with the adapters in the batch,
    not with its rows. `result` is left as it was.
    """
    out = result.clone()
    for name in dict.fromkeys(rows):  # each adapter once, in order of first use
        if name is None:
            continue
        idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)  # its rows
        out[idx] = output(name, x[idx], result[idx])
    return out


class MultiAdapterLinear(nn.Module):
    """A frozen base layer holding any number of named adapters (plain LoRA or a variant such as DoRA).

    Each adapter is its tensors (`adapters[name]`: lora_A (r, in), lora_B (out, r), and a
    variant's own, e.g. DoRA's lora_magnitude_vector (out,)), its scaling and the LoRA layer
    class whose arithmetic it uses (`LoRALinear.output_of`, `merge_into`, `unmerge_from`,
    overridden by variants): the same code a single `LoRALinear` runs.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"{type(base_layer).__name__} is not a base layer LoRA can adapt")
        self.base_layer = base_layer.requires_grad_(False)
        self.adapters = nn.ModuleDict()  # name -> ParameterDict of its tensors
        self.scaling: dict[str, float] = {}
        self.kind: dict[str, type[LoRALinear]] = {}  # name -> the layer class whose arithmetic it uses
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.row_adapters: list | None = None  # per-row names while a mixed batch runs
        self.row_mixer = mixed_rows  # how a mixed batch reaches each row's adapter
        self._merge_state = None

    def add(self, name: str, tensors: dict[str, torch.Tensor], scaling: float, kind: type[LoRALinear]) -> None:
        """Hold adapter `name`: its tensors by name (lora_A, lora_B, ...), frozen, on the base layer's device."""
        device = next(self.base_layer.buffers(), None)
        device = device.device if device is not None else next(self.base_layer.parameters()).device
        self.adapters[name] = nn.ParameterDict({k: nn.Parameter(t.to(device).clone(), requires_grad=False)
                                                for k, t in tensors.items()})
        self.scaling[name], self.kind[name] = scaling, kind

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self.scaling.pop(name, None)
        self.kind.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.adapters[name].items())

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter `name`'s dW = scaling * B A, (out, in)."""
        return self.kind[name].delta_of(self.tensors(name), self.scaling[name])

    def _output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self.kind[name].output_of(self.base_layer, x, result, self.tensors(name), self.scaling[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, ..., in)
        result = self.base_layer(x)  # (batch, ..., out): once for the whole batch
        rows = self.row_adapters
        if rows is not None:
            if len(rows) != x.shape[0]:
                raise ValueError(f"the mixed batch names {len(rows)} rows' adapters but the input has {x.shape[0]} "
                                 "rows; give one name (or None) per row")
            # an adapter that skips this layer leaves its rows at the base output
            return self.row_mixer(x, result, [n if n in self.scaling else None for n in rows], self._output)
        name = self.active_adapter
        if name is None or name == self.merged_adapter or name not in self.scaling:
            return result
        return self._output(name, x, result)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.scaling:
            return
        self._merge_state = self.kind[name].merge_into(self.base_layer, self.tensors(name), self.scaling[name])
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        name = self.merged_adapter
        if name is None:
            return
        self.kind[name].unmerge_from(self.base_layer, self.tensors(name), self.scaling[name], self._merge_state)
        self.merged_adapter, self._merge_state = None, None

    def extra_repr(self) -> str:
        return f"adapters={list(self.scaling)}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class MultiAdapterModel(nn.Module):
    """One frozen base model serving many named PEFT-format adapters.

    `server = MultiAdapterModel(model)`; `server.load_adapter(folder, "sql")`;
    `server.set_adapter("sql")` or `server(input_ids, adapter_names=["sql", None, "chat"])`;
    `server.delete_adapter("sql")`. `model` must not carry LoRA layers of its own.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if lora_layers(model):
            raise ValueError("this model already carries LoRA layers; serve a plain base model "
                             "(save the adapter with save_adapter, then load it here by name)")
        self.model = model.requires_grad_(False)
        self.adapter_configs: dict[str, dict] = {}
        self._active: str | None = None
        self.row_mixer = mixed_rows  # fn(x, result, rows, output): how every layer serves a mixed batch

    # ------------------------------------------------------------------ what is loaded
    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def merged_adapter(self) -> str | None:
        merged = {m.merged_adapter for m in self.layers().values()} - {None}
        return merged.pop() if merged else None

    def layers(self) -> dict[str, MultiAdapterLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiAdapterLinear)}

    def _check_name(self, name, allow_base: bool = False) -> str | None:
        if allow_base and name in (None, BASE):
            return None
        if name not in self.adapter_configs:
            extra = " (or None / '__base__' for the base model)" if allow_base else ""
            raise KeyError(f"no adapter named {name!r}; loaded adapters: {self.adapters}{extra}")
        return name

    def _check_new_name(self, adapter_name) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots, not {BASE!r}; "
                             f"got {adapter_name!r}")
        if adapter_name in self.adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; delete_adapter() it first "
                             "or choose another name")
        if hasattr(nn.ModuleDict(), adapter_name):  # each layer holds its adapters in a ModuleDict, by name
            raise ValueError(f"adapter_name {adapter_name!r} is the name of a torch Module method; choose another")

    # ------------------------------------------------------------------ loading and deleting
    def load_adapter(self, path, adapter_name: str) -> str:
        """Read a PEFT-format adapter folder and add it under `adapter_name`; the active adapter is not changed.

        Every check (config, keys, shapes, values) runs before the model changes. Served here is LoRA
        on linear layers whose weight no other module holds: an adapter with LoRA on an embedding or
        a tied head, or with modules_to_save, is refused (AdapterError); load_adapter takes it into one model.
        """
        self._check_new_name(adapter_name)
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged; unmerge_adapter() before loading another")
        if read_config(path).get("modules_to_save"):
            raise AdapterError("this adapter trains modules in full (modules_to_save), which a shared base cannot "
                               "serve; load it into one model with lora_course.load_adapter")
        plan = read_adapter(path, self.model, include=lambda m: isinstance(m, MultiAdapterLinear) or is_adaptable(m))
        tied = shared_weights(self.model)
        unserved = [layer.name for layer in plan.layers if layer.name in tied or f"{layer.name}.base_layer" in tied
                    or not is_linear(getattr(layer.module, "base_layer", layer.module))]
        if unserved:
            raise AdapterError(f"this adapter has LoRA on {unserved[0]}, an embedding or a weight another module holds "
                               "(a tied head), which serving does not hold; load it into one model with load_adapter")
        if plan.init_lora_weights == "pissa":
            raise AdapterError("this is a PiSSA adapter: it only works on its own residual base, not on a base "
                               "shared with other adapters. Convert it first with pissa.save_pissa_as_lora "
                               "(a rank-2r LoRA on the original weights)")
        kind = variant_class(LoRAConfig(use_dora=plan.use_dora))
        for layer in plan.layers:  # every check passed: now change the model
            module = layer.module
            if not isinstance(module, MultiAdapterLinear):
                module = MultiAdapterLinear(module)
                replace_module(self.model, layer.name, module)
            module.add(adapter_name, layer.tensors, layer.scaling, kind)
        self.adapter_configs[adapter_name] = plan.config
        return adapter_name

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total",
                             generator: torch.Generator | None = None) -> str:
        """Add `adapter_name`: `adapters` merged with `weights` by `combination_type`, with PEFT's names and
        meanings ("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", ...: see lora_course.merging).

        The new adapter has scaling 1 and serves like a loaded one (set_adapter, merge_adapter, mixed
        batches, save_adapter). Every check runs before the model changes. Unlike PEFT, a taken name
        raises instead of doing nothing, and an rsLoRA source is merged at its own scale (PEFT keeps
        the first source's use_rslora, which multiplies the merged update by sqrt(r)).
        """
        self._check_new_name(adapter_name)
        adapters = list(adapters)
        for name in adapters:
            self._check_name(name)
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"an adapter appears twice in {adapters}; name each once")
        layers = {n: m for n, m in self.layers().items() if any(a in m.scaling for a in adapters)}
        dora = sorted({a for m in layers.values() for a in adapters if m.kind.get(a, LoRALinear) is not LoRALinear})
        if dora:
            raise ValueError(f"{dora} are not plain LoRA (DoRA's magnitude has no merge here); merge plain adapters")
        ranks = {a: {n: m.adapters[a]["lora_A"].shape[0] for n, m in layers.items() if a in m.scaling}
                 for a in adapters}
        combination_type, rank = check_merge(ranks, list(weights), combination_type, svd_rank, density,
                                             majority_sign_method)
        merged = {}
        for n, m in layers.items():
            mine = [(a, w) for a, w in zip(adapters, weights) if a in m.scaling]
            factors = [(m.adapters[a]["lora_A"], m.adapters[a]["lora_B"], m.scaling[a]) for a, _ in mine]
            merged[n] = merge_layer(factors, [w for _, w in mine], combination_type, rank, density,
                                    majority_sign_method, generator)  # A (rank, in), B (out, rank)
        for n, (A, B) in merged.items():  # every check passed: now change the model
            layers[n].add(adapter_name, {"lora_A": A, "lora_B": B}, 1.0, LoRALinear)
        self.adapter_configs[adapter_name] = {**self.adapter_configs[adapters[0]], "r": rank, "lora_alpha": rank,
                                              "use_rslora": False, "use_dora": False, "target_modules": sorted(layers),
                                              "rank_pattern": {}, "alpha_pattern": {}}
        return adapter_name

    def save_adapter(self, adapter_name: str, path, base_model_name_or_path: str | None = None):
        """Write adapter `adapter_name` as a PEFT-format folder (what lora_course.save_adapter writes).

        For the moment of saving, the layers holding it become single LoRA layers on the same base
        weights, so the one writer of PEFT's format (lora_course.adapters) writes them; then they are put back.
        """
        self._check_name(adapter_name)
        config = self.adapter_configs[adapter_name]
        rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
        swapped = {}
        try:
            with torch.random.fork_rng(devices=[]):  # building a LoRA layer draws its init: leave the seed alone
                for n, m in self.layers().items():
                    if adapter_name not in m.scaling:
                        continue
                    tensors = m.tensors(adapter_name)
                    r = tensors["lora_A"].shape[0]
                    alpha = m.scaling[adapter_name] * (math.sqrt(r) if rslora else r)
                    alpha = round(alpha) if math.isclose(alpha, round(alpha), rel_tol=1e-9) else alpha
                    single = LoRALinear.from_linear(m.base_layer, r=r, lora_alpha=alpha, use_rslora=rslora,
                                                    use_dora=dora)
                    single.set_tensors(single.from_peft_tensors(tensors))
                    replace_module(self.model, n, single)
                    swapped[n] = m
            return write_adapter(self.model, path, base_model_name_or_path)
        finally:
            for n, m in swapped.items():
                replace_module(self.model, n, m)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop an adapter's tensors; layers left with no adapter get their plain base layer back."""
        self._check_name(adapter_name)
        if self.merged_adapter == adapter_name:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for name, layer in self.layers().items():
            layer.remove(adapter_name)
            if not layer.scaling:
                replace_module(self.model, name, layer.base_layer)
        del self.adapter_configs[adapter_name]
        if self._active == adapter_name:
            self._active = None

    # ------------------------------------------------------------------ choosing what runs
    def set_adapter(self, adapter_name: str | None) -> None:
        """Make `adapter_name` (None or "__base__": the plain base) the adapter every row uses."""
        name = self._check_name(adapter_name, allow_base=True)
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge_adapter()
        for layer in self.layers().values():
            layer.active_adapter = name
        self._active = name

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (plain-model speed); unmerge_adapter() undoes it."""
        if self._active is None:
            raise RuntimeError("no active adapter to merge; set_adapter(name) first")
        if self.merged_adapter is None:
            for layer in self.layers().values():
                layer.merge(self._active)

    def unmerge_adapter(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()

    def mixed_batch(self, adapter_names: Sequence):
        """A context in which every forward runs row i with `adapter_names[i]` (None or "__base__": no adapter).

        `with server.mixed_batch(["sql", None]): data.generate(server, tokenizer, records)` serves
        any code that calls the model; `server(x, adapter_names=...)` is the one-call form.
        """
        return self._rows(adapter_names, None)

    @contextmanager
    def _rows(self, adapter_names: Sequence | None, batch_size: int | None):
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        if batch_size is not None and len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows; "
                             "give one name (or None) per row")
        for n in names:
            self._check_name(n, allow_base=True)
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weights; "
                               "unmerge_adapter() before running a mixed batch")
        rows = [None if n == BASE else n for n in names]
        layers = list(self.layers().values())
        for layer in layers:
            layer.row_adapters, layer.row_mixer = rows, self.row_mixer
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    @staticmethod
    def _batch_size(args, kwargs) -> int | None:
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        return len(first) if first is not None else None

    def forward(self, *args, adapter_names: Sequence | None = None, **kwargs):
        with self._rows(adapter_names, self._batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, adapter_names: Sequence | None = None, **kwargs):
        """`model.generate`, with one adapter name per row if `adapter_names` is given (greedy or sampling)."""
        with self._rows(adapter_names, self._batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)


def serving_latency(server: MultiAdapterModel, prompt: torch.Tensor, adapter: str, mixed_names: Sequence,
                    max_new_tokens: int = 16, rounds: int = 3, min_run_time: float = 0.1) -> dict[str, float]:
    """Milliseconds per generated token (one decoding step of the whole batch), greedy, for:

    "base" (no adapter), "merged" (`adapter` folded into W), "unmerged" (`adapter` beside W),
    "mixed" (row i uses `mixed_names[i]`), each the fastest of `rounds` interleaved rounds
    (`measure.fastest_of_rounds`). The server's active adapter is restored.
    """
    server._check_name(adapter)
    before = server.active_adapter
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))

    def timed(switch, names=None):  # put the server in the mode, then ms per generated token
        def timing() -> float:
            switch()
            return median_ms(lambda: server.generate(prompt, adapter_names=names, **kw), min_run_time) / max_new_tokens
        return timing

    server.eval()
    try:  # each round: base, unmerged, merged, mixed, in that order (each mode switches from the one before)
        ms = fastest_of_rounds({"base": timed(lambda: server.set_adapter(None)),
                                "unmerged": timed(lambda: server.set_adapter(adapter)),
                                "merged": timed(server.merge_adapter),
                                "mixed": timed(server.unmerge_adapter, list(mixed_names))}, rounds)
    finally:
        server.unmerge_adapter()
        server.set_adapter(before)
    return {mode: ms[mode] for mode in ("base", "merged", "unmerged", "mixed")}


def mixed_batch_costs(server: MultiAdapterModel, input_ids: torch.Tensor, batches_of_names: dict[str, Sequence],
                      rounds: int = 3, min_run_time: float = 0.1, timer: str = "wall") -> dict[str, dict[str, float]]:
    """For each mixed batch (label -> one adapter name per row): adapter calls per layer in one forward, counted;
    ms per forward; and "adapter ms", its adapters' part: every layer's mixer (`server.row_mixer`, gathers and
    scatters included) re-run alone on the inputs it got in that forward, without the base layers, whose work is
    the same for every batch. Times are `measure.median_ms` by `timer` ("wall" or "cpu", this thread's CPU time),
    each the fastest of `rounds` interleaved rounds (`measure.fastest_of_rounds`)."""
    check_choice("timer", timer, TIMERS)
    server_mixer, seen = server.row_mixer, []

    def recording(x, result, rows, output):  # one layer's mixer call: its inputs and the adapters it ran
        called = []
        out = server_mixer(x, result, rows, lambda *a: called.append(a[0]) or output(*a))
        seen.append(((x, result, rows, output), called))
        return out

    n_layers, mixer_inputs, per_layer = len(server.layers()), {}, {}
    server.row_mixer = recording
    try:
        with torch.no_grad():
            for label, names in batches_of_names.items():
                seen.clear()
                server(input_ids, adapter_names=list(names))
                mixer_inputs[label] = [args for args, _ in seen]
                per_layer[label] = sum(len(called) for _, called in seen) / n_layers
    finally:
        server.row_mixer = server_mixer

    def costs(names, inputs):  # (ms per forward, ms of it in the adapters)
        with torch.no_grad():
            return (median_ms(lambda: server(input_ids, adapter_names=list(names)), min_run_time, timer),
                    median_ms(lambda: [server_mixer(*args) for args in inputs], min_run_time, timer))

    ms = fastest_of_rounds({label: lambda names=names, inputs=mixer_inputs[label]: costs(names, inputs)
                            for label, names in batches_of_names.items()}, rounds)
    return {k: {"calls per layer": per_layer[k], "ms": ms[k][0], "adapter ms": ms[k][1]} for k in batches_of_names}
