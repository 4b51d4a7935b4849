"""Every variant on every kind of base layer merges and unmerges through the one base-weight seam, or
refuses clearly; and the package's import structure keeps the core free of its variants."""

import ast
import copy
import pathlib

import pytest
import torch
from torch import nn

from lora_course import add_lora, save_adapter
from lora_course.dora import DoRALinear
from lora_course.fused import FusedLoRALinear
from lora_course.layers import Conv1D, base_weight, write_base_weight
from lora_course.linear4bit import Linear4bit, quantize_model
from lora_course.lora import LoRALinear, count_parameters, lora_layers
from lora_course.models import toy_gpt2
from lora_course.serving import MultiAdapterModel

D_IN, D_OUT = 64, 192  # 192 = 3 x 64: the fused layer's three slices; both divide into 64-number blocks


def _float_base(kind: str) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5  # (out, in)
    layer = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    write_base_weight(layer, W)
    with torch.no_grad():
        layer.bias.copy_(0.1 * torch.randn(D_OUT, generator=g))
    return layer


BASES = {
    "linear": lambda: _float_base("linear"),
    "conv1d": lambda: _float_base("conv1d"),
    "nf4": lambda: Linear4bit.from_linear(_float_base("linear")),
    "nf4 from conv1d": lambda: Linear4bit.from_linear(_float_base("conv1d")),
}
VARIANTS = {
    "lora": lambda base: LoRALinear.from_linear(base, r=4, alpha=8),
    "rslora": lambda base: LoRALinear.from_linear(base, r=4, alpha=8, use_rslora=True),
    "dora": lambda base: LoRALinear.from_linear(base, r=4, alpha=8, use_dora=True),
    "pissa": lambda base: LoRALinear.from_linear(base, r=4, alpha=8, init_lora_weights="pissa"),
    "pissa + dora": lambda base: LoRALinear.from_linear(base, r=4, alpha=8, init_lora_weights="pissa",
                                                        use_dora=True),
    "fused q,v": lambda base: FusedLoRALinear.from_linear(base, r=4, alpha=8),
    "fused + dora": lambda base: FusedLoRALinear.from_linear(base, r=4, alpha=8, use_dora=True),
    "fused + pissa": lambda base: FusedLoRALinear.from_linear(base, r=4, alpha=8, init_lora_weights="pissa"),
}
# The combinations that cannot exist, and the error that says so.
REFUSED = {"fused + dora": NotImplementedError, "fused + pissa": TypeError}


