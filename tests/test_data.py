"""The fine-tuning task: records, splits, formatting, loss masking, metric, decoding."""

import copy
import gc
import weakref

import pytest
import torch

from lora_course import data
from lora_course.data import (
    FIELD_NAMES,
    FIELD_VALUES,
    Record,
    batches,
    collate,
    encode_example,
    exact_match,
    format_prompt,
    format_target,
    make_splits,
    n_records,
    record_at,
    slot_accuracy,
    slot_phrases,
    slots_realized,
)

REC = Record(name="sorted", kind="function", args="2")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer built offline from a few sentences (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [format_prompt(r) + format_target(r) for r in make_splits(8, 8, seed=1).test] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    return tok


def test_record_rejects_unknown_values():
    with pytest.raises(ValueError, match="kind='lambda'"):
        Record(name="sorted", kind="lambda", args="2")


def test_record_index_round_trip_covers_every_record():
    n = n_records()
    expected = 1
    for k in FIELD_NAMES:
        expected *= len(FIELD_VALUES[k])
    assert n == expected
    assert record_at(0) == Record(*(FIELD_VALUES[k][0] for k in FIELD_NAMES))
    assert record_at(n - 1) == Record(*(FIELD_VALUES[k][-1] for k in FIELD_NAMES))
    # neighbouring indices differ only in the last field
    assert record_at(1).args == FIELD_VALUES["args"][1] and record_at(1).name == FIELD_VALUES["name"][0]
    with pytest.raises(IndexError):
        record_at(n)


def test_splits_are_disjoint_and_cover_everything():
    splits = make_splits(n_validation=100, n_test=50, seed=3)
    train, val, test = (set(s.indices) for s in (splits.train, splits.validation, splits.test))
    assert len(val) == 100 and len(test) == 50
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train) + len(val) + len(test) == n_records()
    # the records themselves, not only their indices, are distinct
    assert not set(splits.validation) & set(splits.test)


def test_splits_depend_on_seed_only():
    a, b, c = make_splits(seed=0), make_splits(seed=0), make_splits(seed=1)
    assert a.test.indices == b.test.indices
    assert a.test.indices != c.test.indices


def test_make_splits_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 1"):
        make_splits(n_validation=0)
    with pytest.raises(ValueError, match="leaves no training"):
        make_splits(n_validation=n_records(), n_test=1)


def test_every_record_has_the_same_length_under_the_shipped_tokenizer():
    """Fixed-length prompts and sentences: each field's value is one token of the shipped BPE."""
    from transformers import AutoTokenizer

    from lora_course.models import shipped_model_path

    tok = AutoTokenizer.from_pretrained(shipped_model_path())
    lengths = {(len(tok(format_prompt(r))["input_ids"]), len(tok(format_target(r))["input_ids"]))
               for r in make_splits(200, 200, seed=2).test}
    assert len(lengths) == 1, lengths


def test_reference_sentence_realizes_every_slot():
    target = format_target(REC)
    assert target == " sorted is a function that takes two arguments."
    assert all(slots_realized(target, REC).values())
    assert slot_accuracy([target], [REC]) == 1.0
    assert exact_match([target], [REC]) == 1.0


def test_metric_counts_each_wrong_slot():
    target = format_target(REC)
    wrong_args = target.replace("two arguments", "three arguments")
    assert slots_realized(wrong_args, REC) == {k: k != "args" for k in FIELD_NAMES}
    assert slot_accuracy([wrong_args], [REC]) == pytest.approx(2 / 3)
    assert exact_match([wrong_args], [REC]) == 0.0
    # copying the prompt back is not the task
    assert slot_accuracy([format_prompt(REC)], [REC]) == 0.0
    # a phrase must match exactly, up to the full stop
    assert not slots_realized(target.replace("arguments.", "arguments each."), REC)["args"]
    assert slot_accuracy([target, ""], [REC, REC]) == 0.5


