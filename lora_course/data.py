"""The fine-tuning task: API records -> one documentation sentence that mentions every field.

In the spirit of the E2E NLG data-to-text task that the LoRA paper fine-tunes GPT-2 on
(Novikova et al., 2017; Hu et al., 2021, section 5.4), but generated in code (offline,
as many examples as you like, scored exactly) and set in the domain the course's small
model was pretrained on, Python's documentation. A record such as

    name: sorted | kind: function | args: 2

must become

    sorted is a function that takes two arguments.

Most fields are copied, `args` must be put into words (2 -> "two"), and the sentence
has a fixed shape the model never saw in pretraining. The metric is *slot accuracy*:
the share of a record's fields whose phrase (`slot_phrases`) appears word for word in
the generated text. A model pretrained on other text scores near zero; a fine-tuned one
approaches one.

Splits are disjoint by construction: every possible record is enumerated once, shuffled
with a fixed seed, and cut into test, validation and training records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch

__all__ = [
    "Record",
    "FIELD_VALUES",
    "FIELD_NAMES",
    "TaskSplits",
    "n_records",
    "record_at",
    "RecordSet",
    "make_splits",
    "format_prompt",
    "format_target",
    "slot_phrases",
    "slots_realized",
    "slot_accuracy",
    "slot_accuracy_by_field",
    "exact_match",
    "encode_example",
    "collate",
    "batches",
    "shard_batches",
    "generate",
    "evaluate_task",
    "ApiRecord",
    "API_FIELD_VALUES",
    "API_FIELD_NAMES",
    "TASKS",
]

# Every field's possible values (a closed set each, as in E2E). Each value is one common
# word of Python's documentation, so that prompts and sentences have the same length for
# every record under a byte-level BPE trained on it (the course's shipped model).
FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "name": (
        "sorted", "open", "print", "zip", "map", "filter", "range", "round", "format",
        "split", "join", "append", "update", "insert", "remove", "read", "write", "close",
        "encode", "decode", "copy", "pop", "clear", "index", "count", "keys", "items",
        "values", "get", "reverse", "sort", "replace", "find", "lower", "upper", "send",
    ),
    "kind": ("function", "method", "class", "generator", "coroutine", "property"),
    "args": ("0", "1", "2", "3"),
}

ARGS_IN_WORDS = {"0": "no arguments", "1": "one argument", "2": "two arguments", "3": "three arguments"}


def _check_values(record, values: dict[str, tuple[str, ...]]) -> None:
    """A clear ValueError for the first field whose value is not in its closed set."""
    for f in fields(record):
        value = getattr(record, f.name)
        if value not in values[f.name]:
            allowed = values[f.name]
            shown = f"{allowed}" if len(allowed) <= 8 else f"{allowed[:8]} ..."
            raise ValueError(f"{f.name}={value!r} is not a value of this task; choose one of {shown}")


@dataclass(frozen=True)
class Record:
    """One record describing a (made-up) Python API: three fields, each from a closed set."""

    name: str
    kind: str
    args: str

    def __post_init__(self):
        _check_values(self, FIELD_VALUES)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Record))


# ----------------------------------------------------------------------------- the six-field task
# A richer record with room between methods: about 260 names and 72 modules to copy (most
# names are several tokens), an argument count and a return type to put into words, and an
# exception to copy. About 54 million records exist, so splits are drawn, not enumerated.
API_FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "name": (
        "sorted", "open", "print", "zip", "map", "filter", "range", "round", "format", "split", "join",
        "append", "update", "insert", "remove", "read", "write", "close", "encode", "decode", "copy", "pop",
        "clear", "index", "count", "keys", "items", "values", "get", "reverse", "sort", "replace", "find",
        "lower", "upper", "send", "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable",
        "chr", "classmethod", "compile", "complex", "delattr", "dict", "dir", "divmod", "enumerate", "eval",
        "exec", "float", "frozenset", "getattr", "globals", "hasattr", "hash", "hex", "id", "input", "int",
        "isinstance", "issubclass", "iter", "len", "list", "locals", "max", "memoryview", "min", "next",
        "object", "oct", "ord", "pow", "property", "repr", "reversed", "set", "setattr", "slice", "str", "sum",
        "super", "tuple", "type", "vars", "capitalize", "casefold", "center", "endswith", "expandtabs",
        "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "islower", "isnumeric", "isprintable",
        "isspace", "istitle", "isupper", "ljust", "lstrip", "maketrans", "partition", "rfind", "rindex",
        "rjust", "rpartition", "rsplit", "rstrip", "splitlines", "startswith", "strip", "swapcase", "title",
        "translate", "zfill", "extend", "fromkeys", "popitem", "setdefault", "add", "difference", "discard",
        "isdisjoint", "issubset", "issuperset", "union", "acos", "acosh", "asin", "asinh", "atan", "atanh",
        "cbrt", "ceil", "comb", "copysign", "cos", "cosh", "degrees", "dist", "erf", "erfc", "exp", "fabs",
        "factorial", "floor", "fmod", "frexp", "fsum", "gamma", "gcd", "hypot", "isclose", "isfinite", "isinf",
        "isnan", "isqrt", "lcm", "ldexp", "lgamma", "log", "modf", "nextafter", "perm", "prod", "radians",
        "remainder", "sin", "sinh", "sqrt", "tan", "tanh", "trunc", "ulp", "abspath", "basename", "commonpath",
        "dirname", "exists", "expanduser", "expandvars", "getatime", "getctime", "getmtime", "getsize", "isabs",
        "isdir", "isfile", "islink", "ismount", "lexists", "normcase", "normpath", "realpath", "relpath",
        "samefile", "samestat", "splitdrive", "splitext", "stat", "chown", "copyfile", "copyfileobj",
        "copymode", "copystat", "copytree", "move", "rmtree", "which", "accumulate", "chain", "compress",
        "cycle", "dropwhile", "filterfalse", "groupby", "islice", "pairwise", "product", "repeat", "starmap",
        "takewhile", "tee", "cache", "namedtuple", "partial", "reduce", "wraps", "escape", "findall",
        "finditer", "fullmatch", "match", "purge", "search", "sub", "subn", "template", "dump", "dumps", "load",
        "loads", "dedent", "fill", "indent", "re", "shorten", "wrap", "betavariate", "choice"
    ),
    "module": (
        "builtins", "os", "json", "re", "math", "sys", "time", "random", "string", "shutil", "pathlib",
        "itertools", "functools", "collections", "typing", "io", "csv", "copy", "heapq", "bisect", "struct",
        "hashlib", "base64", "zlib", "gzip", "pickle", "socket", "subprocess", "threading", "asyncio", "logging",
        "argparse", "datetime", "calendar", "decimal", "fractions", "statistics", "textwrap", "unicodedata",
        "difflib", "glob", "fnmatch", "tempfile", "sqlite3", "urllib", "http", "email", "html", "xml", "zipfile",
        "tarfile", "shlex", "signal", "select", "queue", "weakref", "inspect", "dis", "ast", "tokenize",
        "traceback", "warnings", "contextlib", "abc", "enum", "dataclasses", "operator", "array", "codecs",
        "locale", "platform", "uuid",
    ),
    "kind": FIELD_VALUES["kind"],
    "args": ("0", "1", "2", "3", "4", "5"),
    "returns": ("str", "int", "bool", "None", "list", "dict", "bytes", "float", "tuple", "iterator"),
    "raises": ("ValueError", "TypeError", "KeyError", "IndexError", "OSError", "RuntimeError", "AttributeError",
               "StopIteration"),
}

API_ARGS_IN_WORDS = {**ARGS_IN_WORDS, "4": "four arguments", "5": "five arguments"}
RETURNS_IN_WORDS = {
    "str": "a string", "int": "an integer", "bool": "a boolean", "None": "nothing", "list": "a list",
    "dict": "a dictionary", "bytes": "bytes", "float": "a float", "tuple": "a tuple", "iterator": "an iterator",
}


@dataclass(frozen=True)
class ApiRecord:
    """One record of the six-field task: a (made-up) API's name, module, kind, arity, return type, exception."""

    name: str
    module: str
    kind: str
    args: str
    returns: str
    raises: str

    def __post_init__(self):
        _check_values(self, API_FIELD_VALUES)


