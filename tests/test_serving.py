"""Many adapters on one base (lora_course.serving): switching, mixed batches, merging, deleting, bad input."""

import copy

import pytest
import torch
from peft import PeftModel

from lora_course import add_lora, save_adapter, serving
from lora_course.adapters import AdapterError
from lora_course.models import toy_gpt2, toy_gpt2_config
from lora_course.serving import BASE, MultiAdapterLinear, MultiAdapterModel, mixed_batch_costs, mixed_rows

ADAPTERS = {  # name -> add_lora settings: plain LoRA, LoRA on more layers at another rank, DoRA
    "sql": dict(target_modules=["c_attn"], r=4, alpha=8),
    "chat": dict(target_modules=["c_attn", "c_fc"], r=2, alpha=4),
    "dora": dict(target_modules=["c_attn", "c_proj"], r=4, alpha=8, use_dora=True),
}


def _trained(base, seed, **settings):
    model = add_lora(copy.deepcopy(base), **settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))  # stand-in for training
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = toy_gpt2()
    root = tmp_path_factory.mktemp("adapters")
    singles = {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        singles[name] = _trained(base, i, **settings)
        save_adapter(singles[name], root / name)
    return base, root, singles


def _server(setup, names=tuple(ADAPTERS)):
    base, root, _ = setup
    server = MultiAdapterModel(copy.deepcopy(base))
    for name in names:
        server.load_adapter(root / name, name)
    return server.eval()


def _x(seed=0, rows=4):
    return torch.randint(0, 256, (rows, 10), generator=torch.Generator().manual_seed(seed))


def test_switching_gives_each_adapter_alone(setup):
    base, _, singles = setup
    server = _server(setup)
    x = _x()
    with torch.no_grad():
        for name, single in singles.items():
            server.set_adapter(name)
            assert server.active_adapter == name
            assert (server(x).logits - single(x).logits).abs().max().item() <= 1e-6
        server.set_adapter(None)
        assert (server(x).logits - base(x).logits).abs().max().item() <= 1e-6


def test_mixed_batch_equals_each_row_with_its_own_adapter(setup):
    base, _, singles = setup
    server = _server(setup)
    x = _x(rows=5)
    names = ["sql", None, "dora", "chat", BASE]
    with torch.no_grad():
        mixed = server(x, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = (base if name in (None, BASE) else singles[name])(x[i:i + 1]).logits
            assert (mixed[i:i + 1] - alone).abs().max().item() <= 1e-6


def test_mixed_batch_equals_peft(setup):
    base, root, _ = setup
    server = _server(setup, names=("sql", "chat"))
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "sql"), adapter_name="sql")
    peft.load_adapter(str(root / "chat"), adapter_name="chat")
    peft.eval()
    x = _x(rows=3)
    names = ["chat", "__base__", "sql"]
    with torch.no_grad():
        assert (server(x, adapter_names=names).logits - peft(x, adapter_names=names).logits).abs().max() <= 1e-6


def test_mixed_generation_equals_generating_each_row_alone(setup):
    _, _, singles = setup
    server = _server(setup)
    x = _x(rows=3)
    names = ["dora", "sql", None]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed = server.generate(x, adapter_names=names, **kw)
    for i, name in enumerate(names):
        server.set_adapter(name)
        assert torch.equal(mixed[i:i + 1], server.generate(x[i:i + 1], **kw))


def test_merge_then_unmerge(setup):
    base, _, singles = setup
    server = _server(setup)
    x = _x()
    W0 = base.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        for name in ("sql", "dora"):
            server.set_adapter(name)
            server.merge_adapter()
            assert server.merged_adapter == name
            assert (server(x).logits - singles[name](x).logits).abs().max().item() <= 1e-5
            with pytest.raises(RuntimeError, match="unmerge_adapter"):
                server(x, adapter_names=["sql"] * 4)
            server.unmerge_adapter()
            assert server.merged_adapter is None
            assert torch.allclose(server.model.transformer.h[0].attn.c_attn.base_layer.weight, W0, atol=1e-6)
        server.set_adapter("chat")
        server.merge_adapter()
        server.set_adapter("sql")  # switching takes the merged adapter out first
        assert server.merged_adapter is None
        assert (server(x).logits - singles["sql"](x).logits).abs().max().item() <= 1e-6


