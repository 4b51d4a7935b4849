"""The task's data: disjoint splits of records, training batches, and greedy decoding to score a model.

The records themselves, their sentences and the metric live in `tasks.py` (importable from
here too). Splits are disjoint by construction: a task small enough to enumerate is
shuffled once with a fixed seed and cut into test, validation and training records; a
larger one (`ApiRecord`, about 54 million records) is sampled without replacement. The
loss sees the target sentence only; decoding is greedy, so a score reproduces.
"""

from __future__ import annotations

import math
import random
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .tasks import (  # noqa: F401  (the tasks' names, importable from here too)
    API_FIELD_NAMES,
    API_FIELD_VALUES,
    ARGS_IN_WORDS,
    FIELD_NAMES,
    FIELD_VALUES,
    TASKS,
    ApiRecord,
    Record,
    TaskRecord,
    exact_match,
    format_prompt,
    format_target,
    slot_accuracy,
    slot_accuracy_by_field,
    slot_phrases,
    slots_realized,
    task_record,
)
from .validate import check_int

__all__ = ["TaskSplits", "n_records", "record_at", "RecordSet", "make_splits", "token_ids", "encode_example", "collate",
           "batches", "shard_batches", "generate", "evaluate_task", "TaskRecord", "Record", "ApiRecord", "TASKS",
           "format_prompt", "format_target", "slot_phrases", "slots_realized", "slot_accuracy", "exact_match",
           "slot_accuracy_by_field", "FIELD_VALUES", "FIELD_NAMES", "API_FIELD_VALUES", "API_FIELD_NAMES",
           "ARGS_IN_WORDS"]


def n_records(task: str = "basic") -> int:
    """How many different records exist (basic: 36*6*4 = 864; api: about 54 million)."""
    return math.prod(len(values) for values in task_record(task).VALUES.values())


def record_at(index: int, task: str = "basic"):
    """The record with this index (0 <= index < n_records(task)), read as mixed-radix digits."""
    cls = task_record(task)
    field_values = cls.VALUES
    if not 0 <= index < n_records(task):
        raise IndexError(f"record index {index} out of range [0, {n_records(task)})")
    values = []
    for k in reversed(tuple(field_values)):
        index, digit = divmod(index, len(field_values[k]))
        values.append(field_values[k][digit])
    return cls(*reversed(values))


class RecordSet(Sequence):
    """A split: a sequence of records stored as indices, decoded on access."""

    def __init__(self, indices: Sequence[int], task: str = "basic"):
        task_record(task)
        self.indices = tuple(int(i) for i in indices)
        self.task = task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return RecordSet(self.indices[item], self.task)
        return record_at(self.indices[item], self.task)

    def __repr__(self) -> str:
        return f"RecordSet({len(self)} records)"


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint record sets: `train`, `validation`, `test`."""

    train: RecordSet
    validation: RecordSet
    test: RecordSet


def make_splits(n_validation: int = 128, n_test: int = 128, seed: int = 0, *, task: str = "basic",
                n_train: int | None = None) -> TaskSplits:
    """Disjoint test, validation and training records, drawn with `seed`.

    basic: every record is shuffled once, test and validation are cut off, the rest (or
    its first `n_train`) trains. api: `n_test + n_validation + n_train` distinct records
    (n_train default 4096) are drawn from the 54 million without replacement.
    """
    n = n_records(task)
    check_int("n_validation", n_validation, minimum=1)
    check_int("n_test", n_test, minimum=1)
    if n_train is not None:
        check_int("n_train", n_train, minimum=1)
    if n_validation + n_test + (n_train or 1) > n:
        raise ValueError(
            f"n_validation + n_test = {n_validation + n_test} leaves no training records "
            f"(there are {n}); ask for fewer"
        )
    held = n_test + n_validation
    if task_record(task).ENUMERATED:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        train_ids = order[held:] if n_train is None else order[held : held + n_train]
    else:
        order = random.Random(seed).sample(range(n), held + (4096 if n_train is None else n_train))
        train_ids = order[held:]
    return TaskSplits(
        train=RecordSet(train_ids, task),
        validation=RecordSet(order[n_test:held], task),
        test=RecordSet(order[:n_test], task),
    )


_TOKEN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its settings, {text: ids})


def _encoding_settings(tokenizer) -> tuple:
    """What decides a tokenizer's encoding besides its trained vocabulary: size, added tokens, BOS/EOS, and for
    a fast tokenizer its normalizer, pre-tokenizer and post-processor (about 8 us for the shipped tokenizer)."""
    parts = [len(tokenizer), str(getattr(tokenizer, "added_tokens_decoder", None))]
    parts += [getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token", "split_special_tokens")]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for name in ("normalizer", "pre_tokenizer", "post_processor"):
        part = getattr(backend, name, None)
        parts.append(None if part is None else part.__getstate__())
    return tuple(parts)


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`tokenizer(text)["input_ids"]` of each text, each text encoded once per tokenizer.

    Every seed's training batches repeat across methods and learning rates, and scoring
    re-reads the same prompts, so encodings are remembered while the tokenizer lives and
    forgotten when a setting that decides them changes (add_tokens, add_eos_token, a new
    pre-tokenizer, ...). Swapping the trained model for another of the same size in place
    (`backend_tokenizer.model = ...`) is not noticed.
    """
    if isinstance(texts, str):
        raise TypeError(f"texts should be a list of strings, got one string; pass [{texts[:20]!r}]")
    try:
        settings, known = _TOKEN_IDS.get(tokenizer, (None, None))
    except TypeError:  # a tokenizer that cannot be weakly referenced: encode every time
        return [list(tokenizer(text)["input_ids"]) for text in texts]
    if settings != (now := _encoding_settings(tokenizer)):
        known = {}
        _TOKEN_IDS[tokenizer] = (now, known)
    for text in texts:
        if text not in known:
            known[text] = tuple(tokenizer(text)["input_ids"])
    return [list(known[text]) for text in texts]


