"""LoRA on embeddings and on GPT-2's tied output head, and modules_to_save: equal to PEFT's, in memory and
through the on-disk format both ways; merging; the tie kept by default and broken only when asked; bad input."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lora_course import (  # noqa: E402
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    ModulesToSaveWrapper,
    MultiAdapterModel,
    TiedLoRAHead,
    add_lora,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameters_line,
)
from lora_course.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError  # noqa: E402
from lora_course.linear4bit import Linear4bit, quantized_layers  # noqa: E402
from lora_course.models import toy_gpt2  # noqa: E402

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

# name: (our add_lora settings, PEFT's LoraConfig settings for the same model, PEFT counts the tied head twice).
# PEFT ties only modules named lm_head / embed_tokens, so its tied twin of LoRA on GPT-2's wte names lm_head.
CASES = {
    "wte": (dict(target_modules=["wte"]), dict(target_modules=["lm_head"], ensure_weight_tying=True), True),
    "wte + c_attn": (dict(target_modules=["c_attn", "wte"]),
                     dict(target_modules=["c_attn", "lm_head"], ensure_weight_tying=True), True),
    "lm_head": (dict(target_modules=["lm_head"]), dict(target_modules=["lm_head"], ensure_weight_tying=True), True),
    "wte untied": (dict(target_modules=["wte"], ensure_weight_tying=False), dict(target_modules=["wte"]), False),
    "wte + c_attn untied": (dict(target_modules=["c_attn", "wte"], ensure_weight_tying=False),
                            dict(target_modules=["c_attn", "wte"]), False),
    "lm_head untied": (dict(target_modules=["lm_head"], ensure_weight_tying=False), dict(target_modules=["lm_head"]),
                       False),
    "modules_to_save wte": (dict(target_modules=["c_attn"], modules_to_save=["wte"]),
                            dict(target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True),
                            False),
    "modules_to_save wte untied": (dict(target_modules=["c_attn"], modules_to_save=["wte"], ensure_weight_tying=False),
                                   dict(target_modules=["c_attn"], modules_to_save=["wte"]), False),
}


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b) -> float:
    return (logits(a) - logits(b)).abs().max().item()


@torch.no_grad()
def train_stand_in(model, seed=1):
    """Move every trainable tensor well away from its start (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_model(**settings):
    with warnings.catch_warnings():  # PEFT's notices about tied weights and Conv1D's fan_in_fan_out
        warnings.simplefilter("ignore")
        return get_peft_model(toy_gpt2(), LoraConfig(r=4, lora_alpha=8, **settings))


@torch.no_grad()
def copy_to_peft(ours, theirs):
    """Our adapter's tensors into PEFT's twin, module by module (PEFT's tied head holds views: skipped)."""
    inner = theirs.base_model.model
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear) and not isinstance(module, TiedLoRAHead):
            for t, tensor in module.tensors().items():
                slot = getattr(inner.get_submodule(name), t)["default"]
                (slot.weight if isinstance(slot, nn.Module) else slot).copy_(tensor)
        elif isinstance(module, ModulesToSaveWrapper) and not isinstance(module.tied_to, str):
            inner.get_submodule(name).modules_to_save["default"].load_state_dict(module.modules_to_save.state_dict())


def paired(case):
    ours_settings, peft_settings, _ = CASES[case]
    ours = add_lora(toy_gpt2(), r=4, alpha=8, **ours_settings)
    train_stand_in(ours)
    theirs = peft_model(**peft_settings)
    copy_to_peft(ours, theirs)
    return ours.eval(), theirs.eval()


