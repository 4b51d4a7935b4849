"""Library notices that change nothing in a lesson, silenced one by one.

`quiet_library_notices()` is for a notebook's setup cell. Each notice is matched by its
category (or logger), the module that emits it and the start of its text, so any other
warning, from the same libraries or from our code, still shows. Notices with a cause in
our own code are fixed there instead (e.g. pass an `attention_mask`, do not hide
transformers' advice to pass one).
"""

import logging
import re
import warnings
from typing import NamedTuple


class Notice(NamedTuple):
    source: str  # warnings: regex on the emitting module; logging: the logger's name
    message: str  # regex on the start of the message
    category: type[Warning] | None  # None: a logging record, not a warning
    why: str  # why it does not matter to the lesson


NOTICES = (
    Notice(r"transformers\.modeling_utils\Z", r"`is_gradient_checkpointing` is deprecated", FutureWarning,
           "PEFT's get_peft_model reads the old name of a transformers property; nothing a learner calls"),
    Notice("transformers.modeling_utils", r"`loss_type=None` was set in the config but it is unrecognized", None,
           "GPT-2's class name names no loss type, so transformers says it uses ForCausalLMLoss: the loss it "
           "would have picked"),
    Notice("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/", None,
           "bitsandbytes asks the `kernels` package (0.19 and newer) for that optional CPU kernel; offline, as "
           "every notebook runs, `kernels` cannot ask the hub who published it and says it skips the check, then "
           "finds no copy, and bitsandbytes uses its own CPU code (the next notice)"),
    Notice("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community", None,
           "bitsandbytes (imported by PEFT when installed) looks for an optional fast CPU kernel in the `kernels` "
           "package and falls back to its own CPU code, which computes the same 4-bit products"),
    Notice("transformers.modeling_utils",
           r"We strongly recommend passing in an `attention_mask`[^\n]*\nYou may ignore this warning if your "
           r"`pad_token_id` \((\d+)\) is identical to the `bos_token_id` \(\1\)", None,
           "only the variant for a pad token that is also BOS/EOS: generate() is given the mask, drops an all-ones "
           "one, and at a decode step whose newest token is a finished row's EOS (= pad) advises passing one"),
)


class _DropMatching(logging.Filter):
    """Drops a logger's records whose message starts with a pattern."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_library_notices(notices=NOTICES) -> None:
    """Silence exactly `notices` (default: NOTICES); safe to call more than once."""
    for notice in notices:
        if notice.category is not None:
            # An identical filter is replaced, not added twice.
            warnings.filterwarnings("ignore", message=notice.message, category=notice.category, module=notice.source)
            continue
        logger = logging.getLogger(notice.source)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == notice.message for f in logger.filters):
            logger.addFilter(_DropMatching(notice.message))
