"""quiet_library_notices hides exactly the listed library notices, and nothing else."""

import contextlib
import logging
import re
import subprocess
import sys
import warnings

import peft
import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lora_course.notices import NOTICES, Notice, quiet_library_notices

GRADIENT_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
LOSS_TYPE = "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`."


@contextlib.contextmanager
def _recording(quiet: bool):
    """Records every warning shown (DeprecationWarnings aside: hidden outside __main__
    anyway), with quiet_library_notices() in front if `quiet`; the logger filters it adds
    are removed on exit, the warning filters by catch_warnings."""
    loggers = [logging.getLogger(n.source) for n in NOTICES if n.category is None]
    saved = [list(lg.filters) for lg in loggers]
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            for category in (DeprecationWarning, PendingDeprecationWarning):
                warnings.simplefilter("ignore", category)
            if quiet:
                quiet_library_notices()
            yield shown
    finally:
        for lg, filters in zip(loggers, saved):
            lg.filters[:] = filters


@pytest.fixture
def quieted():
    with _recording(quiet=True) as shown:
        yield shown


def _warn_from(module: str, message: str, category: type[Warning]) -> None:
    """A warning as if `module` had raised it (the module part of the filter is what is tested)."""
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module,
                           registry={})


def _texts(shown) -> list[str]:
    return [str(w.message) for w in shown]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_records():
    """What reaches transformers' handlers (its root logger does not propagate to pytest's)."""
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def test_listed_warnings_are_gone(quieted):
    _warn_from("transformers.modeling_utils", GRADIENT_CHECKPOINTING, FutureWarning)
    assert _texts(quieted) == []


def test_other_warnings_still_show(quieted):
    _warn_from("lora_course.lora", GRADIENT_CHECKPOINTING, FutureWarning)  # same text, our module
    _warn_from("transformers.modeling_utils", "`use_cache=True` is incompatible", FutureWarning)  # other text
    _warn_from("transformers.modeling_utilsx", GRADIENT_CHECKPOINTING, FutureWarning)  # a module that only starts alike
    _warn_from("transformers.modeling_utils", GRADIENT_CHECKPOINTING, UserWarning)  # other category
    warnings.warn("an unrelated warning from a test", UserWarning)
    assert len(quieted) == 5, _texts(quieted)


def test_listed_log_record_is_dropped_and_others_pass(quieted, transformers_records):
    source = logging.getLogger("transformers.modeling_utils")
    source.warning(LOSS_TYPE)
    source.warning("`loss_type=ForMaskedLM` was set in the config")  # the same logger, another message
    logging.getLogger("transformers.generation.utils").warning(LOSS_TYPE)  # the same text, another logger
    assert transformers_records == ["`loss_type=ForMaskedLM` was set in the config", LOSS_TYPE]


def test_calling_twice_adds_nothing(quieted):
    filters = list(warnings.filters)
    loggers = {n.source: len(logging.getLogger(n.source).filters) for n in NOTICES if n.category is None}
    quiet_library_notices()
    assert warnings.filters == filters
    assert {name: len(logging.getLogger(name).filters) for name in loggers} == loggers


def test_only_the_notices_passed_are_silenced(quieted):
    mine = Notice(r"lora_course\.lora\Z", "a notice of ours", UserWarning, "for this test")
    quiet_library_notices([mine])
    _warn_from("lora_course.lora", "a notice of ours, silenced", UserWarning)
    _warn_from("lora_course.lora", "another notice of ours", UserWarning)
    assert _texts(quieted) == ["another notice of ours"]


def _tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def _notices_of_the_notebooks_calls(tmp_path, quiet: bool) -> list[str]:
    """Warnings and transformers log records from library calls the notebooks make: PEFT's
    get_peft_model and save_pretrained (offline), and a forward with labels."""
    if hasattr(transformers.utils.logging.warning_once, "cache_clear"):
        transformers.utils.logging.warning_once.cache_clear()  # a once-only notice may show again
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with _recording(quiet) as shown:
            model = _tiny_gpt2()
            lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
            lora.save_pretrained(tmp_path)
            x = torch.zeros((1, 8), dtype=torch.long)  # (B, T)
            model(input_ids=x, labels=x)
    finally:
        root.removeHandler(handler)
    return _texts(shown) + handler.messages


def test_the_libraries_real_notices_are_gone(tmp_path):
    """With this machine's transformers and PEFT, those calls print nothing once quieted
    (whichever of the listed notices this version prints without it)."""
    assert _notices_of_the_notebooks_calls(tmp_path / "quiet", quiet=True) == []


def test_the_libraries_real_notices_show_without_it(tmp_path):
    """The calls above do print notices when nobody quiets them: each is one the list
    names (so the quieted run is not empty by luck, and a new notice is noticed)."""
    notices = _notices_of_the_notebooks_calls(tmp_path / "loud", quiet=False)
    assert notices, "the notebooks' library calls printed no notice: the quieted test proves nothing here"
    for text in notices:
        assert any(re.match(n.message, text) for n in NOTICES), f"a notice NOTICES does not know: {text!r}"


def _import_peft_stderr(quiet: bool) -> str:
    """What a fresh interpreter prints to stderr while importing PEFT (which imports
    bitsandbytes when it is installed), with quiet_library_notices() first if `quiet`."""
    code = ("from lora_course.notices import quiet_library_notices; quiet_library_notices()\n" if quiet else "")
    code += "import peft\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_importing_peft_prints_nothing_once_quieted():
    assert _import_peft_stderr(quiet=True) == ""


def test_what_importing_peft_prints_without_it_is_listed():
    """Without the quieting, any import-time notice (bitsandbytes' missing-kernel warning on
    CPUs with AVX-512 bf16) is one NOTICES names; with bitsandbytes absent there is none."""
    for line in filter(None, _import_peft_stderr(quiet=False).splitlines()):
        assert any(re.match(n.message, line) for n in NOTICES), f"a notice NOTICES does not know: {line!r}"


@pytest.mark.parametrize("logger, notice, other", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module. "
     "Please ...", "another bitsandbytes notice"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
     "because Hugging Face Hub is in offline mode.",
     "Skipping publisher trust check for 'someone-else/a-kernel' because Hugging Face Hub is in offline mode."),
])
def test_optional_kernel_notices_are_dropped_and_others_pass(quieted, logger, notice, other):
    handler = _Records()
    source = logging.getLogger(logger)
    source.addHandler(handler)
    try:
        source.warning(notice)
        source.warning(other)  # the same logger, another message: still shown
    finally:
        source.removeHandler(handler)
    assert handler.messages == [other]


def test_pad_equals_eos_attention_mask_advice_is_dropped_and_the_general_one_shows(quieted, transformers_records):
    source = logging.getLogger("transformers.modeling_utils")
    advice = ("We strongly recommend passing in an `attention_mask` since your input_ids may be padded. See "
              "https://huggingface.co/docs/transformers/troubleshooting#incorrect-output-when-padding-tokens-arent-masked.")
    source.warning(advice + "\nYou may ignore this warning if your `pad_token_id` (0) is identical to the "
                   "`bos_token_id` (0), `eos_token_id` (0), or the `sep_token_id` (None), and your input is not "
                   "padded.")
    source.warning(advice)  # a pad token of its own: padding without a mask is a real mistake, so it shows
    assert transformers_records == [advice]
