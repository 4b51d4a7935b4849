"""Pytest set-up shared by the unit tests and the nbval notebook runs.

Fast mode shrinks each notebook's work (steps, sweep sizes, model size) but never its
claims. `pytest` runs in fast mode unless the caller chose: `LORA_COURSE_FAST=0 pytest`
verifies the full course. The notebook kernels nbval starts inherit this environment.
"""

import os

os.environ.setdefault("LORA_COURSE_FAST", "1")
# Never reach for a model hub from a test or a notebook run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """nbval waits only 5 s between a cell's output messages; on a loaded 2-core machine
    a training cell's progress-bar traffic can lag longer than that, so allow a minute."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