def test_slot_phrases_are_distinct_across_values():
    for field in FIELD_NAMES:
        phrases = {slot_phrases(Record(**{**REC.__dict__, field: v}))[field] for v in FIELD_VALUES[field]}
        assert len(phrases) == len(FIELD_VALUES[field])


def test_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="one text per record"):
        slot_accuracy(["a", "b"], [REC])
    with pytest.raises(TypeError, match="list"):
        slot_accuracy("sorted is a", [REC])
    with pytest.raises(ValueError, match="no records"):
        exact_match([], [])


def test_loss_only_on_target_tokens(tokenizer):
    ids, labels = encode_example(tokenizer, REC)
    n_prompt = len(tokenizer(format_prompt(REC))["input_ids"])
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == format_target(REC)


def test_collate_pads_right_and_masks_padding(tokenizer):
    recs = [REC, Record(name="zip", kind="generator", args="0")]
    batch = collate(tokenizer, recs)
    lengths = [len(encode_example(tokenizer, r)[0]) for r in recs]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="empty"):
        collate(tokenizer, [])


def test_batches_are_reproducible(tokenizer):
    recs = make_splits(8, 8).validation
    a = next(batches(tokenizer, recs, batch_size=4, seed=0))
    b = next(batches(tokenizer, recs, batch_size=4, seed=0))
    c = next(batches(tokenizer, recs, batch_size=4, seed=1))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(tokenizer, recs, batch_size=0))


