"""JupyterLab for real: a notebook opened and run in headless Chromium, its NiiVue viewer checked on screen.

Starts `jupyter lab` on loopback (no token; `--allow-root` because CI runs as root) and
Debian's Chromium with the flags below and a fresh profile, drives it through Playwright
over the DevTools protocol, runs every cell of a parameterised copy of 01_convert, and
checks that the interactive viewer drew into its canvas, that the browser console has
no errors and that the saved notebook has no error output. The screenshot is kept in
`test-artifacts/`. Server and browser are stopped by their own process ids.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its process group, by its pid: TERM, then KILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


def devtools_endpoint(proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    """The browser's DevTools websocket, from the line Chromium prints on start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"DevTools listening on (ws://\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"chromium did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a folder with 01_convert parameterised for a tiny synthetic case."""
    import papermill

    work = tmp_path / "lab"
    work.mkdir()
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_convert.ipynb"), str(work / "01_convert.ipynb"),
                               prepare_only=True, parameters={
                                   "run_dir": str(tmp_path / "run"), "synth_num_training": 2, "synth_num_test": 0,
                                   "synth_shape": [16, 48, 48], "num_workers": 1, "viewer": "niivue",
                                   "headless": False})
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "IPYTHONDIR": str(tmp_path / "ipy")}
    log = tmp_path / "jupyter.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", "--allow-root", "--IdentityProvider.token=", "--ServerApp.password=",
             f"--ServerApp.root_dir={work}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status", server, log)
        yield f"http://127.0.0.1:{port}", work
    finally:
        stop(server)


@pytest.fixture
def browser(tmp_path):
    """Debian's Chromium, headless with a fresh profile, and Playwright attached to it."""
    from playwright.sync_api import sync_playwright

    log = tmp_path / "chromium.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                                 "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        endpoint = devtools_endpoint(proc, log)
        with sync_playwright() as pw:
            b = pw.chromium.connect_over_cdp(endpoint)
            yield b
            b.close()
    finally:
        stop(proc)


def test_notebook_runs_in_jupyterlab_and_the_viewer_renders(lab, browser):
    from PIL import Image

    url, work = lab
    page = browser.contexts[0].new_page() if browser.contexts else browser.new_page()
    page.set_viewport_size({"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    try:
        page.goto(f"{url}/lab/tree/01_convert.ipynb")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)  # kernel ready
        for attempt in range(2):  # a click that lands while JupyterLab is still settling is retried once
            page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").first.click()  # the notebook is the current widget
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
            try:
                page.wait_for_selector(".jp-InputPrompt:has-text('[1]')", timeout=60_000)  # the first cell ran
                break
            except Exception:
                if attempt:
                    raise
        canvas = page.wait_for_selector(".jp-OutputArea-output canvas", timeout=240_000)
        page.wait_for_function("![...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'))",
                               timeout=240_000)  # no cell still queued or running
        page.wait_for_timeout(3000)  # let NiiVue draw the volumes it received
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 200
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab_01_convert.png"), full_page=False)
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab_failure.png"))
        raise
    Image.fromarray(shot).save(ARTIFACTS / "jupyterlab_niivue_canvas.png")
    # drawn: a CT in grey levels plus the coloured label overlay, not a blank or single-colour canvas
    colours = np.unique(shot.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 50, f"viewer canvas looks empty ({len(colours)} colours)"
    tinted = (np.abs(shot[..., 0].astype(int) - shot[..., 2]) > 40).sum()
    assert tinted > 100, "no label overlay in the viewer"
    saved = work / "01_convert.ipynb"
    before = saved.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    deadline = time.time() + 60
    while saved.stat().st_mtime_ns == before and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the contents API writes the file in one go; give it a moment to close it
    cells = json.loads(saved.read_text())["cells"]
    outs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outs if o["output_type"] == "error"], [o.get("evalue") for o in outs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs)  # the live viewer
    assert not errors, "\n".join(errors)
