"""lora_course.models: GPT-2 loading, the offline fallback, and the shipped tiny-gpt2.

Nothing here touches the network: conftest sets HF_HUB_OFFLINE=1, and each test that
asks for "gpt2" also pins it (monkeypatch) so the hub attempt can only read a cache.
"""

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from lora_course import models
from lora_course.models import (
    GPT2_REVISIONS,
    SHIPPED_MODEL_SHA256,
    load_model,
    sha256_of,
    shipped_heldout_text,
    shipped_model_path,
)

# the keyword arguments of every from_pretrained call on a local folder (cache or shipped)
LOCAL_KWARGS = {"revision": None, "local_files_only": True, "cache_dir": None}
SHIPPED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def spy(monkeypatch):
    """Record every AutoModelForCausalLM.from_pretrained call: (path, kwargs, seconds, ok).

    AutoTokenizer.from_pretrained calls are recorded in `spy.tokenizer_paths`."""

    class Calls(list):
        tokenizer_paths: list

    calls = Calls()
    calls.tokenizer_paths = []
    model_fp = AutoModelForCausalLM.from_pretrained.__func__
    tok_fp = AutoTokenizer.from_pretrained.__func__

    def spying_model(cls, path, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            out = model_fp(cls, path, *args, **kwargs)
        except Exception:
            calls.append((str(path), kwargs, time.perf_counter() - t0, False))
            raise
        calls.append((str(path), kwargs, time.perf_counter() - t0, True))
        return out

    def spying_tokenizer(cls, path, *args, **kwargs):
        calls.tokenizer_paths.append(str(path))
        return tok_fp(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spying_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spying_tokenizer))
    return calls


@pytest.fixture(scope="module")
def shipped():
    return load_model("tiny-gpt2", device="cpu", verbose=False)


def heldout_loss(model, tokenizer, n_tokens=1024, block=256) -> float:
    """Mean next-token cross-entropy (nats) on the first n_tokens of the held-out text."""
    ids = tokenizer(shipped_heldout_text(), return_tensors="pt").input_ids[0, : n_tokens + 1]
    n = (len(ids) - 1) // block
    x = ids[: n * block].view(n, block)  # (n, T)
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def test_shipped_files_are_small_and_complete():
    path = shipped_model_path()
    sizes = {f: (path / f).stat().st_size for f in SHIPPED_FILES}
    assert sum(sizes.values()) < 10 * 1024 * 1024, sizes
    assert (path / "README.md").is_file() and (path / "training_log.txt").is_file()


def test_sha256_matches_the_recorded_one():
    sha = sha256_of(shipped_model_path() / "model.safetensors")
    assert sha == SHIPPED_MODEL_SHA256
    summary = json.loads((shipped_model_path() / "training_summary.json").read_text())
    assert summary["model_safetensors_sha256"] == sha
    assert sha in (shipped_model_path() / "README.md").read_text()


def test_shipped_activation_is_the_gelu_it_was_trained_with(shipped):
    """config.json names the one-kernel tanh GELU; the model was trained with GPT-2's gelu_new, the same function."""
    model, tokenizer, _ = shipped
    assert type(model.transformer.h[0].mlp.act).__name__ == "GELUTanh"
    x = tokenizer(shipped_heldout_text(), return_tensors="pt").input_ids[:, :256].view(2, 128)  # (2, 128)
    gaps = {}
    with torch.no_grad():
        logits = model(input_ids=x).logits  # (2, 128, vocab)
        for activation in ("gelu_new", "gelu"):  # "gelu" is the exact erf GELU, another function
            other = AutoModelForCausalLM.from_pretrained(shipped_model_path(), activation_function=activation)
            gaps[activation] = (other(input_ids=x).logits - logits).abs().max().item()
    assert gaps["gelu_new"] < 1e-4 and gaps["gelu"] > 1e-3, gaps


def test_offline_gpt2_falls_back_through_the_same_from_pretrained(offline, spy, capsys, monkeypatch):
    lookups = []
    real_lookup = models._cached_snapshot

    def timed_lookup(*args):
        t0 = time.perf_counter()
        try:
            return real_lookup(*args)
        finally:
            lookups.append((args, time.perf_counter() - t0))

    monkeypatch.setattr(models, "_cached_snapshot", timed_lookup)
    model, tokenizer, info = load_model("gpt2", fast=False, device="cpu")
    # first the learner's path: the pinned gpt2 commit looked up in the cache, a miss ...
    (repo, revision, _), seconds = lookups[0]
    assert repo == "openai-community/gpt2" and revision == GPT2_REVISIONS[repo]
    assert seconds < 5, "the offline cache miss must be immediate, without retries"
    # ... then the same from_pretrained call a cached gpt2 gets, on the shipped folder
    assert [(c[0], c[1], c[3]) for c in spy] == [(str(shipped_model_path()), LOCAL_KWARGS, True)]
    assert spy.tokenizer_paths == [str(shipped_model_path())]
    assert isinstance(model, GPT2LMHeadModel)
    assert info.is_fallback and info.is_shipped and info.name == "tiny-gpt2"
    assert "HF_HUB_OFFLINE" in info.fallback_reason and "cache" in info.fallback_reason
    assert info.revision is None and info.n_params == sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert "tiny-gpt2" in printed and "instead of gpt2" in printed
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_fast_mode_uses_the_shipped_model_without_trying_the_hub(spy):
    _, _, info = load_model("gpt2", fast=True, device="cpu", verbose=False)
    assert [c[0] for c in spy] == [str(shipped_model_path())]
    assert info.is_fallback and "fast mode" in info.fallback_reason


