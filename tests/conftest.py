"""Fixtures shared by the unit tests."""

import pytest

# torch and the package are imported inside the fixtures: pytest's main process loads this file before it starts
# the xdist workers, and it never needs them.


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices run fastest on one thread, and a shared 2-core machine is not oversubscribed."""
    from lora_course.runtime import num_threads

    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer built offline from task sentences (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lora_course.data import format_prompt, format_target, make_splits

    records = make_splits(n_validation=16, n_test=16, seed=0).test  # the task's sentences, as the tests use them
    texts = [format_prompt(r) + format_target(r) for r in records] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def base_model(tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def verdict(capsys):
    """A checker's result and its printed line: assert the verdict ("Correct" / "Not yet"), return the line."""
    def check(result, expected):
        out = capsys.readouterr().out
        assert result is expected and out.startswith("Correct" if expected else "Not yet"), out
        return out
    return check
