"""Fixtures shared by the unit tests."""

import pytest

from lora_course.runtime import num_threads


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices run fastest on one thread, and a shared 2-core machine is not oversubscribed."""
    with num_threads(1):
        yield
