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
# pytest-xdist runs the suite in one worker per core (pyproject.toml: -n auto): each worker, and the notebook
# kernels nbval starts from it, keeps torch to one thread, so the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def pytest_collection_modifyitems(items):
    """nbval waits only 5 s between a cell's output messages; on a loaded 2-core machine
    a training cell's progress-bar traffic can lag longer than that, so allow a minute."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