def _train_stand_in(layer: nn.Module) -> None:
    """Move every adapter tensor well away from its start (a stand-in for training)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.add_(0.3 * p.abs().mean().clamp(min=0.05) * torch.randn(p.shape, generator=g))


def _rounding(base: nn.Module, x: torch.Tensor) -> float:
    """How far one rounding of the stored weight moves the outputs (Frobenius norm over the batch): the 4-bit
    layer against its full-precision original, or float32 round-off for a float layer."""
    with torch.no_grad():
        if not isinstance(base, Linear4bit):
            return 1e-5 * base(x).norm().item()
        original = _float_base("linear")  # the same seeded weight the 4-bit layer was made from
        return (base(x) - (x @ base_weight(original).T + original.bias)).norm().item()


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_on_every_base_merges_and_unmerges_or_refuses(variant, base_name):
    base = BASES[base_name]()
    if variant in REFUSED:
        with pytest.raises(REFUSED[variant]):
            VARIANTS[variant](base)
        return
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(2))
    q = _rounding(base, x)
    with torch.no_grad():
        y_base = base(x)
        layer = VARIANTS[variant](base)
        if variant.startswith("pissa"):  # PiSSA starts at the base's output, up to rounding its residual once
            assert (layer(x) - y_base).norm() <= 1.5 * q
        _train_stand_in(layer)
        y = layer(x)
        assert (y - y_base).norm() > 3 * q, "the stand-in training should move the output beyond rounding"
        layer.merge()
        # Merged: one rounding of the merged weight. A merge that dropped the adapter would be > 3 q away.
        assert (layer(x) - y).norm() <= 2 * q, f"merging on {base_name} lost part of the adapter"
        assert torch.equal(layer(x), layer.base_layer(x))  # the merged base alone computes it
        layer.unmerge()
        assert (layer(x) - y).norm() <= 2.5 * q, f"unmerging on {base_name} did not come back"
    assert isinstance(layer.base_layer, type(base))


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_serving_merges_through_the_seam_on_either_base(tmp_path, quantized, use_dora):
    torch.manual_seed(0)
    trained = add_lora(toy_gpt2(), ["c_attn", "c_fc"], r=4, alpha=8, use_dora=use_dora)
    _train_stand_in(trained)
    save_adapter(trained, tmp_path / "a")
    base = toy_gpt2()
    server = MultiAdapterModel(quantize_model(copy.deepcopy(base)) if quantized else copy.deepcopy(base)).eval()
    server.load_adapter(tmp_path / "a", "a")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = server(ids).logits
        server.set_adapter("a")
        adapted = server(ids).logits
        server.merge_adapter()
        merged = server(ids).logits
        server.unmerge_adapter()
        back = server(ids).logits
    with torch.no_grad():
        rounding = (plain - base(ids).logits).norm() if quantized else 1e-5 * plain.norm()  # what 4 bits cost
    effect = (adapted - plain).norm()
    assert effect > 3 * rounding
    assert (merged - adapted).norm() <= 2 * rounding, "the merge lost part of the adapter"
    assert (back - adapted).norm() <= 2.5 * rounding


def test_pissa_on_an_already_quantized_model_starts_at_its_output():
    model = quantize_model(toy_gpt2())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    reference = toy_gpt2()
    with torch.no_grad():
        before = model(ids).logits
        rounding = (before - reference(ids).logits).norm()  # what 4 bits cost this model
        add_lora(model, ["c_attn"], r=4, alpha=8, init_lora_weights="pissa")
        after = model(ids).logits
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    assert (after - before).norm() < 1.5 * rounding, ((after - before).norm(), rounding)  # its residual, re-rounded


def test_qpissa_rounds_less_than_qlora():
    """quantize_base with PiSSA quantizes the residual (W0 minus its top-r part), which rounds less than W0."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = toy_gpt2()(ids).logits
        errors = {init: (add_lora(toy_gpt2(), ["c_attn", "c_fc"], r=8, quantize_base="nf4",
                                  init_lora_weights=init)(ids).logits - exact).abs().mean().item()
                  for init in (True, "pissa")}
    assert errors["pissa"] < errors[True], errors


def test_counts_agree_on_4bit_models():
    from lora_course.data import make_splits
    from lora_course.models import load_model
    from lora_course.train import TrainConfig, train

    plain = add_lora(toy_gpt2(), ["c_attn"], r=4)
    qlora = add_lora(toy_gpt2(), ["c_attn"], r=4, quantize_base="nf4")
    assert count_parameters(qlora) == count_parameters(plain)
    shipped, tokenizer, _ = load_model("tiny-gpt2", verbose=False)
    model = add_lora(shipped, ["c_attn"], r=4, quantize_base="nf4")
    splits = make_splits(n_validation=4, n_test=4, n_train=16)
    record = train(model, tokenizer, splits.train, splits.validation,
                   TrainConfig(steps=1, batch_size=2, n_eval=2, progress=False, memory_steps=1))
    assert (record.trainable_params, record.total_params) == count_parameters(model)
    assert any(isinstance(m, DoRALinear) for m in
               add_lora(toy_gpt2(), ["c_attn"], r=4, use_dora=True, quantize_base="nf4").modules())


# ----------------------------------------------------------------------------- the package's import structure

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lora_course"


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) for every import in the file, at any depth (inside functions too)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {t for t, _ in _imports(path) if t.startswith("lora_course.") and t != name}
    return graph


def test_the_lora_core_imports_no_variant():
    imported = {t for t, _ in _imports(PACKAGE / "lora.py")}
    assert not imported & {f"lora_course.{m}" for m in ("dora", "pissa", "quant", "fused", "serving", "adapters")}


def test_no_import_circle_in_the_package():
    graph = _graph()
    # A package's __init__ imports its modules; a module importing a sibling runs that __init__ first,
    # which is no circle of the modules' own, so edges into a package's __init__ are left out.
    packages = {n for n in graph if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    edges = {n: {t for t in ts if t in graph and t not in packages} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_private_names_do_not_cross_module_lines():
    crossing = [(str(path.relative_to(PACKAGE)), target, name)
                for path in PACKAGE.rglob("*.py") for target, names in _imports(path)
                for name in names if target.startswith("lora_course") and name.startswith("_")]
    assert not crossing, crossing
