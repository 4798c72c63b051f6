"""00_baseline run through a real JupyterLab in a real (headless) Chromium, as a learner runs it.

Starts JupyterLab on 127.0.0.1 (a free port, a token, DEPLOYLAB_PROFILE=smoke) on a temporary copy
of notebooks/00_baseline.ipynb, opens it, checks that it runs on the "Python (deploylab)" kernel,
runs every cell from the Run menu, waits until every code cell has an execution count and the
kernel is idle, and checks that no cell shows a traceback and that the notebook's ipywidgets
slider renders. The committed notebook is never touched. A screenshot goes to build/ui/.

Uses Playwright for Python with the system's Chromium (/usr/bin/chromium); no browser download.
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
import time
from pathlib import Path

import httpx
import pytest

from deploylab import config

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = config.ROOT / "notebooks" / "00_baseline.ipynb"
SHOTS = config.ROOT / "build" / "ui"
RUN_TIMEOUT_S = 420  # the smoke run of 00 takes 1-2 minutes on 2 shared cores
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `sudo apt-get install chromium` "
                       "(make test installs it when run as root)"),
    pytest.mark.timeout(RUN_TIMEOUT_S + 180),
]
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b.*:", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a temporary copy of the notebook; yields (base URL, token, notebook copy)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path_factory.mktemp("lab-settings")
    # Render every cell (JupyterLab 4 virtualizes off-screen cells by default): the checks read the whole DOM.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "DEPLOYLAB_PROFILE": "smoke", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path_factory.mktemp("lab-workspaces")),
           "JUPYTER_RUNTIME_DIR": str(tmp_path_factory.mktemp("lab-runtime"))}
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root.parent / f"{root.name}-jupyterlab.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in 90 s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield base, token, root / NOTEBOOK.name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its kernels
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            yield browser.pages[0] if browser.pages else browser.new_page()
        finally:
            browser.close()


def _kernel_status(page) -> str | None:
    return page.evaluate("""() => {
        const el = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
        return el ? el.getAttribute('data-status') : null; }""")


def _prompts(page) -> list[str]:
    """The execution prompt of every code cell ("[3]:", "[*]:" while queued or running); "hidden" for a cell
    whose input is collapsed (the exercise's solution): its count is checked in the saved file instead."""
    return page.eval_on_selector_all(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", """els => els.map(c => {
        const p = c.querySelector('.jp-InputArea-prompt');
        return p ? p.textContent.trim() : 'hidden'; })""")


def test_00_baseline_runs_in_jupyterlab_without_errors_and_its_widget_renders(lab, page):
    base, token, copy = lab
    committed = NOTEBOOK.read_bytes()
    n_code = sum(c["cell_type"] == "code" for c in json.loads(copy.read_text())["cells"])
    page.goto(f"{base}/lab/tree/{copy.name}?token={token}", timeout=90_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=90_000)
    # a kernel chooser appears only if the notebook's kernel is unknown: pick "Python (deploylab)" then
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.is_visible():
        dialog.locator("select").select_option(label="Python (deploylab)")
        dialog.locator("button.jp-mod-accept").click()
    kernel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelName").first
    kernel.wait_for(timeout=60_000)
    deadline = time.monotonic() + 60
    while "Python (deploylab)" not in kernel.inner_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "Python (deploylab)" in kernel.inner_text(), f"kernel shown: {kernel.inner_text()!r}"
    # the kernel flickers busy/idle while it starts (comm and widget requests): wait for 3 s of idle
    deadline, idle_since, status = time.monotonic() + 90, None, None
    while time.monotonic() < deadline:
        status = _kernel_status(page)
        idle_since = (idle_since or time.monotonic()) if status == "idle" else None
        if idle_since and time.monotonic() - idle_since >= 3:
            break
        time.sleep(0.25)
    assert idle_since, f"the kernel did not start in 90 s: status {status!r}"

    # Run > Run All Cells, through the menu as a learner would
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    t0 = time.monotonic()
    prompts: list[str] = []
    while time.monotonic() - t0 < RUN_TIMEOUT_S:
        time.sleep(0.5)
        prompts = _prompts(page)
        done = len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:|hidden", p) for p in prompts)
        if done and _kernel_status(page) == "idle":
            break
        if _kernel_status(page) == "idle" and page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count():
            break  # Run All stops at a failed cell: report it now rather than at the time-out
    seconds = time.monotonic() - t0
    SHOTS.mkdir(parents=True, exist_ok=True)
    slider = page.locator(".jp-OutputArea-output .widget-slider").first
    if slider.count():
        slider.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "00_baseline.png"))
    print(f"Run All Cells: {seconds:.0f} s for {n_code} code cells; screenshot {SHOTS / '00_baseline.png'}")
    assert len(prompts) == n_code, f"{len(prompts)} code cells in the DOM, the notebook has {n_code}"
    unfinished = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:|hidden", p)]
    assert "hidden" not in prompts, f"no cell has its input collapsed (solutions print on demand): {prompts}"
    assert not unfinished, f"code cells without an execution count after {seconds:.0f} s: {unfinished} ({prompts})"

    # no traceback anywhere: errors render through the stderr renderer, so read their text
    stderr_texts = page.eval_on_selector_all(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', "els => els.map(e => e.innerText)")
    errors = [t[:500] for t in stderr_texts if TRACEBACK.search(t)]
    assert not errors, "cells failed in JupyterLab:\n" + "\n---\n".join(errors)

    # the ipywidgets slider is a live widget, not the "Loading widget..." placeholder or a plain-text repr
    assert page.locator(".jupyter-widgets.widget-slider, .widget-slider.jupyter-widgets").count() >= 1, \
        "no ipywidgets slider rendered (is the widget manager of ipywidgets in the lab extension?)"
    assert page.locator(".jp-OutputArea-output .widget-slider .widget-readout, .widget-slider .widget-readout").count() >= 1

    # the file saved by the UI agrees: every code cell ran, none holds an error output
    unsaved = copy.read_bytes()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 15  # Jupyter writes the file atomically: wait until it changed, not a fixed time
    while copy.read_bytes() == unsaved and time.monotonic() < deadline:
        time.sleep(0.2)
    saved = json.loads(copy.read_text())
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    assert all(isinstance(c.get("execution_count"), int) for c in code), "the saved copy has cells that did not run"
    assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert saved["metadata"]["kernelspec"]["name"] == "deploylab"
    assert NOTEBOOK.read_bytes() == committed, "the committed notebook was modified"