def distinct_counts(model) -> tuple[int, int]:
    """(trainable, total) with every storage counted once: PEFT's tied head holds views of the embedding's A, B."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------- equal to PEFT

@pytest.mark.parametrize("case", CASES)
def test_outputs_and_counts_equal_peft(case, capsys):
    ours, theirs = paired(case)
    assert max_diff(ours, theirs) < 1e-6
    assert max_diff(ours, toy_gpt2()) > 1e-2, "the stand-in training should change the output"
    assert count_parameters(ours) == distinct_counts(theirs)
    if CASES[case][2]:  # PEFT's tied head: two more Parameter objects over the embedding's storage
        head = theirs.base_model.model.lm_head
        views = head.lora_A["default"].weight.numel() + head.lora_B["default"].weight.numel()
        trainable, total = theirs.get_nb_trainable_parameters()
        assert count_parameters(ours) == (trainable - views, total - views)
    else:
        theirs.print_trainable_parameters()
        assert capsys.readouterr().out.strip() == trainable_parameters_line(ours)


def test_tied_gradients_are_peft_s_two_views_summed():
    """PEFT's tied head trains views of the embedding's A and B; ours trains the one pair, with both uses' gradient."""
    ours, theirs = paired("wte + c_attn")
    ours(IDS, labels=IDS).loss.backward()
    theirs(input_ids=IDS, labels=IDS).loss.backward()
    emb, ref = ours.transformer.wte, theirs.base_model.model
    ref_emb, ref_head = ref.transformer.wte, ref.lm_head
    grad_A = ref_emb.lora_embedding_A["default"].grad + ref_head.lora_B["default"].weight.grad.T
    grad_B = ref_emb.lora_embedding_B["default"].grad + ref_head.lora_A["default"].weight.grad.T
    torch.testing.assert_close(emb.lora_embedding_A.grad, grad_A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.lora_embedding_B.grad, grad_B, rtol=1e-5, atol=1e-6)
    copied = copy.deepcopy(ours)  # the copy's head follows the copy's embedding
    assert copied.lm_head.source is copied.transformer.wte and max_diff(copied, ours) == 0


class TinyLM(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 32, padding_idx=padding_idx)
        self.proj = nn.Linear(32, 10)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_embedding_layer_equals_peft_s_with_padding_idx_gradients_included():
    ids = torch.tensor([[0, 3, 5, 0], [9, 1, 0, 2]])
    ours = add_lora(TinyLM(padding_idx=0), ["emb"], r=4, alpha=8)
    theirs = get_peft_model(TinyLM(padding_idx=0), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    train_stand_in(ours)
    copy_to_peft(ours, theirs)
    ours(ids).pow(2).sum().backward()
    theirs(ids).pow(2).sum().backward()
    emb, ref = ours.emb, theirs.base_model.model.emb
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.lora_embedding_A.grad, ref.lora_embedding_A["default"].grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.lora_embedding_B.grad, ref.lora_embedding_B["default"].grad, rtol=0, atol=1e-6)
    assert torch.count_nonzero(emb.lora_embedding_A.grad[:, 0]) == 0  # the padding row learns nothing


def test_initialisation_is_peft_s_and_starts_at_the_base():
    torch.manual_seed(0)
    layer = LoRAEmbedding.from_linear(nn.Embedding(4096, 32), r=8)
    assert isinstance(layer, LoRAEmbedding) and layer.tensor_shapes(8) == {
        "lora_embedding_A": (8, 4096), "lora_embedding_B": (32, 8)}
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # A = 0: a token sees only its row of A^T
    assert layer.lora_embedding_B.std().item() == pytest.approx(1.0, rel=0.1)  # B ~ N(0, 1), as PEFT
    ids = torch.randint(0, 4096, (3, 7))
    assert torch.equal(layer(ids), layer.base_layer(ids))
    noisy = LoRALinear.from_linear(nn.Embedding(64, 32), r=4, init_lora_weights=False)
    assert isinstance(noisy, LoRAEmbedding) and torch.count_nonzero(noisy.lora_embedding_A) > 0


# ----------------------------------------------------------------------------- the on-disk format, both ways

@pytest.mark.parametrize("case", CASES)
def test_saved_adapter_loads_into_peft_and_back(tmp_path, case):
    ours, _ = paired(case)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(toy_gpt2(), tmp_path).eval()
    assert max_diff(ours, theirs) < 1e-6
    back = load_adapter(toy_gpt2(), tmp_path).eval()
    assert max_diff(ours, back) < 1e-6
    for name, module in ours.named_modules():
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            assert type(back.get_submodule(name)) is type(module), name
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["ensure_weight_tying"] is any(isinstance(m, TiedLoRAHead) or getattr(m, "tied_to", ())
                                               for m in ours.modules())


