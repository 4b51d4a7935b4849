"""Merging adapters (lora_course.merging, MultiAdapterModel.add_weighted_adapter): equal to PEFT's
add_weighted_adapter on the same PEFT-format adapters, exact where the algebra says so, round trips
through PEFT's format both ways, and bad input refused with the model untouched."""

import copy
import math
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from peft import PeftModel

from lora_course import add_lora, save_adapter
from lora_course.merging import disjoint_merge, drop_and_rescale, elect_sign, task_merge, trim
from lora_course.models import toy_gpt2
from lora_course.serving import MultiAdapterModel

ADAPTERS = {  # name -> add_lora settings: two of one rank on different layers, one of another rank, rsLoRA, DoRA
    "a": dict(target_modules=["c_attn"], r=4, alpha=8),
    "b": dict(target_modules=["c_attn", "c_fc"], r=4, alpha=4),
    "d": dict(target_modules=["c_attn", "c_proj"], r=2, alpha=4),
    "rs": dict(target_modules=["c_attn"], r=4, alpha=8, use_rslora=True),
    "dora": dict(target_modules=["c_attn"], r=4, alpha=8, use_dora=True),
}
X = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = toy_gpt2()
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        model = add_lora(copy.deepcopy(base), **settings)
        g = torch.Generator().manual_seed(i)  # random factors: a stand-in for training
        model.load_state_dict({n: t + 0.2 * torch.randn(t.shape, generator=g)
                               for n, t in model.state_dict().items() if "lora_" in n}, strict=False)
        save_adapter(model, root / name)
    return base, root


def _server(setup, names=("a", "b", "d")):
    base, root = setup
    server = MultiAdapterModel(copy.deepcopy(base))
    for name in names:
        server.load_adapter(root / name, name)
    return server.eval()


def _peft(setup, names=("a", "b", "d")):
    base, root = setup
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(root / name), adapter_name=name)
    return peft.eval()


@torch.no_grad()
def _logits(model, name):
    model.set_adapter(name)
    return model(X).logits


CASES = [  # (adapters, weights, settings)
    (["a", "b"], [1.0, 0.7], dict(combination_type="linear")),
    (["a", "b", "d"], [1.0, -0.5, 2.0], dict(combination_type="cat")),
    (["a", "b", "d"], [1.0, 0.5, 0.8], dict(combination_type="svd")),
    (["a", "b", "d"], [1.0, 0.5, 0.8], dict(combination_type="svd", svd_rank=3)),
    (["a", "b"], [1.0, 0.6], dict(combination_type="ties", density=0.5)),
    (["a", "b"], [0.9, -0.6], dict(combination_type="ties", density=0.3, majority_sign_method="frequency")),
    (["a", "b", "d"], [1.0, 0.6, 0.5], dict(combination_type="ties_svd", density=0.4, svd_rank=5)),
    (["a", "b"], [1.0, 0.6], dict(combination_type="magnitude_prune", density=0.5)),
    (["b"], [0.5], dict(combination_type="svd", svd_rank=1)),  # one adapter: both merge it with "linear", exactly
]


@pytest.mark.parametrize("adapters, weights, settings", CASES,
                         ids=[f"{i}-{c[2]['combination_type']}" for i, c in enumerate(CASES)])