API_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ApiRecord))

# task name -> (record class, its fields' values); "basic" is the three-field task above.
TASKS = {"basic": (Record, FIELD_VALUES), "api": (ApiRecord, API_FIELD_VALUES)}


def _task(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def _values_of(record) -> dict[str, tuple[str, ...]]:
    return API_FIELD_VALUES if isinstance(record, ApiRecord) else FIELD_VALUES


def format_prompt(record: Record) -> str:
    """The model's input: the record as `field: value` pairs, then a newline."""
    return " | ".join(f"{k}: {getattr(record, k)}" for k in _values_of(record)) + "\n"


def format_target(record: Record) -> str:
    """The reference sentence (what the loss is computed on), with a leading space."""
    if isinstance(record, ApiRecord):
        return (f" {record.name} from {record.module} is a {record.kind} that takes {API_ARGS_IN_WORDS[record.args]}"
                f" and returns {RETURNS_IN_WORDS[record.returns]}; it can raise {record.raises}.")
    return f" {record.name} is a {record.kind} that takes {ARGS_IN_WORDS[record.args]}."


def slot_phrases(record: Record) -> dict[str, str]:
    """The exact phrase that shows each field was rendered, by field."""
    if isinstance(record, ApiRecord):  # the leading spaces anchor each name (" strip from" is not in " rstrip from")
        return {
            "name": f" {record.name} from",
            "module": f" from {record.module} is",
            "kind": f" is a {record.kind} that",
            "args": f" takes {API_ARGS_IN_WORDS[record.args]} and",
            "returns": f" returns {RETURNS_IN_WORDS[record.returns]};",
            "raises": f" raise {record.raises}.",
        }
    return {
        "name": f"{record.name} is a",
        "kind": f"a {record.kind} that",
        "args": f"takes {ARGS_IN_WORDS[record.args]}.",
    }


def slots_realized(text: str, record: Record) -> dict[str, bool]:
    """For each field: does its exact phrase appear in `text`?"""
    text = " " + text if isinstance(record, ApiRecord) else text  # a sentence may start without its space
    return {k: phrase in text for k, phrase in slot_phrases(record).items()}


def _check_pairs(texts: Sequence[str], records: Sequence[Record]) -> None:
    if isinstance(texts, str):
        raise TypeError("pass a list of generated texts, not one string")
    if len(texts) != len(records):
        raise ValueError(f"got {len(texts)} texts for {len(records)} records; pass one text per record")
    if not records:
        raise ValueError("no records to score; pass at least one")


def slot_accuracy(texts: Sequence[str], records: Sequence[Record]) -> float:
    """Mean over records of the share of fields realised exactly (0 to 1)."""
    _check_pairs(texts, records)
    scores = [sum(hits := slots_realized(t, r).values()) / len(hits) for t, r in zip(texts, records)]
    return sum(scores) / len(scores)


def slot_accuracy_by_field(texts: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """For each field, the share of records whose phrase for it appears in the text."""
    _check_pairs(texts, records)
    hits = [slots_realized(t, r) for t, r in zip(texts, records)]
    return {k: sum(h[k] for h in hits) / len(hits) for k in hits[0]}


def exact_match(texts: Sequence[str], records: Sequence[Record]) -> float:
    """Share of texts equal to the reference sentence (stripped of outer whitespace)."""
    _check_pairs(texts, records)
    return sum(t.strip() == format_target(r).strip() for t, r in zip(texts, records)) / len(records)


def n_records(task: str = "basic") -> int:
    """How many different records exist (basic: 36*6*4 = 864; api: about 54 million)."""
    n = 1
    for values in _task(task)[1].values():
        n *= len(values)
    return n


def record_at(index: int, task: str = "basic"):
    """The record with this index (0 <= index < n_records(task)), read as mixed-radix digits."""
    cls, field_values = _task(task)
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
        _task(task)
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
    if n_validation < 1 or n_test < 1:
        raise ValueError(f"n_validation and n_test must be at least 1, got {n_validation} and {n_test}")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise ValueError(f"n_train must be a whole number of at least 1, got {n_train!r}")
    if n_validation + n_test + (n_train or 1) > n:
        raise ValueError(
            f"n_validation + n_test = {n_validation + n_test} leaves no training records "
            f"(there are {n}); ask for fewer"
        )
    held = n_test + n_validation
    if task == "basic":
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


def encode_example(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + target + EOS; labels are -100 on the prompt.

    The loss is computed on the target tokens only: the model learns to write the
    sentence, not to reproduce the record it was given.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (GPT-2: '<|endoftext|>')")
    prompt_ids = tokenizer(format_prompt(record))["input_ids"]
    target_ids = tokenizer(format_target(record))["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def collate(tokenizer, records: Sequence[Record]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    if not records:
        raise ValueError("cannot collate an empty batch")
    encoded = [encode_example(tokenizer, r) for r in records]
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


def batches(tokenizer, records: Sequence[Record], batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled training batches; the same `seed` gives the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(records) < batch_size:
        raise ValueError(f"{len(records)} records cannot fill a batch of {batch_size}; lower batch_size")
    rng = random.Random(seed)
    order = list(range(len(records)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate(tokenizer, [records[i] for i in order[start : start + batch_size]])


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
        prompts = [tokenizer(format_prompt(r))["input_ids"] for r in records[start : start + batch_size]]
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