PEFT_SAVED = {
    "lm_head tied": dict(target_modules=["c_attn", "lm_head"], ensure_weight_tying=True),  # saves transformer.wte
    "lm_head": dict(target_modules=["lm_head"]),  # saves lm_head.base_layer.weight too (save_embedding_layers)
    "wte": dict(target_modules=["wte"]),
    "modules_to_save lm_head tied": dict(target_modules=["c_attn"], modules_to_save=["lm_head"],
                                         ensure_weight_tying=True),
    "modules_to_save wte": dict(target_modules=["c_attn"], modules_to_save=["wte"]),
}


@pytest.mark.parametrize("case", PEFT_SAVED)
def test_peft_s_saved_adapter_loads_into_ours(tmp_path, case):
    theirs = peft_model(**PEFT_SAVED[case])
    train_stand_in(theirs, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(toy_gpt2(), tmp_path)
    assert max_diff(ours, theirs) < 1e-6
    assert max_diff(ours, toy_gpt2()) > 1e-2


def test_peft_s_untied_save_of_a_tie_it_did_not_make_loads_untied_with_a_warning(tmp_path):
    """PEFT ties only modules named embed_tokens / lm_head: ensure_weight_tying=True on GPT-2's wte ties nothing."""
    theirs = peft_model(target_modules=["wte"], ensure_weight_tying=True)
    train_stand_in(theirs)
    theirs.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="PEFT did not tie them"):
        ours = load_adapter(toy_gpt2(), tmp_path)
    assert max_diff(ours, theirs) < 1e-6
    assert type(ours.lm_head) is nn.Linear and ours.transformer.wte.untied_from == ("lm_head",)


@pytest.mark.parametrize("case", ["wte + c_attn", "wte untied", "modules_to_save wte"])
def test_loads_into_a_model_that_carries_the_same_adapters(tmp_path, case):
    trained, _ = paired(case)
    save_adapter(trained, tmp_path)
    model = add_lora(toy_gpt2(), r=4, alpha=8, **CASES[case][0])
    assert max_diff(model, trained) > 1e-2
    assert max_diff(load_adapter(model, tmp_path), trained) < 1e-6
    assert [type(m) for m in model.modules()] == [type(m) for m in trained.modules()]


def test_an_untied_adapter_does_not_load_into_a_tied_model(tmp_path):
    trained = add_lora(toy_gpt2(), ["lm_head", "wte"], r=4, alpha=8, ensure_weight_tying=False)
    train_stand_in(trained)
    save_adapter(trained, tmp_path)
    model = add_lora(toy_gpt2(), ["wte"], r=4, alpha=8)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="transposed"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- merging

@pytest.mark.parametrize("tied", [True, False])
def test_merge_and_unmerge_the_embedding_adapter(tied):
    model = add_lora(toy_gpt2(), ["c_attn", "wte"], r=4, alpha=8, ensure_weight_tying=tied)
    train_stand_in(model)
    wte, W0 = model.transformer.wte, model.transformer.wte.base_layer.weight.detach().clone()  # (vocab, d)
    before = logits(model)
    wte.merge()
    assert getattr(model.lm_head, "merged", False) is tied  # a tied head has the update through the shared weight
    torch.testing.assert_close(wte.base_layer.weight, W0 + wte.delta_weight().T)  # dE = (scaling B A)^T
    if not tied:
        assert torch.equal(model.lm_head.weight, W0)  # the head keeps W0: the merge went into a copy
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-4)
    wte.unmerge()
    assert (model.lm_head.base_layer if tied else model.lm_head).weight is wte.base_layer.weight  # one weight again
    torch.testing.assert_close(wte.base_layer.weight, W0, rtol=0, atol=1e-6)
    merged = merge_lora(model)
    assert type(merged.transformer.wte) is nn.Embedding and type(merged.lm_head) is nn.Linear
    assert (merged.lm_head.weight is merged.transformer.wte.weight) is tied
    assert merged.config.tie_word_embeddings is tied
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-4)


