"""Pytest set-up shared by the unit tests and the nbval notebook runs.

Fast mode shrinks each notebook's work (steps, sweep sizes, model size) but never its
claims. `pytest` runs in fast mode unless the caller chose: `LORA_COURSE_FAST=0 pytest`
verifies the full course. The notebook kernels nbval starts inherit this environment.
"""

import os
import shutil
import tempfile

import pytest

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


# The longest runs first (bench_course.py --suite measures them): with `--dist loadscope
# --no-loadscope-reorder` xdist hands out whole files in this order, so no worker starts a long
# notebook while the other is finishing; everything not named (each file a few seconds at most) keeps
# its collection order after them.
LONGEST_FIRST = ("test_widgets_in_lab", "06b_", "06_", "08_", "04_", "10_", "07_", "test_distributed", "09_", "02_",
                 "test_finetune", "test_notices", "01_", "03_", "05_")


def _longest_first(item) -> int:
    name = item.path.name
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix)), len(LONGEST_FIRST))


_PRIVATE_TMP = pytest.StashKey[str]()


def pytest_configure(config):
    """A private temporary folder for this pytest process (the controller, then inside it each xdist worker).

    The notebook kernels, the JupyterLab server, Chromium and the torchrun processes a test starts inherit it as
    TMPDIR, and the folders the notebooks make for their adapters land in it, so a finished run leaves nothing
    behind in the system's temporary folder: `pytest_unconfigure` removes it."""
    # pytest's own tmp_path folders stay where pytest keeps them (its last three runs), to look into after a failure.
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    folder = config.stash[_PRIVATE_TMP] = tempfile.mkdtemp(prefix="lc-")
    for var in ("TMPDIR", "TEMP", "TMP"):  # TEMP and TMP: what programs on Windows read
        os.environ[var] = folder
    tempfile.tempdir = folder


def pytest_unconfigure(config):
    if _PRIVATE_TMP in config.stash:
        shutil.rmtree(config.stash[_PRIVATE_TMP], ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Run the longest files first. nbval waits only 5 s between a cell's output messages; on a
    loaded 2-core machine a training cell's progress-bar traffic can lag longer, so allow a minute."""
    items.sort(key=_longest_first)  # stable: a notebook's cells and a module's tests keep their order
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
