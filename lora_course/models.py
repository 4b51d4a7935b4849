"""Loading GPT-2, with an offline fallback to the small GPT-2 that ships in the package.

`load_model("gpt2")` loads real GPT-2 (124M) through `transformers`, from the learner's
Hugging Face cache or, when downloads are allowed, from the Hub at a pinned commit.
Where those weights cannot be had (offline with no cache, no network, or fast mode), it
loads `tiny-gpt2`, a 1.87M-parameter GPT-2 pretrained by `scripts/pretrain_tiny_gpt2.py`
on Python's own documentation and shipped in `lora_course/assets/tiny-gpt2/` in
transformers' format. Both go through the *same* code path, `_from_pretrained`:
`AutoModelForCausalLM.from_pretrained` + `AutoTokenizer.from_pretrained`, so everything
downstream (LoRA on `c_attn`, training, generation) is identical. The function prints
one line saying which model it loaded and why, and returns the same facts as `ModelInfo`.

    model, tokenizer, info = load_model("gpt2")
    print(info.name, info.fallback_reason)
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch

from .runtime import get_device, is_fast_mode

__all__ = [
    "GPT2_REVISIONS",
    "SHIPPED_MODEL_NAME",
    "SHIPPED_MODEL_SHA256",
    "ModelInfo",
    "load_model",
    "shipped_model_path",
    "shipped_heldout_text",
    "sha256_of",
    "toy_gpt2_config",
    "toy_gpt2",
]

# Hub ids of the models `load_model` accepts by name, with the commit each is pinned to.
# gpt2: the `main` commit of openai-community/gpt2 (weights unchanged since 2019's
# release; the same sha appears in many public projects that pin it). gpt2-medium is
# not pinned (None = the repo's `main`): we could not verify its sha offline.
GPT2_REVISIONS: dict[str, str | None] = {
    "openai-community/gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "openai-community/gpt2-medium": None,
}
_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
}
SHIPPED_MODEL_NAME = "tiny-gpt2"
# sha256 of lora_course/assets/tiny-gpt2/model.safetensors, as recorded in its README.md.
SHIPPED_MODEL_SHA256 = "88daaae79d107ffc1b52d52b4a30cc0f2ee3e1e936f6b508d4e0a8e7de206ab9"


@dataclass(frozen=True)
class ModelInfo:
    """What `load_model` loaded, from where, and why."""

    requested: str  # the name or path the caller asked for
    name: str  # what was loaded: a hub id, "tiny-gpt2", or a local path
    source: str  # "hub-cache", "hub-download", "local", or "shipped"
    path: str  # what `from_pretrained` was called with (a cached hub model: its snapshot folder)
    revision: str | None  # pinned hub commit, None for local/shipped models
    fallback_reason: str | None  # why the shipped model was used instead; None if not
    n_params: int
    device: str
    load_seconds: float

    @property
    def is_fallback(self) -> bool:
        """True when the caller asked for another model and got the shipped one."""
        return self.fallback_reason is not None

    @property
    def is_shipped(self) -> bool:
        return self.source == "shipped"

    def summary(self) -> str:
        """One plain sentence: which model, how big, and why."""
        what = f"{self.name} ({self.n_params / 1e6:.2f}M parameters, {self.source}"
        what += f" @ {self.revision[:12]})" if self.revision else ")"
        if self.fallback_reason:
            return f"Loaded {what} instead of {self.requested}: {self.fallback_reason}"
        return f"Loaded {what}."


def shipped_model_path() -> Path:
    """Directory of the small GPT-2 that ships with the package (transformers format)."""
    return Path(str(resources.files("lora_course") / "assets" / SHIPPED_MODEL_NAME))


def shipped_heldout_text() -> str:
    """Validation documents the shipped model never trained on (about 40K chars of
    Python documentation); use it to measure language-modelling loss or forgetting."""
    return (shipped_model_path() / "heldout.txt").read_text(encoding="utf-8")


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hub_offline() -> bool:
    """True when the Hugging Face libraries are told not to touch the network."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Can a TCP connection to the Hub be opened within `timeout` seconds? (Behind a
    proxy we cannot tell, so we say yes and let the download try.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection(_hub_endpoint(), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir=None) -> str:
    """The folder of `repo_id@revision` in the Hugging Face cache; OSError if not there.

    Resolving the folder first (instead of `from_pretrained(repo_id, local_files_only=True)`)
    guarantees no request at all: transformers still probes the Hub for optional files
    such as adapter_config.json unless HF_HUB_OFFLINE was set before it was imported."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)


def _from_pretrained(path: str, *, revision: str | None = None, local_files_only: bool = False,
                     cache_dir: str | os.PathLike | None = None):
    """The one loading path for every model: hub ids, local directories, the shipped one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"revision": revision, "local_files_only": local_files_only, "cache_dir": cache_dir}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weights-from-disk bar; a hub download keeps its own bars
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _resolve(name: str) -> tuple[str, str]:
    """('hub', repo_id), ('local', path) or ('shipped', path); clear error otherwise."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"load_model(name=...) takes a model name or a directory, got {type(name).__name__}")
    text = os.fspath(name)
    if text in (SHIPPED_MODEL_NAME, "shipped"):
        return "shipped", str(shipped_model_path())
    repo = _ALIASES.get(text, text)
    if repo in GPT2_REVISIONS:
        return "hub", repo
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but has no config.json; point load_model at a "
                             "folder written by `model.save_pretrained(...)` (config.json + weights + tokenizer).")
        return "local", str(path)
    known = ", ".join(repr(k) for k in [*_ALIASES, *GPT2_REVISIONS, SHIPPED_MODEL_NAME])
    raise ValueError(f"Unknown model {text!r}: use one of {known}, or the path of a local directory "
                     "saved with save_pretrained (no such directory exists).")


def _short(err: BaseException) -> str:
    """'ErrorType: first sentence of the message', for a one-line reason."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first.split('. ')[0].rstrip('.')}"[:160]