def test_merging_modules_to_save_puts_the_trained_copy_in_place():
    model = add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8, modules_to_save=["wte"])
    train_stand_in(model)
    before = logits(model)
    merged = merge_lora(model)
    assert type(merged.transformer.wte) is nn.Embedding and merged.lm_head.weight is merged.transformer.wte.weight
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the tie, kept unless asked

def test_the_tie_is_kept_by_default_and_said():
    model = add_lora(toy_gpt2(), ["wte"], r=4, alpha=8)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, LoRAEmbedding) and isinstance(head, TiedLoRAHead)
    assert "tied_to=['lm_head']" in repr(wte) and "tied_to='transformer.wte'" in repr(head)
    assert head.base_layer.weight is wte.base_layer.weight
    train_stand_in(model)
    torch.testing.assert_close(head.delta_weight(), wte.delta_weight().T)  # dW_head = dE: one update
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.wte.lora_embedding_A", "transformer.wte.lora_embedding_B"]
    model(IDS, labels=IDS).loss.backward()  # both uses train the one pair
    assert wte.lora_embedding_A.grad.abs().sum() > 0 and wte.lora_embedding_B.grad.abs().sum() > 0
    assert isinstance(add_lora(toy_gpt2(), ["lm_head"], r=4).transformer.wte, LoRAEmbedding)  # as PEFT


def test_the_tie_is_broken_only_when_asked():
    model = add_lora(toy_gpt2(), ["wte"], r=4, ensure_weight_tying=False)
    assert type(model.lm_head) is nn.Linear and "untied_from=['lm_head']" in repr(model.transformer.wte)
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight  # W0 still shared, frozen
    head = add_lora(toy_gpt2(), ["lm_head"], r=4, ensure_weight_tying=False)
    assert type(head.lm_head) is LoRALinear and type(head.transformer.wte) is nn.Embedding
    assert head.lm_head.untied_from == ("transformer.wte",)


def test_modules_to_save_trains_one_copy_of_a_tied_weight():
    model = add_lora(toy_gpt2(), ["c_attn"], r=4, modules_to_save=["wte"])
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, ModulesToSaveWrapper) and isinstance(head, ModulesToSaveWrapper)
    assert head.modules_to_save.weight is wte.modules_to_save.weight is wte.weight  # one trained copy
    assert "tied_to=['lm_head']" in repr(wte) and "tied_to='transformer.wte'" in repr(head)
    assert not wte.original_module.weight.requires_grad and wte.modules_to_save.weight.requires_grad
    W0 = wte.original_module.weight.detach().clone()
    model(IDS, labels=IDS).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(wte.original_module.weight, W0) and not torch.equal(wte.modules_to_save.weight, W0)
    named_head = add_lora(toy_gpt2(), ["c_attn"], r=4, modules_to_save=["lm_head"])  # the copy lives on wte
    assert isinstance(named_head.transformer.wte, ModulesToSaveWrapper) and named_head.lm_head.tied_to
    untied = add_lora(toy_gpt2(), ["c_attn"], r=4, modules_to_save=["wte"], ensure_weight_tying=False)
    assert type(untied.lm_head) is nn.Linear and untied.lm_head.weight is untied.transformer.wte.original_module.weight
    assert "untied_from=['lm_head']" in repr(untied.transformer.wte)


# ----------------------------------------------------------------------------- bad input, model unchanged

def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, before):
    state, types, flags = snapshot(model)
    assert list(state) == list(before[0]) and all(torch.equal(state[k], before[0][k]) for k in state)
    assert types == before[1] and flags == before[2]


