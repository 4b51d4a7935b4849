"""Pretrain the small GPT-2 that ships inside `lora_course/assets/tiny-gpt2/`.

The course must run offline, so where a learner cannot get real GPT-2 weights,
`lora_course.models.load_model` falls back to this model. It is a real (if small)
pretrained language model, trained here from scratch on English text that ships with
Python itself, so nothing is downloaded:

* the documentation topics of the Python docs (`pydoc_data.topics`, about 465K chars);
* the docstrings (module, class, function) of the standard library's `.py` files,
  read with `ast.get_docstring`, test suites and site-packages left out.

Documents are deduplicated, and about 5% of them (chosen by a hash of their text, so
the split does not depend on order) are held out for validation. A byte-level BPE
tokenizer (GPT-2's scheme) is trained with the `tokenizers` library and saved so that
`AutoTokenizer.from_pretrained(dir)` loads it as a `GPT2TokenizerFast`. The model is a
`transformers.GPT2LMHeadModel` saved with `save_pretrained`, so it loads through the
same `from_pretrained` path as real GPT-2.

A quarter of the training windows (`--repeat-fraction`) tile a passage of the text, so
the model is pushed toward copying from its context, the skill real GPT-2 gets from web-scale text
and LoRA on attention relies on to learn notebook 06's task (`sample_batch`). The log
tracks it as the *copy loss*: the loss on the second copy of a repeated passage.

Reproduce (the exact command used for the shipped model is recorded in its README.md):

    python scripts/pretrain_tiny_gpt2.py --out lora_course/assets/tiny-gpt2

The corpus depends on the Python version's standard library, so the README records the
Python version and a sha256 of the corpus; with the same Python, torch and seed the run
repeats. On 2 (shared) CPU cores it took the time recorded in the README.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- corpus
def pydoc_documents() -> list[str]:
    """The Python documentation topics that ship with CPython (pydoc_data)."""
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def stdlib_docstrings(min_chars: int = 64) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip.intersection(rel.parts) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars:
                    docs.append(doc.strip())
    return docs


def build_corpus(val_fraction: float = 0.05) -> dict:
    """Deduplicated documents, split into train/val by a hash of each document's text."""
    raw = pydoc_documents() + stdlib_docstrings()
    seen, docs = set(), []
    for d in raw:
        d = d.replace("\r\n", "\n").strip()
        if d and d not in seen:
            seen.add(d)
            docs.append(d)
    train, val = [], []
    for d in docs:
        h = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:8], "big")
        (val if (h % 10_000) < val_fraction * 10_000 else train).append(d)
    joined = "\n\x00".join(docs).encode("utf-8")
    return {
        "train": train,
        "val": val,
        "n_raw": len(raw),
        "n_docs": len(docs),
        "chars_train": sum(map(len, train)),
        "chars_val": sum(map(len, val)),
        "sha256": hashlib.sha256(joined).hexdigest(),
    }