def load_model(name: str = "gpt2", *, revision: str | None = None, device: str | torch.device | None = None,
               fast: bool | None = None, allow_download: bool | None = None,
               cache_dir: str | os.PathLike | None = None, verbose: bool = True):
    """Load a GPT-2 and its tokenizer; fall back to the shipped tiny-gpt2 when it can't be had.

    Args:
        name: "gpt2" (124M), "gpt2-medium", their "openai-community/..." ids, "tiny-gpt2"
            (the shipped model), or a local directory written by `save_pretrained`.
        revision: hub commit to load; defaults to the pinned one in `GPT2_REVISIONS`.
        device: where to put the model; default CUDA, then Apple MPS, then CPU.
        fast: use the shipped model instead of a hub model (default: `is_fast_mode()`);
            a local directory or "tiny-gpt2" is loaded as asked in either mode.
        allow_download: may the Hub be contacted when the model is not in the local cache?
            Default: yes, unless `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set. With it off,
            only the cache is read, so a miss falls back at once (no retries or timeouts);
            with it on, a 2-second connection probe comes first, so that a machine with no
            network falls back at once too instead of waiting out the Hub client's retries.
        cache_dir: Hugging Face cache to read (default: the usual `~/.cache/huggingface/hub`).
        verbose: print the one-line summary of what was loaded and why.

    Returns:
        (model, tokenizer, info): a `GPT2LMHeadModel` in eval mode on `device`, its
        tokenizer with `pad_token` set to `eos_token` when it had none (GPT-2 has none),
        and a `ModelInfo`.
    """
    kind, target = _resolve(name)
    fast = is_fast_mode() if fast is None else fast
    if allow_download is None:
        allow_download = not _hub_offline()
    device = get_device() if device is None else torch.device(device)

    t0 = time.perf_counter()
    loaded, reason, rev = None, None, None
    if kind == "hub":
        rev = revision if revision is not None else GPT2_REVISIONS[target]
        if fast:
            reason = "fast mode is on (LORA_COURSE_FAST=1), which uses the small shipped model"
        else:
            loaded, source, loaded_from, reason = _from_hub(target, rev, cache_dir, allow_download)
        if loaded is None:  # fall back to the shipped model, through the same path
            kind, target, rev = "shipped", str(shipped_model_path()), None
    if loaded is None:
        loaded = _from_pretrained(target, local_files_only=True)
        source, loaded_from = kind, target
    model, tokenizer = _ready(*loaded, device)
    info = ModelInfo(
        requested=os.fspath(name),
        name=SHIPPED_MODEL_NAME if source == "shipped" else target,
        source=source,
        path=loaded_from,
        revision=rev,
        fallback_reason=reason,
        n_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        load_seconds=round(time.perf_counter() - t0, 2),
    )
    if verbose:
        print(info.summary())
    return model, tokenizer, info


def _from_hub(target: str, rev: str, cache_dir, allow_download: bool):
    """(loaded or None, source, where from, why not): the learner's cache first (no network at all), then a
    download when allowed and the hub answers."""
    errors, source, loaded_from = [], None, None
    try:
        snapshot = _cached_snapshot(target, rev, cache_dir)
        return _from_pretrained(snapshot, local_files_only=True), "hub-cache", snapshot, None
    except (OSError, ValueError) as err:  # not cached, partly cached, or bad revision
        errors.append(_short(err))
    if not allow_download:
        blocked = "downloads are off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE or allow_download=False)"
    elif not _hub_reachable():  # no network: skip huggingface_hub's retries (over a minute)
        blocked = f"{_hub_endpoint()[0]} cannot be reached (no network?)"
    else:
        try:
            return _from_pretrained(target, revision=rev, cache_dir=cache_dir), "hub-download", target, None
        except (OSError, ValueError) as err:
            errors.append(_short(err))
        blocked = "the download failed"
    reason = f"{target}@{(rev or 'main')[:12]} is not in the local Hugging Face cache and {blocked} [{errors[-1]}]"
    return None, source, loaded_from, reason


def _ready(model, tokenizer, device):
    """Name the loss, give the tokenizer a pad token (GPT-2 has none: EOS), move to `device`, eval mode."""
    _name_the_loss(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- small random GPT-2s

def toy_gpt2_config(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = 256,
                    n_positions: int = 64, **overrides):
    """A small `GPT2Config` to train on a CPU in seconds, with dropout off.

    No dropout makes every run deterministic and is what `memory.gpt2_activation_bytes`
    counts (dropout masks would add a little). Token 0 doubles as BOS, EOS and padding.
    """
    from transformers import GPT2Config

    return GPT2Config(**{
        "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "vocab_size": vocab_size,
        "n_positions": n_positions, "bos_token_id": 0, "eos_token_id": 0,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides,
    })


def toy_gpt2(config=None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised `GPT2LMHeadModel` of `config` (default `toy_gpt2_config()`), in eval mode.

    The same seed gives the same weights, so two calls give two copies of one "pretrained"
    base model. The caller's random state is left as it was.
    """
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _name_the_loss(GPT2LMHeadModel(config if config is not None else toy_gpt2_config()).eval())


def _name_the_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Tell transformers that GPT-2's LM head uses the causal-LM loss (its class name does not say
    "ForCausalLM", so transformers would guess that loss and warn about it)."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model