@pytest.mark.parametrize("make, settings, error, match", [
    (TinyLM, dict(target_modules=["proj", "emb"], r=16), ValueError, r"min\(num_embeddings, embedding_dim\) = 10"),
    (toy_gpt2, dict(target_modules=["c_attn"], modules_to_save=["nope"]), ValueError, "'nope', which matches no"),
    (toy_gpt2, dict(target_modules=["c_attn"], modules_to_save=["c_attn"]), ValueError, "not both"),
    (toy_gpt2, dict(target_modules=["wte"], modules_to_save=["wte"]), ValueError, "not both"),
    (toy_gpt2, dict(target_modules=["lm_head"], modules_to_save=["wte"]), ValueError, "not both"),  # tied: one weight
    (toy_gpt2, dict(target_modules=["c_attn", "wte"], use_dora=True), NotImplementedError, "DoRA"),
    (toy_gpt2, dict(target_modules=["wte"], init_lora_weights="pissa"), NotImplementedError, "pissa"),
])
def test_bad_settings_raise_and_leave_the_model_unchanged(make, settings, error, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_lora(model, **{"r": 4, **settings})
    assert_unchanged(model, before)


def test_bad_config_values_are_refused():
    with pytest.raises(TypeError, match="modules_to_save"):
        LoRAConfig(modules_to_save=[])
    with pytest.raises(TypeError, match="True or False"):
        LoRAConfig(ensure_weight_tying="yes")


def _edit(folder, weights=None, config=None):
    from safetensors.torch import load_file, save_file

    if weights:
        state = load_file(str(folder / WEIGHTS_NAME))
        weights(state)
        save_file(state, str(folder / WEIGHTS_NAME))
    if config:
        data = json.loads((folder / CONFIG_NAME).read_text())
        data.update(config)
        (folder / CONFIG_NAME).write_text(json.dumps(data))


HEAD_A = "base_model.model.lm_head.lora_A.weight"
EMB_A = "base_model.model.transformer.wte.lora_embedding_A"
COPY = "base_model.model.transformer.wte.weight"
BAD_FILES = {
    "tied head not the embedding's": ("wte", dict(weights=lambda s: s[HEAD_A].add_(1.0)), "transposed"),
    "NaN in the embedding's A": ("wte", dict(weights=lambda s: s[EMB_A].fill_(float("nan"))), "NaN"),
    "DoRA on the embedding": ("wte", dict(config={"use_dora": True}), "DoRA"),
    "copy of the wrong shape": ("modules_to_save wte", dict(weights=lambda s: s.update({COPY: torch.zeros(3, 64)})),
                                "another model's"),
    "copy missing": ("modules_to_save wte", dict(weights=lambda s: s.pop(COPY)), "has no"),
    "modules_to_save naming nothing": ("modules_to_save wte", dict(config={"modules_to_save": ["nope"]}),
                                       "matches no module"),
}


@pytest.mark.parametrize("bad", BAD_FILES)
def test_bad_adapter_files_raise_and_leave_the_model_unchanged(tmp_path, bad):
    case, edits, match = BAD_FILES[bad]
    save_adapter(paired(case)[0], tmp_path)
    _edit(tmp_path, **edits)
    model = toy_gpt2()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=match):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case, match", [("wte untied", "embedding"), ("lm_head untied", "tied head"),
                                         ("modules_to_save wte untied", "modules_to_save")])
def test_serving_refuses_embedding_adapters_and_modules_to_save(tmp_path, case, match):
    save_adapter(paired(case)[0], tmp_path)
    server = MultiAdapterModel(toy_gpt2())
    before = snapshot(server)
    with pytest.raises(AdapterError, match=match):
        server.load_adapter(tmp_path, "a")
    assert_unchanged(server, before)
    assert not server.adapters


def test_embeddings_stay_out_of_4bit():
    model = add_lora(toy_gpt2(), ["c_attn", "wte"], r=4, quantize_base="nf4", modules_to_save=["c_fc"])
    assert type(model.transformer.wte.base_layer) is nn.Embedding and type(model.lm_head.base_layer) is nn.Linear
    assert type(model.transformer.wpe) is nn.Embedding
    saved = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(saved) == 2 and not any(isinstance(m.original_module, Linear4bit) for m in saved)
    assert len(quantized_layers(model)) == 3 * model.config.n_layer  # c_attn's bases, c_proj x2; c_fc is copied
    with pytest.raises(TypeError, match="linear"):
        Linear4bit.from_linear(nn.Embedding(10, 64))