def test_delete_removes_an_adapter_and_restores_plain_layers(setup):
    base, _, singles = setup
    server = _server(setup)
    server.set_adapter("chat")
    server.delete_adapter("chat")
    assert server.adapters == ["sql", "dora"] and server.active_adapter is None
    assert not isinstance(server.model.transformer.h[0].mlp.c_fc, MultiAdapterLinear)  # only chat touched c_fc
    x = _x()
    with torch.no_grad():
        server.set_adapter("sql")
        assert (server(x).logits - singles["sql"](x).logits).abs().max().item() <= 1e-6
        server.delete_adapter("sql")
        server.delete_adapter("dora")
    assert not server.layers()
    with torch.no_grad():
        assert (server(x).logits - base(x).logits).abs().max().item() <= 1e-6


def _snapshot(server):
    return server.adapters, server.active_adapter, {k: v.clone() for k, v in server.state_dict().items()}


def _unchanged(server, snap):
    adapters, active, state = snap
    now = server.state_dict()
    return server.adapters == adapters and server.active_adapter == active and set(now) == set(state) \
        and all(torch.equal(state[k], v) for k, v in now.items())


def test_unknown_adapter_names_are_refused_and_change_nothing(setup):
    server = _server(setup)
    server.set_adapter("sql")
    snap = _snapshot(server)
    x = _x()
    with pytest.raises(KeyError, match="loaded adapters"):
        server.set_adapter("sqll")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        server(x, adapter_names=["sql", "nope", None, None])
    with pytest.raises(KeyError, match="no adapter named"):
        server.delete_adapter("nope")
    with pytest.raises(ValueError, match="one name"):
        server(x, adapter_names=["sql"])
    assert _unchanged(server, snap)
    assert all(layer.row_adapters is None for layer in server.layers().values())


def test_adapter_for_another_model_is_refused_and_changes_nothing(setup, tmp_path):
    server = _server(setup, names=("sql",))
    other = _trained(toy_gpt2(toy_gpt2_config(n_embd=32)), 0, target_modules=["c_attn"], r=4)
    save_adapter(other, tmp_path / "other")
    snap = _snapshot(server)
    with pytest.raises(AdapterError, match="another shape"):
        server.load_adapter(tmp_path / "other", "other")
    with pytest.raises(ValueError, match="already loaded"):
        server.load_adapter(setup[1] / "sql", "sql")
    with pytest.raises(ValueError, match="adapter_name"):
        server.load_adapter(setup[1] / "chat", "my.chat")
    assert _unchanged(server, snap)


def test_pissa_adapter_needs_conversion(setup, tmp_path):
    base = setup[0]
    save_adapter(add_lora(copy.deepcopy(base), ["c_attn"], r=2, init_lora_weights="pissa"), tmp_path / "p")
    server = _server(setup, names=("sql",))
    snap = _snapshot(server)
    with pytest.raises(AdapterError, match="save_pissa_as_lora"):
        server.load_adapter(tmp_path / "p", "p")
    assert _unchanged(server, snap)


def test_a_model_with_lora_layers_is_refused(setup):
    with pytest.raises(ValueError, match="already carries LoRA"):
        MultiAdapterModel(setup[2]["sql"])


def test_serving_latency_times_every_mode_and_restores_the_server(setup):
    from lora_course.serving import serving_latency

    server = _server(setup)
    server.set_adapter("chat")
    ms = serving_latency(server, _x(rows=2)[:, :4], "sql", ["sql", None], max_new_tokens=2, rounds=1,
                         min_run_time=0.01)
    assert set(ms) == {"base", "merged", "unmerged", "mixed"} and all(v > 0 for v in ms.values())
    assert server.active_adapter == "chat" and server.merged_adapter is None
    with pytest.raises(KeyError):
        serving_latency(server, _x(rows=2), "nope", [None, None])


