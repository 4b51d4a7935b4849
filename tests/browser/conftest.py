"""Fixtures for the JupyterLab tests: one lab server and one Chromium for the session.

Without Chromium or Playwright these tests skip with a one-line reason; with `CI=true`
a skip here is reported as a failure, so CI cannot pass without having run them.
"""

import pathlib

import pytest
from labdriver import NOTEBOOKS, JupyterLab, chromium_args, find_chromium, is_ci

SCREENSHOTS = pathlib.Path(__file__).resolve().parent / "screenshots"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and is_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a skipped JupyterLab test counts as a failure ({reason})"


@pytest.fixture(scope="session")
def lab():
    """`jupyter lab` in fast mode on a temporary copy of notebooks/, stopped at the end."""
    with JupyterLab(NOTEBOOKS) as server:
        yield server


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium from the system, driven by Playwright (never a downloaded browser)."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium not found (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright not installed (pip install -e \".[browser]\")")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=chromium_args())
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def screenshots():
    SCREENSHOTS.mkdir(exist_ok=True)
    return SCREENSHOTS