def test_tokenizer_without_eos_is_refused(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos_token"):
        encode_example(NoEos(), REC)


class _Counted:
    """A tokenizer that counts how often it encodes (anything else is the wrapped tokenizer's)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, text):
        self.calls += 1
        return self.inner(text)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_token_ids_encode_each_text_once_per_tokenizer(tokenizer):
    text = format_prompt(REC)
    counted, other = _Counted(tokenizer), _Counted(tokenizer)
    ids = data.token_ids(counted, [text, text])
    assert ids == [tokenizer(text)["input_ids"]] * 2 and counted.calls == 1
    ids[0].append(-1)  # the caller's lists are its own: the next call is unchanged
    assert data.token_ids(counted, [text]) == [tokenizer(text)["input_ids"]] and counted.calls == 1
    assert data.token_ids(other, [text]) == [tokenizer(text)["input_ids"]] and other.calls == 1  # a cache of its own
    gone, cached = weakref.ref(other), len(data._TOKEN_IDS)
    del other
    gc.collect()
    assert gone() is None and len(data._TOKEN_IDS) == cached - 1  # its cache went with it


def test_token_ids_refuse_one_string_for_a_list(tokenizer):
    with pytest.raises(TypeError, match="list of strings"):
        data.token_ids(tokenizer, "sorted")  # would otherwise encode each character


def test_collate_encodes_each_record_once_per_tokenizer(tokenizer):
    counted, recs = _Counted(tokenizer), list(make_splits(8, 8).test[:4])
    first = collate(counted, recs)
    assert counted.calls == 2 * len(recs)  # a prompt and a sentence each
    again = collate(counted, recs)
    assert counted.calls == 2 * len(recs) and all(torch.equal(first[k], again[k]) for k in first)


def _add_existing_token(tok):
    tok.add_tokens(["erty"])  # already a token of the vocabulary: the size stays, the encoding changes


def _add_eos(tok):
    tok.add_eos_token = True


def _prefix_space(tok):
    from tokenizers.pre_tokenizers import ByteLevel

    tok.backend_tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=True)


@pytest.mark.parametrize("change, text", [(lambda tok: tok.add_tokens(["property"]), "property"),
                                          (_add_existing_token, " property"), (_add_eos, "property"),
                                          (_prefix_space, "property")],
                         ids=["new token", "existing token", "add_eos_token", "pre-tokenizer"])
def test_token_ids_start_afresh_when_an_encoding_setting_changes(tokenizer, change, text):
    changed = _Counted(copy.deepcopy(tokenizer))  # the module's tokenizer stays as it is
    before = data.token_ids(changed, [text])
    change(changed.inner)
    after = data.token_ids(changed, [text])
    assert after == [changed.inner(text)["input_ids"]] != before and changed.calls == 2


def test_token_ids_without_a_weak_reference_encode_every_time(tokenizer):
    class Slotted:  # no __weakref__ slot: it cannot key the cache
        __slots__ = ("calls",)

        def __init__(self):
            self.calls = 0

        def __call__(self, text):
            self.calls += 1
            return tokenizer(text)

        def __len__(self):
            return len(tokenizer)

    plain = Slotted()
    assert data.token_ids(plain, ["sorted"]) == data.token_ids(plain, ["sorted"]) == [tokenizer("sorted")["input_ids"]]
    assert plain.calls == 2


def test_greedy_generation_batched_equals_one_by_one(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    recs = list(make_splits(8, 8).test[:4])
    batched = data.generate(model, tokenizer, recs, max_new_tokens=6)
    single = [data.generate(model, tokenizer, [r], max_new_tokens=6)[0] for r in recs]
    assert batched == single
    assert len(batched) == 4 and all(isinstance(t, str) for t in batched)


def test_api_task_has_six_fields_and_a_sentence_that_realizes_each():
    from lora_course.data import API_FIELD_NAMES, API_FIELD_VALUES, ApiRecord

    rec = ApiRecord(name="rstrip", module="json", kind="method", args="4", returns="None", raises="KeyError")
    assert API_FIELD_NAMES == ("name", "module", "kind", "args", "returns", "raises")
    assert format_target(rec) == (" rstrip from json is a method that takes four arguments and returns nothing;"
                                  " it can raise KeyError.")
    assert format_prompt(rec).startswith("name: rstrip | module: json |")
    assert all(slots_realized(format_target(rec).strip(), rec).values())  # leading space optional
    assert not slots_realized(format_target(rec).replace("rstrip", "strip"), rec)["name"]
    assert not slots_realized(format_target(rec), ApiRecord(**{**rec.__dict__, "name": "strip"}))["name"]
    assert len(API_FIELD_VALUES["name"]) == 260 and len(API_FIELD_VALUES["module"]) == 72
    assert n_records("api") == 260 * 72 * 6 * 6 * 10 * 8
    with pytest.raises(ValueError, match="module='numpy'"):
        ApiRecord(**{**rec.__dict__, "module": "numpy"})
    for field in API_FIELD_NAMES:  # every value gets its own phrase
        phrases = {slot_phrases(ApiRecord(**{**rec.__dict__, field: v}))[field] for v in API_FIELD_VALUES[field]}
        assert len(phrases) == len(API_FIELD_VALUES[field])


def test_api_splits_are_seeded_distinct_draws():
    a = make_splits(16, 32, seed=0, task="api", n_train=500)
    assert (len(a.train), len(a.validation), len(a.test)) == (500, 16, 32)
    ids = a.train.indices + a.validation.indices + a.test.indices
    assert len(set(ids)) == len(ids)
    assert a.test.indices == make_splits(16, 32, seed=0, task="api", n_train=10).test.indices
    assert a.test.indices != make_splits(16, 32, seed=1, task="api").test.indices
    assert record_at(a.test.indices[0], task="api") == a.test[0] and a.test[:2].task == "api"
    assert len(make_splits(8, 8, n_train=20).train) == 20  # the basic task takes n_train too
    with pytest.raises(ValueError, match="n_train"):
        make_splits(task="api", n_train=0)
    with pytest.raises(ValueError, match="unknown task"):
        make_splits(task="e2e")


def test_shard_batches_splits_each_batch_into_equal_contiguous_slices():
    from lora_course.data import shard_batches

    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2)}
    shards = [next(shard_batches(iter([batch]), rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    assert all(len(s["labels"]) == 2 for s in shards)
    with pytest.raises(ValueError, match="equal shards"):
        next(shard_batches(iter([batch]), 0, 4))
    with pytest.raises(ValueError, match="rank must be"):
        next(shard_batches(iter([batch]), 3, 3))
