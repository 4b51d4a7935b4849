"""JupyterLab on a private copy of the notebooks, and what a learner's browser sees in it.

`JupyterLab` starts a real `jupyter lab` server (free local port, random token, its own
settings, workspace and runtime folders) and stops it with everything it started. The
`NotebookPage` helpers drive one opened notebook through Playwright: run the cells down to
its last widget from the Run menu, wait for the kernel, read errors, and move the widgets'
controls the way a learner does (keyboard on sliders and dropdowns, Space on checkboxes, a
click on toggle buttons).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the fixtures skip the browser tests without Playwright
    PlaywrightTimeout = TimeoutError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"

# Every wait is bounded. Fast-mode notebooks run in seconds to a couple of minutes here;
# the limits are generous for a loaded 2-core machine.
SERVER_START_S = 120
RUN_ALL_S = 1800  # notebook 06 trains several models; a loaded machine slows it several-fold
CONTROL_S = 120

# What a learner can move, by the class ipywidgets 8 gives its view.
CONTROLS = ".widget-slider, .widget-dropdown, .widget-checkbox, .widget-toggle-buttons"
WIDGET_ERRORS = ("Error displaying widget", "Error rendering widget")

# A cell that builds a widget: interact, or one of the course's `*_widget(...)` factories.
_BUILDS_WIDGET = re.compile(r"\binteract(?:ive)?\s*\(|\w_widget\s*\(")
# A notebook that uses widgets: such a cell, or ipywidgets named in its code.
_WIDGET_CODE = re.compile(r"\bipywidgets\b|" + _BUILDS_WIDGET.pattern)
# ipywidgets models a learner moves (progress bars and layout boxes do not count).
_CONTROL_MODEL = re.compile(r"(Slider|Dropdown|Checkbox|ToggleButtons|RadioButtons|Select\w*)Model$")

CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_chromium() -> str | None:
    """The system's Chromium (Debian: `apt-get install chromium`); never a downloaded one."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_args() -> list[str]:
    # Chromium refuses to start its sandbox as root.
    return CHROMIUM_ARGS + (["--no-sandbox"] if _is_root() else [])


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _code_cells(nb: dict) -> list[tuple[int, str]]:
    """(index among all cells, source) of each code cell of a notebook's JSON."""
    return [(i, "".join(c.get("source", ""))) for i, c in enumerate(nb.get("cells", []))
            if c.get("cell_type") == "code"]


