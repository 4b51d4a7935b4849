"""Moved to `lora_course.measure` (timing and peak memory in one measuring module); importable from here until
every notebook imports them from there."""

from .measure import generation_ms, median_ms  # noqa: F401