def encode_example(tokenizer, record: Record, target: Callable[[Record], str] = format_target
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + target + EOS; labels are -100 on the prompt.

    The loss is computed on the target tokens only: the model learns to write the
    sentence, not to reproduce the record it was given. `target` writes the answer
    (default: the task's sentence).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (GPT-2: '<|endoftext|>')")
    prompt_ids, target_ids = token_ids(tokenizer, [format_prompt(record), target(record)])
    target_ids.append(tokenizer.eos_token_id)
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def collate(tokenizer, records: Sequence[Record], target: Callable[[Record], str] = format_target
            ) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    if not records:
        raise ValueError("cannot collate an empty batch")
    encoded = [encode_example(tokenizer, r, target) for r in records]
    length = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(records), length), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(records), length), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(records), length), dtype=torch.long)  # (B, T)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(tokenizer, records: Sequence[Record], batch_size: int, seed: int = 0,
            target: Callable[[Record], str] = format_target) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled training batches (answers written by `target`); the same `seed` gives the same batches."""
    check_int("batch_size", batch_size, minimum=1)
    if len(records) < batch_size:
        raise ValueError(f"{len(records)} records cannot fill a batch of {batch_size}; lower batch_size")
    rng = random.Random(seed)
    order = list(range(len(records)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate(tokenizer, [records[i] for i in order[start : start + batch_size]], target)


def shard_batches(batches: Iterator[dict[str, torch.Tensor]], rank: int, world_size: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Rank `rank`'s contiguous slice of every batch (data parallelism: each process gets 1/world_size).

    Every batch's size must divide by `world_size`, so that all ranks see equally many rows.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    for batch in batches:
        n = len(batch["input_ids"])
        if n % world_size:
            raise ValueError(f"a batch of {n} rows does not split into {world_size} equal shards")
        size = n // world_size
        yield {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


@torch.no_grad()
def generate(model, tokenizer, records: Sequence[Record], max_new_tokens: int = 40, batch_size: int = 64) -> list[str]:
    """Greedy decoding of each record's sentence (left-padded batches), EOS stripped."""
    if not records:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    texts: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = token_ids(tokenizer, [format_prompt(r) for r in records[start : start + batch_size]])
        length = max(map(len, prompts))
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # (B, T), left-padded
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, T + new)
        for row in out[:, length:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row))
    model.train(was_training)
    return texts


def evaluate_task(model, tokenizer, records: Sequence[Record], max_new_tokens: int = 40) -> dict[str, float]:
    """Greedy-decode every record; return slot accuracy, exact match and accuracy by field."""
    texts = generate(model, tokenizer, records, max_new_tokens=max_new_tokens)
    return {
        "slot_accuracy": slot_accuracy(texts, records),
        "exact_match": exact_match(texts, records),
        "by_field": slot_accuracy_by_field(texts, records),
    }
