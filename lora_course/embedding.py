"""LoRA on embeddings and on a tied output head: PEFT's names and semantics.

An embedding E (num_embeddings, embedding_dim) looks up row x: a linear map of one-hot ids with
W0 = E^T (out, in). LoRA on it is PEFT's `lora.Embedding`:

    h = E[x] + scaling * A^T[x] B^T       A = lora_embedding_A (r, num_embeddings), starts at 0
                                          B = lora_embedding_B (embedding_dim, r), starts N(0, 1)
    dE = scaling * (B A)^T                (PEFT's keys for A and B have no `.weight`)

A starts at zero and B at N(0, 1), the reverse of a linear layer's (as loralib's and PEFT's Embedding:
A^T is a small embedding table), so dE = 0 and the layer starts at E. As in PEFT, no dropout on ids.

Tied weights. GPT-2's `lm_head` holds `transformer.wte`'s weight. `ensure_weight_tying=True`
(our default; PEFT's option of that name, whose default is False) keeps the tie: one adapter on
the embedding, which the head uses too in PEFT's layout lora_A = B^T (r, in), lora_B = A^T
(out, r), so dW_head = dE; or, with `modules_to_save`, one trained copy that is both. False adapts
(or copies) only the named module; the other keeps W0, and merging writes into a copy of W0.
PEFT ties only modules named embed_tokens / lm_head, so a saved tied adapter lists `lm_head`
(target_modules or modules_to_save): PEFT then ties it on loading. PEFT's tied head holds views of
the embedding's tensors, which its parameter count adds a second time; ours holds no tensors.
Trained copies (`modules_to_save`) are in `lora_course.modules_to_save`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import INIT_SCHEMES, LoRAConfig, make_config, register_layer_class, register_model_step
from .layers import base_features
from .lora import LoRALinear

__all__ = ["LoRAEmbedding", "TiedLoRAHead", "tie_repr", "shared_weights", "adapted_prefixes", "tie_group",
           "tie_adapters", "tying_setting"]


def tie_repr(module: nn.Module) -> str:
    """What a notebook prints to see the tie: `tied_to=...` (one update) or `untied_from=...` (W0 only)."""
    if module.tied_to:
        tied = module.tied_to if isinstance(module.tied_to, str) else list(module.tied_to)
        return f", tied_to={tied!r}"
    return f", untied_from={list(module.untied_from)!r}" if module.untied_from else ""


class LoRAEmbedding(LoRALinear):
    """LoRA on an `nn.Embedding` (PEFT's `lora.Embedding`): E[x] + scaling * A^T[x] B^T, see the module.

    `add_lora(model, ["wte"], r=8)` builds it; `in_features`, `out_features` are num_embeddings
    and embedding_dim. `tied_to`: the heads sharing its weight that use its update (ensure_weight_tying).
    """

    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 bias: bool = True, base_layer: nn.Module | None = None, base_format=None, **settings):
        config = make_config(config, **settings)
        if config.use_dora:
            raise NotImplementedError("DoRA (use_dora=True) on an embedding is not implemented here; adapt the "
                                      "embedding with plain LoRA (use_dora=False) or leave it out of target_modules")
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights in INIT_SCHEMES:
            raise NotImplementedError(f"init_lora_weights={config.init_lora_weights!r} is not implemented for "
                                      "embeddings (PEFT quietly uses its default there); use True")
        if config.r > min(in_features, out_features):
            raise ValueError(f"r={config.r} exceeds min(num_embeddings, embedding_dim) = "
                             f"{min(in_features, out_features)} for a {in_features}x{out_features} embedding; "
                             f"a rank-{config.r} update cannot exist there. Use r <= {min(in_features, out_features)}")
        if base_layer is None:
            base_layer = nn.Embedding(in_features, out_features)
        # base_format is not applied: an embedding stays in full precision, as QLoRA keeps it
        super().__init__(in_features, out_features, config, base_layer=base_layer)
        self.tied_to: tuple[str, ...] = ()

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Embedding)

    @property
    def lora_A(self) -> nn.Parameter:
        """A, (r, num_embeddings): the same tensor as `lora_embedding_A`."""
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        """B, (embedding_dim, r): the same tensor as `lora_embedding_B`."""
        return self.lora_embedding_B

    def reset_lora_parameters(self) -> None:
        """PEFT's: A = 0, B ~ N(0, 1) (True, "gaussian"); init_lora_weights=False: A ~ N(0, 1) too."""
        nn.init.normal_(self.lora_embedding_B)
        if self.config.init_lora_weights is False:
            nn.init.normal_(self.lora_embedding_A)
        else:
            nn.init.zeros_(self.lora_embedding_A)

    def tensors(self) -> dict[str, torch.Tensor]:
        """lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r): PEFT's names and layout."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def tensor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_embedding_A": (r, self.in_features), "lora_embedding_B": (self.out_features, r)}

    @classmethod
    def peft_shapes(cls, base_layer: nn.Module, r: int, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        if use_dora:
            raise ValueError("the adapter uses DoRA on an embedding, which is not implemented here; load it with PEFT")
        n, d = base_features(base_layer)
        return {"lora_embedding_A": (r, n), "lora_embedding_B": (d, r)}

    @classmethod
    def output_of(cls, base_layer, x, result, tensors, scaling, dropout=None) -> torch.Tensor:
        """result + scaling * A^T[x] B^T for token ids x (...,) and result = E[x] (..., out); no dropout (PEFT's)."""
        A, B = tensors["lora_embedding_A"], tensors["lora_embedding_B"]
        after_A = F.embedding(x, A.T, padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm,
                              norm_type=base_layer.norm_type, scale_grad_by_freq=base_layer.scale_grad_by_freq,
                              sparse=base_layer.sparse)  # (..., r)
        out = (after_A @ B.T) * scaling  # (..., out)
        scale = getattr(base_layer, "embed_scale", None)  # embeddings that scale their output (Gemma's), as PEFT
        if scale is not None:
            out = out * torch.as_tensor(scale, device=out.device, dtype=out.dtype)
        return (result + out).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}" + tie_repr(self))


register_layer_class(nn.Embedding, LoRAEmbedding)


class TiedLoRAHead(LoRALinear):
    """An output head whose weight is an embedding's, adapted by that embedding's LoRA (ensure_weight_tying):

        h = x W0^T + scaling * x A_h^T B_h^T,    A_h = B^T (r, in),  B_h = A^T (out, r),  so dW_head = dE

    It holds no tensors of its own; `tensors()` gives the embedding's, transposed (what PEFT saves
    as the head's lora_A, lora_B). Merging it merges the embedding, whose weight it is.
    """

    def __init__(self, head: nn.Module, source: LoRAEmbedding, source_name: str):
        nn.Module.__init__(self)  # LoRALinear's __init__ would make factors of its own
        if not isinstance(head, nn.Linear) or head.weight is not source.base_layer.weight:
            raise ValueError(f"a tied head must be an nn.Linear holding {source_name}'s weight, "
                             f"got a {type(head).__name__}")
        self.base_layer = head.requires_grad_(False)
        self.config, self.r, self.alpha = source.config, source.r, source.alpha
        self.use_rslora, self.scaling = source.use_rslora, source.scaling
        self.in_features, self.out_features = source.out_features, source.in_features
        self.fan_in_fan_out = False
        p = source.config.lora_dropout  # PEFT's tied head is a lora.Linear: dropout on its input
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self._source = (source,)  # not a submodule: the embedding is registered where it lives
        self.tied_to, self.untied_from, self._shared_weight, self._merge_state = source_name, (), None, None

    @property
    def source(self) -> LoRAEmbedding:
        return self._source[0]

    @property
    def merged(self) -> bool:
        return self.source.merged

    @property
    def lora_A(self) -> torch.Tensor:
        return self.source.lora_embedding_B.T  # (r, in)

    @property
    def lora_B(self) -> torch.Tensor:
        return self.source.lora_embedding_A.T  # (out, r)

    def tensors(self) -> dict[str, torch.Tensor]:
        """lora_A = B^T (r, in), lora_B = A^T (out, r): views of the embedding's tensors."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def merge(self) -> None:
        """Merge the embedding's update into the shared weight: the head has it too."""
        if self.merged:
            raise RuntimeError("this tied head is already merged (with its embedding); call unmerge() first")
        self.source.merge()

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this tied head is not merged; there is nothing to unmerge")
        self.source.unmerge()

    def from_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}  # nothing of its own: loading checks the file's head tensors against its embedding's

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass  # the embedding's tensors are set there

    def adapter_parameters(self) -> list[nn.Parameter]:
        return []

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}, tied_to={self.tied_to!r}")