def widget_notebooks(folder: Path) -> list[Path]:
    """Notebooks in `folder` that build a widget, judged from their code and from the
    widget state their saved outputs carry."""
    found = []
    for path in sorted(folder.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = "\n".join(source for _, source in _code_cells(nb))
        state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        models = {m.get("model_name", "") for m in state.get("state", {}).values()}
        if _WIDGET_CODE.search(code) or any(_CONTROL_MODEL.search(m) for m in models):
            found.append(path)
    return found


def last_widget_cell(path: Path) -> int | None:
    """The index (among all cells) of the last code cell in `path` that builds a widget, or None."""
    found = [i for i, source in _code_cells(json.loads(path.read_text(encoding="utf-8")))
             if _BUILDS_WIDGET.search(source)]
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`jupyter lab` serving a copy of `notebooks` in fast mode; use as a context manager."""

    def __init__(self, notebooks: Path, env: dict[str, str] | None = None):
        self.workdir = Path(tempfile.mkdtemp(prefix="lora-course-lab-"))
        self.root = self.workdir / "notebooks"
        shutil.copytree(notebooks, self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "jupyterlab.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def _environment(self) -> dict[str, str]:
        settings = self.workdir / "settings"
        # Keep every cell in the page (no virtual scrolling), so the page shows the whole notebook.
        tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        # No news prompt and no update check: the page asks nothing and fetches nothing.
        notices = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notices.parent.mkdir(parents=True)
        notices.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ)
        env.update({
            "LORA_COURSE_FAST": "1",
            # Two notebooks run side by side beside the other test workers: one thread per kernel.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.workdir / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(self.workdir / "runtime"),
        })
        env.update(self.extra_env)
        return env

    def start(self) -> JupyterLab:
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            # window.jupyterapp, to read cell outputs and kernel state from the page's own model.
            "--LabApp.expose_app_in_browser=True",
        ]
        if _is_root():
            cmd.append("--allow-root")
        with open(self.log_path, "wb") as log:
            # Its own process group, so stop() ends the server and the kernels it started.
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self._environment(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "api/status")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pgid = self.proc.pid  # the group start_new_session made, led by our server
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
            try:  # kernels that outlived their server
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> JupyterLab:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, path: str, query: str = "") -> str:
        sep = "&" if query else ""
        return f"{self.base}/{path}?{query}{sep}token={self.token}"

    def api(self, method: str, path: str):
        req = urllib.request.Request(self.url(path), method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def page_config(self) -> dict:
        """The configuration the lab page hands the browser (extensions to load, disabled ones)."""
        with urllib.request.urlopen(self.url("lab"), timeout=30) as resp:
            html = resp.read().decode("utf-8")
        match = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', html, re.S)
        if not match:
            raise RuntimeError("the lab page has no jupyter-config-data")
        return json.loads(match.group(1))

    def shutdown_sessions(self, path: str | None = None) -> None:
        """End the kernel sessions of the notebook at `path` (relative to the root), or all of them."""
        for session in self.api("GET", "api/sessions"):
            if path is None or session.get("path") == path:
                self.api("DELETE", f"api/sessions/{session['id']}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# --- one notebook in the page --------------------------------------------------------------

_STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const session = panel.sessionContext.session;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const prompt = cell.node.querySelector('.jp-InputPrompt');
    // A cell tagged raises-exception is meant to raise (nbval's rule too).
    const expected = (cell.model.getMetadata('tags') || []).includes('raises-exception');
    // Only error outputs are serialised: images and long text stay in the page's model.
    const errors = [];
    const outputs = cell.model.outputs;
    for (let i = 0; !expected && i < outputs.length; i++) {
      const o = outputs.get(i);
      if (o.type === 'error') { const e = o.toJSON(); errors.push(e.ename + ': ' + e.evalue); }
    }
    cells.push({index, count: cell.model.executionCount, prompt: prompt ? prompt.textContent : '', errors});
  });
  return {path: panel.context.path, kernel: session && session.kernel ? session.kernel.status : null, cells};
}"""

# Open a notebook in the loaded lab, as the file browser does (the command's result, the panel, stays in the page).
_OPEN_JS = "async (name) => { await window.jupyterapp.commands.execute('docmanager:open', {path: name}); }"

# Edit > Clear Outputs of All Cells: every code cell loses its outputs and its execution count, so a count
# seen afterwards comes from this run, not from the saved notebook.
_CLEAR_JS = "async () => { await window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs'); }"
_CLEARED_JS = "() => { const s = (" + _STATE_JS + ")(); return !!s && s.cells.every(c => c.count === null); }"
_ACTIVE_JS = "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex"

# Close a notebook's panel without the "save changes?" dialog (the notebooks are a private copy).
_CLOSE_JS = """(name) => {
  for (const w of Array.from(window.jupyterapp.shell.widgets('main'))) {
    if (w.context && w.context.path === name) w.dispose();
  }
}"""

# True once every code cell up to index `upto` has run (or one failed) and the kernel has been
# idle, with no cell waiting, on three polls in a row: nothing is queued any more.
_SETTLED_JS = "(upto) => { const state = (" + _STATE_JS + """)();
  if (!state) return false;
  const cells = state.cells.filter(c => c.index <= upto);
  const finished = cells.every(c => c.count !== null) || cells.some(c => c.errors.length);
  const idle = state.kernel === 'idle' && !state.cells.some(c => c.prompt.includes('*'));
  window.loraCourseSettled = (finished && idle) ? (window.loraCourseSettled || 0) + 1 : 0;
  return window.loraCourseSettled >= 3;
}"""

# The outputs a control drives: the Output widgets of its `interactive` box, else of its
# cell. `mark` tags the output nodes drawn now, so a redraw (new nodes) can be told from none.
_DRIVEN_JS = """(el, mark) => {
  const scope = el.closest('.widget-interact') || el.closest('.jp-Cell-outputArea') || el.closest('.jp-Cell');
  const outs = scope ? Array.from(scope.querySelectorAll('.widget-output')) : [];
  const nodes = outs.flatMap(o => Array.from(o.querySelectorAll('.jp-OutputArea-output')));
  const stale = nodes.filter(n => n.dataset.loraCourseSeen === '1').length;
  if (mark) nodes.forEach(n => { n.dataset.loraCourseSeen = '1'; });
  return {outputs: outs.length, text: outs.map(o => o.innerText).join('\\n'),
          images: outs.flatMap(o => Array.from(o.querySelectorAll('img')).map(i => i.src)),
          nodes: nodes.length, stale};
}"""

_READOUT_JS = """(el) => {
  const c = el.classList;
  if (c.contains('widget-slider')) {
    const readout = el.querySelector('.widget-readout');
    const handle = el.querySelector('[role=slider]');
    return (readout && readout.offsetParent !== null) ? readout.innerText
         : (handle ? handle.getAttribute('aria-valuetext') : '');
  }
  if (c.contains('widget-dropdown')) { const s = el.querySelector('select'); return s.options[s.selectedIndex].text; }
  if (c.contains('widget-checkbox')) return String(el.querySelector('input').checked);
  const active = el.querySelector('button.mod-active');
  return active ? active.innerText : '';
}"""

_LABEL_JS = """(el) => {
  for (const l of el.querySelectorAll('label')) {
    const text = l.innerText.replace(/\\u200b/g, '').trim();
    if (text) return text;
  }
  return el.className;
}"""


@dataclass
class Driven:
    outputs: int
    text: str
    images: list
    nodes: int
    stale: int

    @property
    def empty(self) -> bool:
        return not self.text.strip() and not self.images

    def describe(self) -> str:
        return (f"{self.outputs} Output widget(s), {len(self.text)} chars of text, {len(self.images)} image(s), "
                f"{self.stale} of {self.nodes} output node(s) from before the move")


class NotebookPage:
    """A Playwright page with JupyterLab loaded, showing one notebook at a time.

    Loading the lab app is the page's largest cost (several CPU seconds of Chromium), so
    the page is loaded once and later notebooks open in it, as a learner opens the next
    notebook from the file browser."""

    def __init__(self, page, lab: JupyterLab):
        self.page, self.lab, self.name = page, lab, None
        self.upto: int | None = None  # the last cell start_run runs (None: all of them)

    def open(self, name: str) -> None:
        """Open `name` (the first one loads the lab, from an empty workspace) and wait for its kernel."""
        if self.name is not None:
            raise RuntimeError(f"{self.name} is still open in this page; close_notebook() first")
        self.name = name  # from here on close_notebook() cleans up after it, also if the wait below fails
        if self.page.url.startswith(self.lab.base):
            self.page.evaluate(_OPEN_JS, name)
        else:
            self.page.goto(self.lab.url(f"lab/tree/{name}", "reset"), timeout=SERVER_START_S * 1000)
        self.page.wait_for_function(
            "(name) => { const s = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            " return s && s.context && s.context.path === name && s.sessionContext.session"
            " && s.sessionContext.session.kernel && s.sessionContext.session.kernel.status === 'idle'; }",
            arg=name, timeout=SERVER_START_S * 1000)

    def close_notebook(self) -> None:
        """Close the notebook's panel (unsaved: the copy is private) and end its kernel; the page stays loaded."""
        if self.name is None:
            return
        self.page.evaluate(_CLOSE_JS, self.name)
        self.lab.shutdown_sessions(self.name)
        self.name = None

    def state(self) -> dict:
        return self.page.evaluate(_STATE_JS)

    def start_run(self, upto: int | None = None) -> None:
        """Clear every output, then run the cells down to index `upto` from the menu bar, as a learner who
        stops at the widget does: select the cell after it, then Run > Run All Above Selected Cell (Run All
        Cells when `upto` is None or the last cell). The kernel queues those cells and runs them in order."""
        self.upto = upto
        self.page.evaluate(_CLEAR_JS)
        self.page.wait_for_function(_CLEARED_JS, polling=100, timeout=CONTROL_S * 1000)
        cells = self.panel().locator(".jp-Notebook .jp-Cell")
        run_all = upto is None or upto + 1 >= cells.count()
        if not run_all:
            cells.nth(upto + 1).locator(".jp-InputPrompt").click()
            active = self.page.evaluate(_ACTIVE_JS)
            if active != upto + 1:
                raise RuntimeError(f"{self.name}: clicked cell {upto + 1}, but cell {active} is selected")
        self.page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        item = "Run All Cells" if run_all else "Run All Above Selected Cell"
        self.page.get_by_role("menuitem", name=item, exact=True).click()

    def wait_run(self, timeout_s: float = RUN_ALL_S) -> dict:
        """Wait until every cell start_run queued has run (or one failed) and the kernel is idle; returns the
        final state. The page itself polls (twice a second), so a long run costs no round trips to Python."""
        upto = 1 << 30 if self.upto is None else self.upto
        self.page.evaluate("() => { window.loraCourseSettled = 0; }")
        try:
            self.page.wait_for_function(_SETTLED_JS, arg=upto, polling=500, timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            pending = [c["index"] for c in (self.state() or {"cells": []})["cells"]
                       if c["count"] is None and c["index"] <= upto]
            raise TimeoutError(f"{self.name}: cells {pending} had not run after {timeout_s:.0f} s") from None
        return self.state()

    def panel(self):
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def text(self) -> str:
        return self.panel().inner_text()

    def controls(self) -> list:
        return self.panel().locator(CONTROLS).all()

    def driven(self, control, mark: bool = False) -> Driven:
        return Driven(**control.evaluate(_DRIVEN_JS, mark))

    def readout(self, control) -> str:
        return control.evaluate(_READOUT_JS)

    def label(self, control) -> str:
        return control.evaluate(_LABEL_JS)

    def kernel_idle(self) -> bool:
        return self.state()["kernel"] == "idle"

    @staticmethod
    def kind(control) -> str:
        classes = (control.get_attribute("class") or "").split()
        for kind in ("slider", "dropdown", "checkbox", "toggle-buttons"):
            if f"widget-{kind}" in classes:
                return kind
        raise ValueError(f"not a control: {classes}")

    def move(self, control) -> tuple[str, str]:
        """Change one control as a learner would; returns its readout (before, after)."""
        before = self.readout(control)
        kind = self.kind(control)
        if kind == "slider":
            control.locator("[role=slider]").first.focus()
            keys = ["ArrowRight", "ArrowLeft"]  # the second one if the slider sits at its maximum
        elif kind == "dropdown":
            # Choose the next option (the previous one at the end), as a click in the open list
            # does: headless Chromium does not change a closed <select> on arrow keys.
            select = control.locator("select")
            options = select.locator("option").all_inner_texts()
            at = options.index(before) if before in options else 0
            select.select_option(index=at + 1 if at + 1 < len(options) else at - 1)
            keys = []
        elif kind == "checkbox":
            control.locator("input").focus()
            keys = ["Space"]
        else:
            control.locator("button:not(.mod-active)").first.click()
            keys = []
        for key in keys:
            self.page.keyboard.press(key)
            if self._wait(lambda: self.readout(control) != before, 2.0):
                break
        if not keys:
            self._wait(lambda: self.readout(control) != before, 2.0)
        return before, self.readout(control)

    def wait_for_redraw(self, control, before: Driven, new_content: bool,
                        timeout_s: float = CONTROL_S) -> Driven | None:
        """The driven output once it is drawn anew (no node of `before`, taken with
        mark=True, is left), differs from `before` if `new_content`, and the kernel is idle."""
        def redrawn():
            now = self.driven(control)
            if now.empty or now.stale or not now.nodes or not self.kernel_idle():
                return False
            return not new_content or (now.text, now.images) != (before.text, before.images)

        if not self._wait(redrawn, timeout_s):
            return None
        time.sleep(0.5)  # let a drawing still arriving land
        return self.driven(control)

    @staticmethod
    def _wait(predicate, timeout_s: float, every_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(every_s)
        return False


class SideBySide:
    """Notebooks run in JupyterLab `width` at a time, each in its own page and kernel.

    `ready(name)` opens `name` and the notebooks after it until `width` are running (each
    down to its last widget; the cells after it, exercises and solutions, do not run), then
    waits for `name` to get there: while one notebook's test checks its controls, the next
    one is already running. `close(name)` closes it and ends its kernel;
    its page, with the lab loaded, takes the next notebook. Notebooks are independent (own
    kernel, own temporary files), so running two at once is safe; it shortens the wall time,
    not the work."""

    def __init__(self, browser, lab: JupyterLab, names: list[str], width: int = 2):
        self.browser, self.lab, self.names, self.width = browser, lab, list(names), width
        self.contexts: list = []  # one browser context per page, each page a lane
        self.free: list[NotebookPage] = []
        self.running: dict[str, NotebookPage] = {}

    def _start(self, name: str) -> None:
        if self.free:
            nb = self.free.pop()
        else:
            context = self.browser.new_context(viewport={"width": 1280, "height": 900})
            self.contexts.append(context)
            nb = NotebookPage(context.new_page(), self.lab)
        self.running[name] = nb
        nb.open(name)
        nb.start_run(last_widget_cell(self.lab.root / name))

    def ready(self, name: str) -> tuple[NotebookPage, dict]:
        if name not in self.running:
            self._start(name)
        for later in self.names[self.names.index(name) + 1:]:
            if len(self.running) >= self.width:
                break
            if later not in self.running:
                self._start(later)
        nb = self.running[name]
        return nb, nb.wait_run()

    def close(self, name: str) -> None:
        nb = self.running.pop(name, None)
        if nb is None:
            return
        try:
            nb.close_notebook()
        except Exception:  # a page that cannot close its notebook is closed itself, and its kernel ended
            self.contexts.remove(nb.page.context)
            nb.page.context.close()
            self.lab.shutdown_sessions(name)
        else:
            self.free.append(nb)

    def close_all(self) -> None:
        for name in list(self.running):
            self.close(name)
        for context in self.contexts:
            context.close()
        self.contexts, self.free = [], []
