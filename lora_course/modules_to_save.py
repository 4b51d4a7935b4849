"""`modules_to_save`: modules trained and saved in full, beside LoRA (PEFT's semantics and keys).

PEFT's `ModulesToSaveWrapper`: the original module, frozen, stays at `original_module`; a
trainable copy at `modules_to_save` runs in its place and is saved in full under the module's
own keys (`base_model.model.transformer.wte.weight`, not `.modules_to_save.`). A module is named
as in PEFT: its full name ends with the given name (`"wte"` picks `transformer.wte`).

A copy of a tied weight (GPT-2's `wte`, which `lm_head` holds too) is one copy, held by both,
when `ensure_weight_tying` (our default; PEFT's `modules_to_tie`); else only the named module is
copied and the other keeps the frozen original. Loading (`plan_saved`) also checks the parts of an
adapter file beyond its LoRA tensors: trained copies, tied heads, the embedding weights PEFT saves.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import LoRAConfig, register_model_step
from .embedding import TiedLoRAHead, adapted_prefixes, shared_weights, tie_adapters, tie_group, tie_repr
from .layers import replace_module
from .lora import LoRALinear

__all__ = ["ModulesToSaveWrapper", "saved_modules", "adapter_state_of_saved", "saved_names", "SavedPlan",
           "plan_saved"]


class ModulesToSaveWrapper(nn.Module):
    """PEFT's wrapper for a module in `modules_to_save`: `original_module` frozen, a trainable copy
    `modules_to_save` run in its place and saved in full. `tied_to=(wrapper, name)`: this module (a
    head) holds that wrapper's trained copy of their shared weight, so one copy is trained."""

    def __init__(self, module: nn.Module, tied_to: tuple[ModulesToSaveWrapper, str] | None = None):
        super().__init__()
        if isinstance(module, (ModulesToSaveWrapper, LoRALinear)):
            raise ValueError(f"a {type(module).__name__} already carries an adapter; it cannot also be trained in full")
        self.original_module = module
        memo = {} if tied_to is None else {id(module.weight): tied_to[0].modules_to_save.weight}
        self.modules_to_save = copy.deepcopy(module, memo).requires_grad_(True)  # the shared weight not copied
        self.tied_to: str | tuple[str, ...] = () if tied_to is None else tied_to[1]
        self.untied_from: tuple[str, ...] = ()

    def forward(self, *args, **kwargs):
        return self.modules_to_save(*args, **kwargs)

    def __getattr__(self, name: str):
        """What the module had (`.weight`, `.num_embeddings`) reads from the trained copy, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            trained = self.__dict__.get("_modules", {}).get("modules_to_save")
            if trained is None:
                raise
            return getattr(trained, name)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.modules_to_save.parameters())

    def extra_repr(self) -> str:
        return tie_repr(self).removeprefix(", ")


def saved_modules(model: nn.Module, names) -> dict[str, nn.Module]:
    """PEFT's rule for `modules_to_save`: the modules whose full name ends with one of `names` (the
    outermost, outside adapters); ValueError for a name that matches none."""
    chosen, inside = {}, adapted_prefixes(model)
    for n, m in model.named_modules():
        if n and not n.startswith(inside) and any(n.endswith(t) for t in names):
            chosen[n], inside = m, (*inside, f"{n}.")
    missing = [t for t in names if not any(n.endswith(t) for n in chosen)]
    if missing:
        raise ValueError(f"modules_to_save names {missing[0]!r}, which matches no module of {type(model).__name__} "
                         "(outside adapters); name a module as print(model) shows it, e.g. 'wte' or 'lm_head'")
    return chosen


def _steps_save(model: nn.Module, config: LoRAConfig, wrapped):
    """modules_to_save: a `ModulesToSaveWrapper` for each; a tied one (ensure_weight_tying) becomes one trained
    copy of the embedding that its heads hold too (PEFT's modules_to_tie), whichever was named."""
    if not config.modules_to_save:
        return wrapped
    chosen, sharing, out = saved_modules(model, config.modules_to_save), shared_weights(model), dict(wrapped)
    for name, module in chosen.items():
        if isinstance(out.get(name), ModulesToSaveWrapper):  # a head already tied to its embedding's copy
            continue
        clash = [t for t in out if t == name or t.startswith(f"{name}.") or name.startswith(f"{t}.")]
        if clash:
            raise ValueError(f"{name} is in modules_to_save and {clash[0]} is adapted by LoRA (or tied to it); "
                             "a module is trained either with LoRA or in full, not both")
        partners = sharing.get(name)
        if not partners or not config.ensure_weight_tying:
            out[name] = ModulesToSaveWrapper(module)
            out[name].untied_from = tuple(partners or ())
            continue
        source, heads = tie_group(model, name, partners, taken=out)
        out[source] = ModulesToSaveWrapper(model.get_submodule(source))
        out[source].tied_to = tuple(heads)
        out.update({h: ModulesToSaveWrapper(model.get_submodule(h), (out[source], source)) for h in heads})
    return list(out.items())


register_model_step(_steps_save)


def adapter_state_of_saved(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained copy's tensors by `<module>.<name>` (PEFT's keys, before its `base_model.model.` prefix)."""
    return {f"{n}.{k}": t.detach().cpu().contiguous().clone() for n, m in model.named_modules()
            if isinstance(m, ModulesToSaveWrapper) for k, t in m.modules_to_save.state_dict().items()}


def saved_names(model: nn.Module) -> list[str] | None:
    """PEFT's `modules_to_save` for this model: the full names of its wrapped modules (a full name ends with itself)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)) or None


@dataclass
class SavedPlan:
    """An adapter file's parts beyond its LoRA tensors, checked against a model before anything changes:
    the LoRA targets with tied heads added (`modules`), the LoRA tensors left to plan (`weights`), whether
    ties are kept (`tie`) and which (head, embedding) `pairs`, trained copies ready to go in (`wrappers`),
    copies the model trains already with the file's state for them (`loads`), and the embedding weights
    PEFT saves beside an adapter on embed_tokens/lm_head (`base_weights`)."""

    modules: dict[str, nn.Module]
    weights: dict[str, torch.Tensor]
    tie: bool
    pairs: set[tuple[str, str]] = field(default_factory=set)
    wrappers: list[tuple[str, ModulesToSaveWrapper]] = field(default_factory=list)
    loads: list[tuple[nn.Module, dict[str, torch.Tensor]]] = field(default_factory=list)
    base_weights: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)

    def check_tied(self, layers) -> None:
        """A tied head's tensors (PEFT saves them too) must be its embedding's, transposed; ValueError if not."""
        by_name = {layer.name: layer for layer in layers}
        for head, source in sorted(self.pairs):
            h, s = by_name[head], by_name[source]
            if not (h.r == s.r and abs(h.scaling - s.scaling) <= 1e-6 * s.scaling
                    and torch.equal(h.tensors["lora_A"], s.tensors["lora_embedding_B"].T)
                    and torch.equal(h.tensors["lora_B"], s.tensors["lora_embedding_A"].T)):
                raise ValueError(f"{head} is tied to {source} (one weight) but the adapter's {head} tensors are not "
                                 f"{source}'s transposed: it adapts them apart; load it into a model without LoRA")

    def apply(self, model: nn.Module, built: list[tuple[str, nn.Module]]) -> None:
        """Put in the LoRA layers `built` (tied as planned), the trained copies, and PEFT's embedding weights."""
        for name, module in tie_adapters(model, built, self.tie) + self.wrappers:
            replace_module(model, name, module)
        with torch.no_grad():
            for module, weight in self.base_weights:
                module.weight.copy_(weight)
        for module, state in self.loads:
            module.load_state_dict(state)


