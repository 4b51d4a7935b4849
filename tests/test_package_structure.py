"""The package's shape: one owner for each piece of logic, modules a maintainer can read in one sitting."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_course import add_lora, load_adapter, save_adapter
from lora_course.adapters import AdapterError
from lora_course.models import toy_gpt2
from lora_course.serving import MultiAdapterModel

PACKAGE = Path(__file__).resolve().parents[1] / "lora_course"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LESSON_LINES = 450, 60, 3000


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_package_is_found():
    assert len(MODULES) > 20 and (PACKAGE / "train.py") in MODULES


def test_one_optimizer_loop():
    """`.step()` (an optimizer's or a scheduler's) is called in the training module only."""
    callers = sorted({str(path.relative_to(PACKAGE)) for path in MODULES for node in ast.walk(_tree(path))
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "step"})
    assert callers == ["train.py"], f"optimizer steps outside train.py: {callers}"


def test_no_module_or_function_too_long():
    long_modules = [(p.name, n) for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_functions = [(p.name, node.name, node.end_lineno - node.lineno + 1) for p in MODULES
                      for node in ast.walk(_tree(p)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_lessons_stay_small():
    total = sum(len(p.read_text().splitlines()) for p in (PACKAGE / "lessons").glob("*.py"))
    assert total <= MAX_LESSON_LINES, f"lora_course/lessons/ holds {total} lines, more than {MAX_LESSON_LINES}"


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    model = add_lora(toy_gpt2(), target_modules=["c_attn"], r=4)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "good")


def _spoiled(folder: Path, tmp: Path, spoil) -> Path:
    """A copy of the adapter folder whose weights `spoil(weights)` changed."""
    out = tmp / "bad"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(out / "adapter_model.safetensors")
    spoil(weights)
    save_file(weights, out / "adapter_model.safetensors")
    return out


def _nan(w):
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.full_like(w[key], float("nan"))


def _extra(w):
    w["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(4, 64)


def _shape(w):
    key = next(k for k in w if "lora_B" in k)
    w[key] = torch.zeros(w[key].shape[0], 5)


@pytest.mark.parametrize("spoil", [_nan, _extra, _shape], ids=["nan", "unexpected tensor", "wrong shape"])
def test_serving_and_load_adapter_refuse_bad_files_with_the_same_words(adapter_folder, tmp_path, spoil):
    """Both read adapter files through one reader, so a bad file gets one message, and neither model changes."""
    bad = _spoiled(adapter_folder, tmp_path, spoil)
    base = toy_gpt2()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(AdapterError) as one_model:
        load_adapter(base, bad)
    server = MultiAdapterModel(copy.deepcopy(base))
    with pytest.raises(AdapterError) as served:
        server.load_adapter(bad, "bad")
    assert str(one_model.value) == str(served.value)
    assert server.adapters == [] and all(torch.equal(before[k], v) for k, v in base.state_dict().items())