# ----------------------------------------------------------------------------- which modules, tied how

def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules holding the same `weight` parameter (a tie), for every tied module."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if name else None
        if weight is not None:
            holders.setdefault(id(weight), []).append(name)
    return {n: [m for m in names if m != n] for names in holders.values() if len(names) > 1 for n in names}


def adapted_prefixes(model: nn.Module) -> tuple[str, ...]:
    """`name.` for every module that carries an adapter (a LoRA layer, a trained copy): what lies inside is taken."""
    return tuple(f"{n}." for n, m in model.named_modules() if hasattr(m, "adapter_parameters"))


def tie_group(model: nn.Module, name: str, partners: list[str], taken=()) -> tuple[str, list[str]]:
    """(the embedding, the heads) of a group of modules sharing one weight; ValueError if no tie can be kept."""
    group, inside = [name, *partners], adapted_prefixes(model)
    busy = [n for n in group if n.startswith(inside) or n in taken]
    if busy:
        raise ValueError(f"{name} shares its weight with {busy[0]}, which carries another adapter; adapt both "
                         "in one call, or pass ensure_weight_tying=False to keep them apart")
    sources = [n for n in group if isinstance(model.get_submodule(n), nn.Embedding)]
    heads = [n for n in group if n not in sources]
    if len(sources) != 1 or not all(isinstance(model.get_submodule(h), nn.Linear) for h in heads):
        raise ValueError(f"{group} share one weight, and a tie is kept here only between one nn.Embedding and "
                         f"linear heads; pass ensure_weight_tying=False to adapt {name} alone")
    return sources[0], heads