def _take(weights: dict, name: str, wanted: dict[str, torch.Tensor], key: Callable[[str], str]) -> dict:
    """Pop `key(name).<k>` for every k of `wanted` (name -> tensor like it), checked: present, shaped, finite."""
    keys = {k: f"{key(name)}.{k}" for k in wanted}
    missing = [v for v in keys.values() if v not in weights]
    if missing:
        raise ValueError(f"the adapter has no {missing[0]!r}: it was saved for another model or modules_to_save")
    taken = {k: weights.pop(v) for k, v in keys.items()}
    wrong = {k: tuple(t.shape) for k, t in taken.items() if t.shape != wanted[k].shape}
    if wrong or not all(torch.isfinite(t).all() for t in taken.values() if t.is_floating_point()):
        raise ValueError(f"{name}: the adapter holds {wrong or 'NaN or inf values'} where the model's module holds "
                         f"{ {k: tuple(wanted[k].shape) for k in wrong} }: another model's, or corrupt")
    return taken


def _plan_copies(plan: SavedPlan, model, names, ensure: bool, sharing, key) -> None:
    """modules_to_save: a wrapper per module, its copy loaded; tied ones where the file holds the heads too."""
    done, taken = set(), {}
    for name, module in saved_modules(model, names).items():
        if name in done:
            continue
        if isinstance(module, ModulesToSaveWrapper):  # a copy the model trains already: the file's goes into it
            taken[name] = state = _take(plan.weights, name, module.modules_to_save.state_dict(), key)
            source = taken.get(module.tied_to) if isinstance(module.tied_to, str) else None
            if source is not None and not torch.equal(state["weight"], source["weight"]):
                raise ValueError(f"{name} is tied to {module.tied_to} but the adapter's copies of them differ")
            plan.loads.append((module.modules_to_save, state))
            continue
        if any(n == name or n.startswith(f"{name}.") for n in plan.modules):
            raise ValueError(f"{name} is in modules_to_save but is, or holds, a LoRA target; a module is trained "
                             "either with LoRA or in full, not both")
        partners = sharing.get(name, [])
        held = [f"{key(p)}.weight" in plan.weights for p in [name, *partners]]
        tied = ensure and partners and all(held)
        if ensure and partners and held[0] and not tied:
            warnings.warn(f"the adapter asks ensure_weight_tying but holds no copy for {partners}, which share "
                          f"{name}'s weight: PEFT did not tie them (it ties only embed_tokens, lm_head); loaded untied")
        source, heads = tie_group(model, name, partners, plan.modules) if tied else (name, [])
        wrapper = ModulesToSaveWrapper(model.get_submodule(source))
        wrapper.tied_to, wrapper.untied_from = tuple(heads), () if tied else tuple(partners)
        wrapper.modules_to_save.load_state_dict(_take(plan.weights, source, wrapper.modules_to_save.state_dict(), key))
        plan.wrappers.append((source, wrapper))
        for head in heads:
            tied_copy = ModulesToSaveWrapper(model.get_submodule(head), (wrapper, source))
            state = _take(plan.weights, head, tied_copy.modules_to_save.state_dict(), key)
            if not torch.equal(state["weight"], wrapper.modules_to_save.weight):
                raise ValueError(f"{head} is tied to {source} but the adapter's copies of them differ")
            tied_copy.modules_to_save.load_state_dict(state)
            plan.wrappers.append((head, tied_copy))
        done |= {source, *heads}


