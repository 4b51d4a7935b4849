"""lora_course.validate: the argument checks every module shares."""

import pytest

from lora_course.memory import format_bytes
from lora_course.validate import check_choice


def test_check_choice_returns_a_listed_value_and_names_the_choices_otherwise():
    assert check_choice("unit", "GB", ("GB", "GiB")) == "GB"
    with pytest.raises(ValueError, match=r"unit must be one of \['GB', 'GiB'\], got 'gb'"):
        check_choice("unit", "gb", ("GB", "GiB"))
    with pytest.raises(ValueError, match="unit must be one of .*'GiB'.*, got 'TB'"):
        format_bytes(1, unit="TB")  # a dict's keys are its choices