def tie_adapters(model: nn.Module, wrapped: list[tuple[str, nn.Module]], ensure_weight_tying: bool,
                 ) -> list[tuple[str, nn.Module]]:
    """The LoRA layers about to go in, with tied weights handled: kept tied (one `LoRAEmbedding`, whose
    tied heads become `TiedLoRAHead`s, whichever was named), or marked `untied_from` (merge into a copy)."""
    sharing, out, done = shared_weights(model), dict(wrapped), set()
    for name, layer in wrapped:
        partners = sharing.get(name)
        if not partners or name in done or not isinstance(layer, LoRALinear) or \
                getattr(layer.base_layer, "weight", None) is not model.get_submodule(name).weight:
            continue  # untied, or a base layer quantized apart from its partners
        if not ensure_weight_tying:
            layer.untied_from = tuple(partners)
            continue
        source, heads = tie_group(model, name, partners)
        embedding = out.get(source)
        if not isinstance(embedding, LoRAEmbedding):
            embedding = out[source] = LoRALinear.from_linear(model.get_submodule(source), layer.config)
        embedding.tied_to = tuple(heads)
        out.update({head: TiedLoRAHead(model.get_submodule(head), embedding, source) for head in heads})
        done |= {source, *heads}
    return list(out.items())


def _steps_tie(model: nn.Module, config: LoRAConfig, wrapped):
    return tie_adapters(model, wrapped, config.ensure_weight_tying)


register_model_step(_steps_tie)


def tying_setting(model: nn.Module) -> bool:
    """The `ensure_weight_tying` a saved config records: True where a tie is kept, else PEFT's default False."""
    tied = any(getattr(m, "tied_to", ()) for m in model.modules())
    if tied and any(getattr(m, "untied_from", ()) for m in model.modules()):
        raise ValueError("some tied weights were kept tied and others not; PEFT's config holds one "
                         "ensure_weight_tying for all")
    return tied