def plan_saved(model: nn.Module, config: dict, weights: dict[str, torch.Tensor], modules: dict[str, nn.Module],
               key: Callable[[str], str]) -> SavedPlan:
    """Check what an adapter file holds beyond the LoRA tensors of `modules` (by name; `key(name)` is a module's
    key stem); ValueError before any change. A tie is kept where the file asks it (ensure_weight_tying) and
    holds the tied heads' tensors (PEFT's tied save does; its untied ones do not)."""
    ensure, sharing = bool(config.get("ensure_weight_tying", False)), shared_weights(model)
    plan = SavedPlan(dict(modules), dict(weights), ensure)
    for name in list(modules):
        partners = sharing.get(name)
        if ensure and partners and all(any(k.startswith(f"{key(p)}.lora_") for k in plan.weights) for p in partners):
            source, heads = tie_group(model, name, partners)
            plan.modules.update({n: model.get_submodule(n) for n in (source, *heads)})
            plan.pairs |= {(head, source) for head in heads}
        elif ensure and partners:
            plan.tie = False
            warnings.warn(f"the adapter asks ensure_weight_tying but holds no LoRA for {partners}, which share "
                          f"{name}'s weight: PEFT did not tie them (it ties only embed_tokens, lm_head); loaded untied")
    plan.pairs |= {(n, m.tied_to) for n, m in modules.items() if isinstance(m, TiedLoRAHead)}
    for name, module in plan.modules.items():  # PEFT's save_embedding_layers: the base weight, loaded as PEFT does
        if f"{key(name)}.base_layer.weight" in plan.weights:
            base = getattr(module, "base_layer", module)
            plan.base_weights.append((base, _take(plan.weights, f"{name}.base_layer", {"weight": base.weight},
                                                  key)["weight"]))
    if config.get("modules_to_save"):
        _plan_copies(plan, model, config["modules_to_save"], ensure, sharing, key)
    return plan