# -------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out: Path, max_length: int):
    """Train a byte-level BPE and save it in transformers' format (GPT2TokenizerFast)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                            unk_token=EOS, add_prefix_space=False, model_max_length=max_length)
    tok.save_pretrained(out)
    return tok


def encode(tok, docs: list[str]) -> torch.Tensor:
    """One long stream of token ids: each document followed by <|endoftext|>."""
    ids = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------ batches
def sample_batch(ids: torch.Tensor, batch: int, block: int, repeat_fraction: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of `block + 1` tokens -> (x, y), each (batch, block).

    A `repeat_fraction` of the windows are *repeated passages*: a random span of the
    corpus (8 to block/2 tokens) tiled to fill the window. The second copy is easy
    only for a model that looks back and copies (induction heads, Olsson et al., 2022).
    Real GPT-2 picks that skill up from web-scale text; the course's first tiny model,
    400 steps on plain text, had not, and LoRA on c_attn learned nothing of notebook
    06's task (which copies fields from the prompt) on it.
    """
    starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=gen)
    repeat = torch.rand(batch, generator=gen) < repeat_fraction
    spans = torch.randint(8, block // 2 + 1, (batch,), generator=gen)
    rows = []
    for s, r, span in zip(starts.tolist(), repeat.tolist(), spans.tolist()):
        if r:
            piece = ids[s : s + span]
            rows.append(piece.repeat(-(-(block + 1) // span))[: block + 1])
        else:
            rows.append(ids[s : s + block + 1])
    window = torch.stack(rows)  # (batch, block + 1)
    return window[:, :-1], window[:, 1:]


@torch.no_grad()
def repeated_passage_losses(model, stream: torch.Tensor, span: int = 32, n: int = 64) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of `n` `span`-token passages of
    `stream`, each fed to the model twice in a row.

    A model that copies from its context finds the second copy easier than the first;
    one that cannot finds them equally hard. The second number is the log's *copy loss*.
    """
    model.eval()
    stride = max(1, (len(stream) - span) // n)
    x = torch.stack([stream[i : i + span].repeat(2) for i in range(0, stride * n, stride)])  # (n, 2 span)
    logits = model(input_ids=x).logits  # (n, 2 span, V)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(x), -1)  # (n, 2 span - 1)
    model.train()
    return ce[:, : span - 1].mean().item(), ce[:, span:].mean().item()


def copy_loss(model, stream: torch.Tensor) -> float:
    """Mean loss inside the second copy of repeated passages (see `repeated_passage_losses`)."""
    return repeated_passage_losses(model, stream)[1]


# ------------------------------------------------------------------------------ train
@torch.no_grad()
def evaluate(model, stream: torch.Tensor, block: int, batch: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping blocks of `stream`."""
    model.eval()
    n = (len(stream) - 1) // block
    x = stream[: n * block].view(n, block)
    y = stream[1 : n * block + 1].view(n, block)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i : i + batch]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum")
        total += loss.item()
        count += y[i : i + batch].numel()
    model.train()
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `min_ratio * lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="lora_course/assets/tiny-gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block", type=int, default=256, help="context length = n_positions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--repeat-fraction", type=float, default=0.25,
                   help="share of training windows that tile a repeated passage (pushes toward copying)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="validation tokens used for the periodic evals (the final eval uses all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heldout-chars", type=int, default=40_000,
                   help="size of the validation sample shipped as heldout.txt")
    args = p.parse_args(argv)

    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        tqdm.write(msg)
        log_lines.append(msg)

    t0 = time.time()
    corpus = build_corpus()
    log(f"corpus: {corpus['n_docs']} unique documents ({corpus['n_raw']} before dedup), "
        f"{len(corpus['train'])} train / {len(corpus['val'])} val, "
        f"{corpus['chars_train']:,} / {corpus['chars_val']:,} chars, sha256 {corpus['sha256'][:16]}")

    tok = train_tokenizer(corpus["train"], args.vocab_size, out, args.block)
    tok = GPT2TokenizerFast.from_pretrained(out)  # what learners will load
    train_ids = encode(tok, corpus["train"])
    val_ids = encode(tok, corpus["val"])
    log(f"tokenizer: byte-level BPE, vocab {len(tok)}, eos {tok.eos_token!r} = id {tok.eos_token_id}; "
        f"{len(train_ids):,} train / {len(val_ids):,} val tokens "
        f"({corpus['chars_train'] / len(train_ids):.2f} chars/token)")

    config = GPT2Config(
        vocab_size=len(tok), n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: GPT2LMHeadModel {n_params:,} parameters; "
        f"n_embd {args.n_embd}, n_layer {args.n_layer}, n_head {args.n_head}, n_positions {args.block}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    uniform = math.log(len(tok))
    log(f"uniform guess: ln({len(tok)}) = {uniform:.3f} nats/token; "
        f"initial val loss {evaluate(model, val_ids, args.block):.3f}, copy loss {copy_loss(model, val_ids):.3f}")

    history = []
    model.train()
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5)
    running = None
    t_train = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = sample_batch(train_ids, args.batch, args.block, args.repeat_fraction, gen)  # (B, T)
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, val_ids[: args.eval_tokens + 1], args.block)
            copy = copy_loss(model, val_ids)
            elapsed = time.time() - t_train
            history.append({"step": step + 1, "train_loss_ema": round(running, 4),
                            "val_loss_subset": round(val, 4), "copy_loss": round(copy, 4),
                            "seconds": round(elapsed, 1)})
            log(f"step {step + 1:5d}  train {running:.3f}  val[:{args.eval_tokens}] {val:.3f}  copy {copy:.3f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {elapsed:6.0f}s  "
                f"{(step + 1) * args.batch * args.block / elapsed:,.0f} tok/s")

    final_train = evaluate(model, train_ids[: len(val_ids) * 4], args.block)
    final_val = evaluate(model, val_ids, args.block)
    final_copy = copy_loss(model, val_ids)
    log(f"final: train loss {final_train:.4f} (first {len(val_ids) * 4:,} train tokens), "
        f"val loss {final_val:.4f}, copy loss {final_copy:.4f}, uniform {uniform:.4f}; "
        f"train time {time.time() - t_train:.0f}s")

    # Trained with GPT-2's tanh GELU written out in elementwise steps ("gelu_new"); saved to run it as one
    # PyTorch kernel ("gelu_pytorch_tanh"), the same function (the logits agree to about 1e-5) in fewer, faster steps.
    model.config.activation_function = "gelu_pytorch_tanh"
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    (out / "heldout.txt").write_text(
        held_out_sample(corpus["val"], args.heldout_chars), encoding="utf-8")

    samples = []
    model.eval()
    for i, prompt in enumerate(["The list", "This function returns", "An exception is raised when"]):
        torch.manual_seed(args.seed + i)
        ids = tok(prompt, return_tensors="pt").input_ids
        out_ids = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=40,
                                 temperature=0.8, pad_token_id=tok.eos_token_id)
        samples.append(tok.decode(out_ids[0], skip_special_tokens=True))
        log(f"sample {i}: {samples[-1]!r}")

    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    summary = {
        "command": command, "seed": args.seed, "python": platform.python_version(),
        "torch": torch.__version__, "args": vars(args),
        "corpus": {k: v for k, v in corpus.items() if k not in ("train", "val")},
        "tokens": {"train": len(train_ids), "val": len(val_ids)},
        "n_params": n_params, "uniform_loss": round(uniform, 4),
        "final_train_loss": round(final_train, 4), "final_val_loss": round(final_val, 4),
        "final_copy_loss": round(final_copy, 4),
        "model_safetensors_sha256": sha, "history": history, "samples": samples,
        "total_seconds": round(time.time() - t0, 1),
    }
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    (out / "README.md").write_text(model_card(summary, config, sizes), encoding="utf-8")
    log(f"saved to {out}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))


def held_out_sample(val_docs: list[str], max_chars: int) -> str:
    """Whole validation documents, joined by blank lines, up to `max_chars`."""
    picked, n = [], 0
    for d in val_docs:
        if n + len(d) > max_chars:
            continue
        picked.append(d)
        n += len(d) + 2
    return "\n\n".join(picked) + "\n"


def model_card(s: dict, config, sizes: dict) -> str:
    a = s["args"]
    c = s["corpus"]
    rows = "\n".join(f"| {h['step']} | {h['train_loss_ema']:.3f} | {h['val_loss_subset']:.3f} | {h['copy_loss']:.3f} | {h['seconds']:.0f} |"
                     for h in s["history"])
    files = "\n".join(f"| `{k}` | {v:,} |" for k, v in sizes.items())
    samples = "\n".join(f"- `{t!r}`" for t in s["samples"])
    return f"""# tiny-gpt2: the small GPT-2 that ships with the course

A `GPT2LMHeadModel` pretrained from scratch on English documentation text that ships
with Python, so the course can run offline. `lora_course.models.load_model("gpt2")`
falls back to it (through the same `from_pretrained` code path) when real GPT-2 weights
are not available or fast mode is on. It is a stand-in for GPT-2, not a good language
model: it was trained for {s['total_seconds'] / 60:.0f} minutes on two CPU cores, so its samples are
Python-docs words and phrases, not fluent sentences.

A quarter of its training windows repeat a passage of the text, to push it toward
copying from its context, a skill real GPT-2 learns from web-scale text and that LoRA on
attention leans on in notebook 06, whose task copies fields from the prompt. It has
begun to learn it: on the second copy of a repeated validation passage its loss is
**{s['final_copy_loss']:.2f}** nats/token against **{s['final_val_loss']:.2f}** on ordinary text (a model with fully formed
induction heads would be far lower). The first model shipped with the course (400 steps,
no repeated passages) had not: LoRA r=8 on attention could not learn notebook 06's task
on it at all, while on this one it can.

## Loading it

```python
from lora_course.models import load_model, shipped_model_path
model, tokenizer, info = load_model("tiny-gpt2")  # or load_model("gpt2") offline / in fast mode
# the same thing with plain transformers:
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(shipped_model_path())
tokenizer = AutoTokenizer.from_pretrained(shipped_model_path())
```

## Model

- Architecture: GPT-2 (`transformers.GPT2LMHeadModel`), {s['n_params']:,} parameters,
  `n_embd={config.n_embd}`, `n_layer={config.n_layer}`, `n_head={config.n_head}`,
  `n_positions={config.n_positions}`, `vocab_size={config.vocab_size}`, tied input/output
  embeddings, dropout 0. Weights stored in float32 (`model.safetensors`).
- Activation: trained with GPT-2's `gelu_new`; `config.json` names `gelu_pytorch_tanh`, the
  same tanh GELU as one PyTorch kernel (the logits agree to about 1e-5), which fine-tunes faster.
- sha256 of `model.safetensors`: `{s['model_safetensors_sha256']}`
- Tokenizer: byte-level BPE (GPT-2's scheme) trained with the `tokenizers` library,
  vocab {config.vocab_size}, saved by `GPT2TokenizerFast.save_pretrained` (`tokenizer.json`,
  `tokenizer_config.json`); `AutoTokenizer.from_pretrained` loads it (as `GPT2Tokenizer`,
  the tokenizers-backed class, in transformers 5), `model_max_length` = n_positions. `<|endoftext|>` (id {config.eos_token_id}) is the bos, eos and
  unk token, as in GPT-2. Like GPT-2, the saved tokenizer has **no pad token**;
  `load_model` sets `pad_token = eos_token` on whichever tokenizer it loads (mask
  padding with the attention mask / label -100).

## Training data

- Python {s['python']}'s documentation topics (`pydoc_data.topics`) plus the docstrings
  (module, class, function; at least 64 chars) of its standard library's `.py` files
  (test suites and site-packages left out), read with `ast.get_docstring`.
- {c['n_raw']:,} documents before, {c['n_docs']:,} after exact deduplication;
  corpus sha256 `{c['sha256']}`.
- Split by a hash of each document's text: {c['chars_train']:,} train chars
  ({s['tokens']['train']:,} tokens), {c['chars_val']:,} validation chars
  ({s['tokens']['val']:,} tokens). `heldout.txt` is a sample of whole validation
  documents (never trained on) for tests and the forgetting measurement.

## Training

- Command: `{s['command']}`
- Seed {s['seed']}, torch {s['torch']}, {a['threads']} CPU threads. AdamW (betas 0.9, 0.95,
  weight decay {a['weight_decay']} on matrices), peak lr {a['lr']}, {a['warmup']} warm-up steps,
  cosine decay to 10%, gradient clipping 1.0, {a['steps']} steps of {a['batch']} random
  windows of {a['block']} tokens, {100 * a['repeat_fraction']:.0f}% of them a passage of 8 to {a['block'] // 2} tokens tiled to fill
  the window, {s['total_seconds'] / 60:.0f} minutes in all.

| step | train loss (EMA) | val loss (first {a['eval_tokens']:,} val tokens) | copy loss | seconds |
|---:|---:|---:|---:|---:|
{rows}

**Final: train loss {s['final_train_loss']:.3f}, validation loss {s['final_val_loss']:.3f}
nats/token, against {s['uniform_loss']:.3f} for a uniform guess (ln {config.vocab_size}).** Copy loss (the
mean loss on the second copy of 64 repeated 32-token validation passages):
{s['final_copy_loss']:.3f}.
The full log is `training_log.txt`; every number above is in `training_summary.json`.

## Samples (top-k 40, temperature 0.8, seeds {s['seed']}, {s['seed'] + 1}, {s['seed'] + 2})

{samples}

## Files

| file | bytes |
|---|---:|
{files}
"""


if __name__ == "__main__":
    main()