def test_no_network_falls_back_at_once_without_download_retries(monkeypatch, spy):
    # downloads allowed (no offline flag) but the Hub unreachable: the probe must stop the
    # download attempt, whose retries take over a minute, and say why.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("lora_course.models._hub_reachable", lambda timeout=2.0: False)
    _, _, info = load_model("gpt2", fast=False, device="cpu", verbose=False)
    assert [(c[0], c[1]["local_files_only"]) for c in spy] == [(str(shipped_model_path()), True)]
    assert "cannot be reached" in info.fallback_reason


def test_cached_gpt2_is_loaded_from_the_cache_not_the_fallback(offline, spy, tmp_path):
    # A Hugging Face cache laid out as the hub writes it, holding (for the test) the
    # shipped files under the pinned gpt2 commit: load_model must take it, not fall back.
    sha = GPT2_REVISIONS["openai-community/gpt2"]
    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in SHIPPED_FILES:
        shutil.copy(shipped_model_path() / f, snapshot / f)
    _, _, info = load_model("gpt2", fast=False, device="cpu", cache_dir=tmp_path, verbose=False)
    assert info.source == "hub-cache" and not info.is_fallback
    assert info.name == "openai-community/gpt2" and info.revision == sha
    # the cached snapshot folder goes through the very call the shipped folder gets
    assert [(c[0], c[1]) for c in spy] == [(str(snapshot), LOCAL_KWARGS)]
    assert info.path == str(snapshot)


def test_plain_transformers_loads_the_shipped_model(shipped):
    model, _, info = shipped
    assert info.source == "shipped" and not info.is_fallback
    plain = AutoModelForCausalLM.from_pretrained(shipped_model_path())
    tok = AutoTokenizer.from_pretrained(shipped_model_path())
    assert isinstance(plain, GPT2LMHeadModel)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    text = "Return the number of items in a list."
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE round-trips
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is None  # as GPT-2's
    assert plain.config.eos_token_id == tok.eos_token_id


def test_shipped_model_has_learned_language(shipped):
    model, tokenizer, _ = shipped
    assert len(shipped_heldout_text()) > 10_000
    uniform = math.log(model.config.vocab_size)
    loss = heldout_loss(model, tokenizer)
    assert loss < uniform - 2.0, (loss, uniform)  # perplexity over 7x below the uniform guess
    # the same measurement on an untrained model of the same shape sits at the uniform guess
    torch.manual_seed(0)
    untrained = GPT2LMHeadModel(model.config).eval()
    assert heldout_loss(untrained, tokenizer) > uniform - 0.5


def repeated_passage_losses(model, tokenizer) -> tuple[float, float]:
    """The pretraining script's copy probe, on 16 held-out passages of 32 tokens."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_gpt2.py"
    spec = importlib.util.spec_from_file_location("pretrain_tiny_gpt2", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids = torch.tensor(tokenizer(shipped_heldout_text(), verbose=False)["input_ids"])
    return script.repeated_passage_losses(model, ids, span=32, n=16)


def test_shipped_model_copies_from_its_context(shipped):
    """Notebook 06's LoRA relies on it: the second copy of a passage is easier than the first."""
    model, tokenizer, _ = shipped
    first, second = repeated_passage_losses(model, tokenizer)
    assert second < first - 0.15, (first, second)  # measured: 6.06 -> 5.75 nats
    torch.manual_seed(0)
    first, second = repeated_passage_losses(GPT2LMHeadModel(model.config).eval(), tokenizer)
    assert abs(first - second) < 0.1, (first, second)  # an untrained model cannot copy


def test_local_directory_loads_as_local(spy):
    _, _, info = load_model(str(shipped_model_path()), device="cpu", verbose=False)
    assert info.source == "local" and not info.is_fallback and info.summary().startswith("Loaded ")
    assert [c[0] for c in spy] == [str(shipped_model_path())]


def test_bad_names_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'gpt-3'.*'gpt2'"):
        load_model("gpt-3")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(TypeError, match="model name or a directory"):
        load_model(124)