def test_adapters_saved_by_peft_load_into_the_server(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = setup[0]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                 use_dora=True, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(5))
    peft_model.eval().save_pretrained(str(tmp_path / "peft-dora"))
    server = _server(setup, names=("sql",))
    server.load_adapter(tmp_path / "peft-dora", "peft-dora")
    x = _x(rows=2)
    with torch.no_grad():
        server.set_adapter("peft-dora")
        assert (server(x).logits - peft_model(x).logits).abs().max().item() <= 1e-5
        mixed = server(x, adapter_names=["peft-dora", "sql"]).logits
        assert (mixed[:1] - peft_model(x[:1]).logits).abs().max().item() <= 1e-5


def _same_targets_server(setup):
    """Two names for one adapter folder: every adapted layer holds both."""
    server = _server(setup, ())
    for name in ("a", "b"):
        server.load_adapter(setup[1] / "sql", name)
    return server


def test_mixed_batch_costs_count_one_call_per_adapter_and_layer(setup):
    server = _same_targets_server(setup)
    batches = {"one": ["a"] * 4, "two": ["a", "b"] * 2, "base and one": [None, "a", None, None]}
    costs = mixed_batch_costs(server, _x(rows=4), batches, rounds=1, min_run_time=0.01)
    assert [c["calls per layer"] for c in costs.values()] == [1, 2, 1]
    assert all(c["ms"] > 0 and c["adapter ms"] > 0 for c in costs.values())
    assert server.row_mixer is mixed_rows  # the recording mixer is taken out again


def test_mixed_batch_costs_time_the_forward_and_then_only_its_adapters(setup, monkeypatch):
    """The second timing re-runs each layer's mixer on that batch's own inputs, and no base layer."""
    server, mixed, timed, based = _same_targets_server(setup), [], [], []

    def spy(x, result, rows, output):
        mixed.append(list(rows))
        return mixed_rows(x, result, rows, output)

    def run_once(fn, run, timer):  # instead of timing: what one call of fn runs; 2 "ms" if it ran modules, else 1
        mixed.clear()
        with torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: based.append(m)):
            fn()
        timed.append((list(mixed), len(based)))
        ms = 2.0 if based else 1.0
        based.clear()
        return ms

    monkeypatch.setattr(serving, "median_ms", run_once)
    server.row_mixer = spy
    costs = mixed_batch_costs(server, _x(rows=2), {"two": ["a", "b"], "one": ["a", None]}, rounds=2)
    n_layers = len(server.layers())
    assert len(timed) == 8 and timed[4:] == timed[:4]  # 2 rounds of (forward, adapters) for each batch
    for (forward, adapters), rows in zip([timed[0:2], timed[2:4]], [["a", "b"], ["a", None]]):
        assert forward[0] == adapters[0] == [rows] * n_layers  # both ran each layer's mixing once, on its own rows
        assert forward[1] > n_layers and adapters[1] == 0  # the forward ran the model's modules, the re-run none
    assert costs["one"] == {"calls per layer": 1.0, "ms": 2.0, "adapter ms": 1.0}
    assert costs["two"]["calls per layer"] == 2 and server.row_mixer is spy


def test_mixed_batch_costs_time_by_the_timer_asked_for(setup, monkeypatch):
    server, timers, mixed, median_ms = _same_targets_server(setup), [], [], serving.median_ms
    monkeypatch.setattr(serving, "median_ms", lambda fn, run, timer: timers.append(timer) or median_ms(fn, run, timer))
    costs = mixed_batch_costs(server, _x(rows=2), {"one": ["a"] * 2}, rounds=1, min_run_time=0.01, timer="cpu")
    assert timers == ["cpu", "cpu"] and costs["one"]["ms"] > 0

    def spy(*args):
        return mixed.append(args) or mixed_rows(*args)

    server.row_mixer = spy
    with pytest.raises(ValueError, match="timer"):
        mixed_batch_costs(server, _x(rows=2), {"one": ["a"] * 2}, rounds=1, min_run_time=0.01, timer="gpu")
    assert mixed == [] and timers == ["cpu", "cpu"]  # refused before any forward
    assert server.row_mixer is spy  # and the server's mixer left in place
