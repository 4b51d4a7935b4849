"""Every notebook with a widget, run in JupyterLab in a real browser, the way a learner uses it:
from the top down to its last widget (nbval runs every cell, the later ones included).

Every test that needs the lab server is in this module, so that the whole suite starts one
JupyterLab (pytest-xdist keeps a module's tests on one worker).

The kernel-side widget tests set `slider.value` in Python; these prove what the learner
sees: the widget manager renders each widget, and moving a control with the keyboard
changes its readout and redraws the output it drives (the text, or the image's bytes).
"""

import pytest
from labdriver import (
    CONTROL_S,
    CONTROLS,
    NOTEBOOKS,
    WIDGET_ERRORS,
    WIDGET_MANAGER,
    SideBySide,
    last_widget_cell,
    widget_notebooks,
)

pytestmark = pytest.mark.browser

WIDGET_NOTEBOOKS = widget_notebooks(NOTEBOOKS)


@pytest.fixture(scope="module")
def notebooks(chromium, lab):
    """The widget notebooks, two running side by side in the one lab (each its own page and kernel)."""
    runs = SideBySide(chromium, lab, [p.name for p in WIDGET_NOTEBOOKS], width=2)
    try:
        yield runs
    finally:
        runs.close_all()


@pytest.fixture
def notebook_run(notebooks, notebook):
    """This notebook, run down to its last widget from the Run menu (the next one starts meanwhile); closed
    afterwards."""
    try:
        yield notebooks.ready(notebook)
    finally:
        notebooks.close(notebook)


@pytest.mark.parametrize("notebook", [p.name for p in WIDGET_NOTEBOOKS])
def test_widgets_render_and_respond(notebook_run, screenshots, notebook):
    nb, state = notebook_run
    page = nb.page

    errors = [f"cell {c['index']}: {e}" for c in state["cells"] for e in c["errors"]]
    assert not errors, f"{notebook} raised in JupyterLab: {errors}"
    # The outputs were cleared first, so a count is this run's: every code cell down to the last widget ran,
    # and none after it.
    assert nb.upto is not None and nb.upto == last_widget_cell(NOTEBOOKS / notebook), (
        f"{notebook}: no cell builds a widget with interact or a *_widget factory, so it ran to the end")
    not_run = [c["index"] for c in state["cells"] if c["count"] is None and c["index"] <= nb.upto]
    assert not not_run, f"{notebook}: cells {not_run} did not run"
    beyond = [c["index"] for c in state["cells"] if c["count"] is not None and c["index"] > nb.upto]
    assert not beyond, f"{notebook}: cells {beyond}, after its last widget (cell {nb.upto}), ran too"
    text = nb.text()
    shown = [e for e in WIDGET_ERRORS if e in text]
    assert not shown, f"{notebook} shows {shown!r}: the widget manager could not draw a widget"

    controls = nb.controls()
    assert controls, (f"{notebook} builds a widget but the page shows no slider, dropdown, checkbox or toggle "
                      f"buttons (is {WIDGET_MANAGER} installed and enabled?)")
    for i, control in enumerate(controls):
        name = f"{notebook} control {i} ({nb.label(control)!r})"
        control.scroll_into_view_if_needed()
        before = nb.driven(control, mark=True)
        assert before.outputs, f"{name} drives no Output widget the page can show"
        assert not before.empty, f"{name}: its output is empty before it was moved ({before.describe()})"
        old, new = nb.move(control)
        assert new != old, f"{name}: the readout stayed {old!r} after the keyboard moved it"
        # A slider or dropdown picks a new value to draw; a checkbox or toggle may land on a
        # setting that draws the same picture (fp32 master weights when training in fp32),
        # so for those a fresh drawing is enough.
        new_content = nb.kind(control) in ("slider", "dropdown")
        after = nb.wait_for_redraw(control, before, new_content)
        assert after is not None, (
            f"{name}: moved {old!r} -> {new!r} but its output was not "
            f"{'changed' if new_content else 'redrawn'} within {CONTROL_S} s "
            f"(before: {before.describe()}; now: {nb.driven(control).describe()})")
        assert not any(e in nb.text() for e in WIDGET_ERRORS), f"{name}: the widget failed to redraw"

    final = nb.state()
    errors = [f"cell {c['index']}: {e}" for c in final["cells"] for e in c["errors"]]
    assert not errors, f"{notebook} raised after its controls moved: {errors}"
    widget_cell = nb.panel().locator(".jp-CodeCell").filter(has=page.locator(CONTROLS)).first
    widget_cell.screenshot(path=str(screenshots / f"{notebook.removesuffix('.ipynb')}.png"))


def test_the_lab_page_loads_the_widget_manager(lab):
    config = lab.page_config()
    loaded = {ext["name"] for ext in config.get("federated_extensions", [])}
    assert WIDGET_MANAGER in loaded, f"the lab page does not load {WIDGET_MANAGER}; it loads {sorted(loaded)}"
    disabled = config.get("disabledExtensions", [])
    disabled = disabled if isinstance(disabled, list) else [k for k, v in disabled.items() if v]
    assert not [d for d in disabled if d == WIDGET_MANAGER or d.startswith(WIDGET_MANAGER + ":")], (
        f"{WIDGET_MANAGER} is disabled: {disabled}")
