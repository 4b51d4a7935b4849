"""What `jupyter lab notebooks/` needs to draw a widget: the widget manager extension,
installed and enabled, in the lab a learner starts and in the page it serves.

Without it JupyterLab prints a widget's text repr, or "Error displaying widget: model
not found", instead of a slider. This check needs no browser (that the page a lab serves
loads it is checked in test_widgets_in_lab.py, which holds every test that needs the lab).
"""

import re
import subprocess
import sys

from labdriver import WIDGET_MANAGER

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_labextension_list_shows_the_widget_manager_enabled_and_ok():
    done = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], capture_output=True,
                          text=True, timeout=120)
    listing = ANSI.sub("", done.stdout + done.stderr)
    assert done.returncode == 0, listing
    lines = [line.split() for line in listing.splitlines() if line.strip().startswith(WIDGET_MANAGER + " ")]
    assert lines, f"{WIDGET_MANAGER} is not installed (pip install ipywidgets):\n{listing}"
    name, version, status, health, *_ = lines[0]
    assert (status, health) == ("enabled", "OK"), (
        f"{name} {version} is {status} {health} (jupyter labextension enable {WIDGET_MANAGER}):\n{listing}")
