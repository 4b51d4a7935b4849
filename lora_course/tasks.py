"""The records-to-sentence tasks: each task is a record class that knows its fields' values, its prompt,
its target sentence and the phrase that shows each field was written; and the exact metric, slot accuracy.

    name: sorted | kind: function | args: 2      ->   sorted is a function that takes two arguments.

`Record` is the three-field task (864 records); `ApiRecord` the six-field one notebook 06
uses (about 54 million records). A model pretrained on other text scores near zero; a
fine-tuned one approaches one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

__all__ = ["TaskRecord", "Record", "ApiRecord", "TASKS", "task_record", "FIELD_VALUES", "FIELD_NAMES",
           "ARGS_IN_WORDS", "API_FIELD_VALUES", "API_FIELD_NAMES", "format_prompt", "format_target", "slot_phrases",
           "slots_realized", "slot_accuracy", "slot_accuracy_by_field", "exact_match"]

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


class TaskRecord:
    """What a task's record knows: the values each field may take (`VALUES`), its prompt, its target
    sentence and the phrase that shows each field was written (`slots`). Each task is one subclass."""

    VALUES: ClassVar[dict[str, tuple[str, ...]]]
    ENUMERATED: ClassVar[bool]  # few enough records to enumerate and shuffle them all (else splits are drawn)

    def __post_init__(self):
        _check_values(self, self.VALUES)

    def prompt(self) -> str:
        """The model's input: the record as `field: value` pairs, then a newline."""
        return " | ".join(f"{k}: {getattr(self, k)}" for k in self.VALUES) + "\n"

    def target(self) -> str:
        """The reference sentence (what the loss is computed on), with a leading space."""
        raise NotImplementedError

    def slots(self) -> dict[str, str]:
        """The exact phrase that shows each field was rendered, by field."""
        raise NotImplementedError

    def realized(self, text: str) -> dict[str, bool]:
        """For each field: does its exact phrase appear in `text`?"""
        return {k: phrase in text for k, phrase in self.slots().items()}


@dataclass(frozen=True)
class Record(TaskRecord):
    """One record describing a (made-up) Python API: three fields, each from a closed set."""

    name: str
    kind: str
    args: str

    VALUES: ClassVar[dict[str, tuple[str, ...]]] = FIELD_VALUES
    ENUMERATED: ClassVar[bool] = True

    def target(self) -> str:
        return f" {self.name} is a {self.kind} that takes {ARGS_IN_WORDS[self.args]}."

    def slots(self) -> dict[str, str]:
        return {"name": f"{self.name} is a", "kind": f"a {self.kind} that",
                "args": f"takes {ARGS_IN_WORDS[self.args]}."}


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
class ApiRecord(TaskRecord):
    """One record of the six-field task: a (made-up) API's name, module, kind, arity, return type, exception."""

    name: str
    module: str
    kind: str
    args: str
    returns: str
    raises: str

    VALUES: ClassVar[dict[str, tuple[str, ...]]] = API_FIELD_VALUES
    ENUMERATED: ClassVar[bool] = False  # 54 million records

    def target(self) -> str:
        return (f" {self.name} from {self.module} is a {self.kind} that takes {API_ARGS_IN_WORDS[self.args]}"
                f" and returns {RETURNS_IN_WORDS[self.returns]}; it can raise {self.raises}.")

    def slots(self) -> dict[str, str]:
        # the leading spaces anchor each name (" strip from" is not in " rstrip from")
        return {
            "name": f" {self.name} from",
            "module": f" from {self.module} is",
            "kind": f" is a {self.kind} that",
            "args": f" takes {API_ARGS_IN_WORDS[self.args]} and",
            "returns": f" returns {RETURNS_IN_WORDS[self.returns]};",
            "raises": f" raise {self.raises}.",
        }

    def realized(self, text: str) -> dict[str, bool]:
        return super().realized(" " + text)  # a sentence may start without its space


API_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ApiRecord))

# task name -> its record class; "basic" is the three-field task above.
TASKS = {"basic": Record, "api": ApiRecord}


def task_record(task: str) -> type[TaskRecord]:
    """The record class of a task by name ("basic" or "api")."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def format_prompt(record: Record) -> str:
    """The model's input: the record as `field: value` pairs, then a newline."""
    return record.prompt()


def format_target(record: Record) -> str:
    """The reference sentence (what the loss is computed on), with a leading space."""
    return record.target()


def slot_phrases(record: Record) -> dict[str, str]:
    """The exact phrase that shows each field was rendered, by field."""
    return record.slots()


def slots_realized(text: str, record: Record) -> dict[str, bool]:
    """For each field: does its exact phrase appear in `text`?"""
    return record.realized(text)


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