def test_deterministic_merges_equal_peft(setup, adapters, weights, settings):
    server, peft = _server(setup), _peft(setup)
    server.add_weighted_adapter(adapters, weights, "m", **settings)
    peft.add_weighted_adapter(adapters, weights, "m", **settings)
    assert (_logits(server, "m") - _logits(peft, "m")).abs().max().item() < 1e-5
    assert (_logits(server, "m") - _logits(server, "a")).abs().max().item() > 1e-3  # the merge changed something


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_ties_svd"])
def test_dare_equals_peft_with_the_same_masks(setup, monkeypatch, combination_type):
    """The random streams cannot match (PEFT draws the new adapter's init first), so both draw DARE's
    Bernoulli masks through a recorder: PEFT's masks are kept and handed to ours in the same order (PEFT
    holds GPT-2's dW as Conv1D stores it, (in, out): for the _svd forms its mask is transposed to ours)."""
    server, peft = _server(setup), _peft(setup)
    real, masks = torch.bernoulli, []

    def record(p, *args, **kwargs):
        masks.append(real(p, *args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(torch, "bernoulli", record)
    names = ["a", "b", "d"] if combination_type.endswith("svd") else ["a", "b"]
    peft.add_weighted_adapter(names, [1.0, 0.7, 0.5][:len(names)], "m", combination_type, density=0.5)
    replay = iter(list(masks))
    svd = combination_type.endswith("svd")
    monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kwargs: next(replay).T if svd else next(replay))
    server.add_weighted_adapter(names, [1.0, 0.7, 0.5][:len(names)], "m", combination_type, density=0.5)
    assert next(replay, None) is None and masks  # ours drew exactly as many masks as PEFT
    assert (_logits(server, "m") - _logits(peft, "m")).abs().max().item() < 1e-5


def test_dare_keeps_the_update_in_expectation():
    """Statistical: over 4,000 draws the mean of DARE (density 0.3) is within 5 standard errors of the input."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g)
    draws = torch.stack([drop_and_rescale(t, 0.3, g) for _ in range(4000)])
    stderr = t.abs() * math.sqrt((1 - 0.3) / 0.3) / math.sqrt(4000)
    assert ((draws.mean(0) - t).abs() <= 5 * stderr + 1e-7).all()
    assert abs((draws != 0).float().mean().item() - 0.3) < 0.01  # the fraction kept is the density
    assert torch.equal(drop_and_rescale(t, 1.0, g), t)


def test_ties_steps_on_a_small_example():
    t1 = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    t2 = torch.tensor([[-2.0, -4.0], [1.0, 0.1]])
    trimmed = torch.stack([trim(t1, 0.5), trim(t2, 0.5)])
    assert torch.equal(trimmed, torch.tensor([[[3.0, 0.0], [2.0, 0.0]], [[-2.0, -4.0], [0.0, 0.0]]]))
    agree = elect_sign(trimmed)  # sums [[1, -4], [2, 0]]: elected + - / + +
    assert torch.equal(agree, torch.tensor([[[True, False], [True, False]], [[False, True], [False, False]]]))
    assert torch.equal(disjoint_merge(trimmed, agree), torch.tensor([[3.0, -4.0], [2.0, 0.0]]))
    # by count, 3 and -2 tie: + is elected; by sum the first entry is +1 as well
    assert torch.equal(elect_sign(trimmed, "frequency")[:, 0, 0], torch.tensor([True, False]))
    two = task_merge([t1, t1], [0.5, 0.5], "ties", density=1.0)  # equal copies: TIES's mean of agreeing entries
    assert torch.allclose(two, 0.5 * t1)


def _delta(server, name, layer="transformer.h.0.attn.c_attn"):
    return server.layers()[layer].delta_weight(name)


def test_cat_and_full_rank_svd_are_lossless_and_linear_has_cross_terms(setup):
    server = _server(setup)
    w = [1.0, 0.7]
    server.add_weighted_adapter(["a", "b"], w, "cat", combination_type="cat")
    server.add_weighted_adapter(["a", "b"], w, "svd8", combination_type="svd", svd_rank=8)
    server.add_weighted_adapter(["a", "b"], w, "lin", combination_type="linear")
    target = w[0] * _delta(server, "a") + w[1] * _delta(server, "b")
    assert (_delta(server, "cat") - target).abs().max() < 1e-6
    assert (_delta(server, "svd8") - target).abs().max() < 1e-5
    m = server.layers()["transformer.h.0.attn.c_attn"]
    (A1, B1), (A2, B2) = ((m.adapters[n]["lora_A"], m.adapters[n]["lora_B"]) for n in "ab")
    c1, c2 = (math.sqrt(wi * m.scaling[n]) for wi, n in zip(w, "ab"))
    cross = c1 * c2 * (B1 @ A2 + B2 @ A1)
    assert cross.abs().max() > 0.1  # the cross terms are not small here
    assert (_delta(server, "lin") - (target + cross)).abs().max() < 1e-5


def test_merged_adapter_serves_like_a_loaded_one(setup):
    server = _server(setup)
    server.add_weighted_adapter(["a", "d"], [1.0, 1.0], "m", combination_type="cat")
    unmerged = _logits(server, "m")
    with torch.no_grad():
        mixed = server(X, adapter_names=["a", "m", None]).logits
        assert (mixed[1] - unmerged[1]).abs().max() < 1e-5
        assert (mixed[0] - _logits(server, "a")[0]).abs().max() < 1e-5
        server.set_adapter("m")
        server.merge_adapter()
        assert (server(X).logits - unmerged).abs().max() < 1e-5
        server.unmerge_adapter()


def test_round_trips_through_peft_format(setup, tmp_path):
    base = setup[0]
    server, peft = _server(setup), _peft(setup)
    server.add_weighted_adapter(["a", "b", "d"], [1.0, 0.5, 0.8], "m", combination_type="svd", svd_rank=4)
    server.save_adapter("m", tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()  # ours -> PEFT
    with torch.no_grad():
        assert (loaded(X).logits - _logits(server, "m")).abs().max().item() < 1e-5
    peft.add_weighted_adapter(["a", "b", "d"], [1.0, 0.5, 0.8], "pm", combination_type="cat")
    peft.save_pretrained(str(tmp_path / "peft"), selected_adapters=["pm"])  # PEFT -> ours
    server.load_adapter(tmp_path / "peft" / "pm", "pm")
    assert (_logits(server, "pm") - _logits(peft, "pm")).abs().max().item() < 1e-5
    server.save_adapter("a", tmp_path / "a")  # a loaded adapter saves back to what it was
    again = _server(setup, names=())
    again.load_adapter(tmp_path / "a", "a")
    assert (_logits(again, "a") - _logits(server, "a")).abs().max().item() < 1e-6


def test_rslora_source_merged_at_its_own_scale_as_peft_does_from_0_22(setup):
    """The merged adapter has scaling 1 (r = lora_alpha = 6) and is the weighted sum. PEFT up to 0.21 kept the
    first source's use_rslora for it, so its update was sqrt(6) times the sum; 0.22 sets use_rslora=False."""
    server, peft = _server(setup, ("rs", "d")), _peft(setup, ("rs", "d"))
    server.add_weighted_adapter(["rs", "d"], [1.0, 1.0], "m", combination_type="cat")
    peft.add_weighted_adapter(["rs", "d"], [1.0, 1.0], "m", combination_type="cat")
    target = _delta(server, "rs") + _delta(server, "d")
    assert (_delta(server, "m") - target).abs().max() < 1e-6
    theirs = peft.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("m").T  # Conv1D: (in, out)
    off_by = math.sqrt(6) if Version(version("peft")) < Version("0.22") else 1.0
    assert (theirs - off_by * target).abs().max() < 1e-5


def _state(server):
    return server.adapters, server.active_adapter, {k: v.clone() for k, v in server.state_dict().items()}


BAD = [  # (adapters, weights, name, settings, error, message)
    (["a", "b"], [1.0], "m", {}, ValueError, "one weight per adapter"),
    (["a", "zzz"], [1.0, 1.0], "m", {}, KeyError, "no adapter named 'zzz'"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="average"), ValueError, "unknown combination_type"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="ties", density=0.0), ValueError, r"density in \(0, 1\]"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="dare_ties", density=1.5), ValueError, "density in"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="ties"), ValueError, "needs a density"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="svd", density=0.5), ValueError, "takes no density"),
    (["a", "d"], [1.0, 1.0], "m", dict(combination_type="linear"), ValueError, "same r"),
    (["a", "d"], [1.0, 1.0], "a", {}, ValueError, "already loaded"),
    (["a", "d"], [1.0, 1.0], "half", {}, ValueError, "torch Module method"),
    (["a", "dora"], [1.0, 1.0], "m", {}, ValueError, "not plain LoRA"),
    (["a", "a"], [1.0, 1.0], "m", {}, ValueError, "appears twice"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="linear", svd_rank=2), ValueError, "svd_rank"),
    (["a", "b"], [1.0, float("nan")], "m", {}, ValueError, "finite"),
    (["a", "b"], [1.0, 1.0], "m", dict(combination_type="ties", density=0.5, majority_sign_method="most"),
     ValueError, "majority_sign_method"),
]


@pytest.mark.parametrize("adapters, weights, name, settings, error, message", BAD, ids=[b[-1] for b in BAD])
def test_bad_requests_are_refused_and_change_nothing(setup, adapters, weights, name, settings, error, message):
    server = _server(setup, ("a", "b", "d", "dora"))
    server.set_adapter("b")
    before = _state(server)
    with pytest.raises(error, match=message):
        server.add_weighted_adapter(adapters, weights, name, **settings)
    after = _state(server)
    assert after[:2] == before[:2] and set(after[2]) == set(before[2])
    assert all(torch.equal(before[2][k], v) for k, v in after[2].items())
