"""JupyterLab for real: a notebook opened and run in headless Chromium, its NiiVue viewer checked on screen.

Starts `jupyter lab` on loopback (no token; `--allow-root` because CI runs as root) and
Debian's Chromium with the flags below and a fresh profile, drives it through Playwright
over the DevTools protocol, runs every cell of a parameterised copy of 01_convert, and
checks that the interactive viewer drew into its canvas, that the browser console has
no errors and that the saved notebook has no error output. The screenshot is kept in
`test-artifacts/`. Server and browser are stopped by their own process ids.

The second test opens 05_validate on a small trained run whose validation predictions were
moved by hand (tumours shifted one voxel) and given uncertainty maps by hand (doubt around the
shifted tumour, a fully uncertain block of liver far from it), steps to the second case of the
review browser, checks that the canvas shows the four error-map colours, then the heat map in the
uncertainty mode and that "most uncertain" moves the crosshair into that block, opens the 3D
view, records a verdict and finds it in `qa_review.csv`.
"""
from __future__ import annotations

import csv
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
    yield from serve_lab(tmp_path, work)


def serve_lab(tmp_path: Path, work: Path):
    """Run JupyterLab on loopback over `work` (every cell rendered: no windowing); yield (url, work); stop it."""
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "IPYTHONDIR": str(tmp_path / "ipy")}
    settings = tmp_path / "cfg" / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # outputs far down drawn too
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


def run_all_cells(page, url: str) -> None:
    """Open a notebook once its kernel is ready and start Run All Cells from the menu."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)  # kernel ready
    for attempt in range(2):  # a click that lands while JupyterLab is still settling is retried once
        select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
        if select.count():  # a loaded machine can open the notebook before the kernel specs: take the default
            select.click()
        page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").first.click()  # the notebook is the current widget
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            page.wait_for_selector(".jp-InputPrompt:has-text('[1]')", timeout=60_000)  # the first cell ran
            break
        except Exception:
            if attempt:
                raise


def wait_all_ran(page, timeout_ms: int = 240_000) -> None:
    """Wait until no cell is queued or running."""
    page.wait_for_function("![...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'))",
                           timeout=timeout_ms)


def new_page(browser, errors: list[str]):
    """A 1400 x 1000 page that collects console errors and page errors into `errors`."""
    page = browser.contexts[0].new_page() if browser.contexts else browser.new_page()
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return page


def test_notebook_runs_in_jupyterlab_and_the_viewer_renders(lab, browser):
    from PIL import Image

    url, work = lab
    errors: list[str] = []
    page = new_page(browser, errors)
    try:
        run_all_cells(page, f"{url}/lab/tree/01_convert.ipynb")
        canvas = page.wait_for_selector(".jp-OutputArea-output canvas", timeout=240_000)
        wait_all_ran(page)
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
    from unetpp_lib.qa.plots import PALETTE

    tinted = hue_pixels(shot, PALETTE["liver"]) + hue_pixels(shot, PALETTE["tumour"])
    assert tinted > 100, "no label overlay (in the palette's liver green or tumour blue) in the viewer"
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


# ----------------------------------------------------------------------------- the review browser of 05_validate
def notebook_errors(page, saved: Path) -> list[str]:
    """Save the open notebook and return its error outputs (ename: evalue), to say why a run stopped."""
    before = saved.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    deadline = time.time() + 30
    while saved.stat().st_mtime_ns == before and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    cells = json.loads(saved.read_text())["cells"]
    return [f"{o['ename']}: {o['evalue']}" for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]


def hue_pixels(shot: np.ndarray, rgb: tuple[float, float, float], tolerance_deg: float = 14) -> int:
    """Pixels of a screenshot with the hue of `rgb` and some colour (blending over grey CT keeps the hue)."""
    from matplotlib.colors import rgb_to_hsv

    px = shot.reshape(-1, 3).astype(np.float64) / 255
    hue = rgb_to_hsv(px)[:, 0] * 360
    chroma = px.max(1) - px.min(1)
    target = rgb_to_hsv(np.array(rgb, float))[0] * 360
    return int(((np.abs((hue - target + 180) % 360 - 180) < tolerance_deg) & (chroma > 0.12)).sum())


def shifted_tumour(ref: np.ndarray) -> np.ndarray:
    """The reference with its tumour moved one voxel along x: agreed, missed and invented tumour side by side."""
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)
    pred[np.roll(ref == 2, 1, axis=2) & (ref > 0)] = 2
    return pred


def doubt_maps(ref: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Uncertainty maps by hand (uint8 %): entropy 40 on and around where the shifted tumour is wrong, 100 in a
    5-voxel cube of liver farthest from the tumour (the most uncertain point), 2 (below the heat map's floor)
    elsewhere in the prediction; confidence 60 where doubtful, else 97; spread a third of the entropy."""
    from scipy import ndimage

    entropy = np.where(pred > 0, 2, 0).astype(np.uint8)
    entropy[ndimage.binary_dilation(pred != ref)] = 40
    far = np.zeros(ref.shape)
    inner = tuple(slice(m, n - m) for n in ref.shape for m in [min(2, (n - 1) // 2)])  # the cube inside the volume
    far[inner] = np.where(pred[inner] == 1, ndimage.distance_transform_edt(ref != 2)[inner], 0)
    z, y, x = np.unravel_index(np.argmax(far), far.shape)
    entropy[max(0, z - 2):z + 3, y - 2:y + 3, x - 2:x + 3] = 100  # scans of 4 slices: all of them
    return {"entropy": entropy, "spread": entropy // 3, "confidence": np.where(entropy >= 40, 60, 97).astype(np.uint8)}


@pytest.fixture
def review_lab(tmp_path):
    """A small trained run whose fold 0 validation predictions are shifted tumours, and 05_validate for it."""
    import papermill

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import prepared_run
    from unetpp_lib import validate
    from unetpp_lib.core import io
    from unetpp_lib.core.layout import PredLayout
    from unetpp_lib.prep import synthetic
    from unetpp_lib.nn.infer import InferenceSettings
    from unetpp_lib.train import TrainConfig, train

    task = synthetic.make_msd_task(tmp_path / "msd" / "Task03_Liver", num_training=4, num_test=0,
                                   shape=(20, 56, 56), seed=45)  # its 3 validation cases have 64-148 tumour voxels
    validation = sorted((task / "labelsTr").glob("liver_*.nii.gz"))[1:]
    tumours = [(np.rint(io.read_image(f)[0]) == 2).sum() for f in validation]
    assert min(tumours) >= 50, f"the browser test needs a visible tumour in each validation case: {tumours}"
    run = prepared_run(tmp_path, task, {"patch_size": [16, 32, 32], "base_num_features": 4})
    cases = sorted(p.name[:-7] for p in (run / "raw" / "labelsTr").glob("*.nii.gz"))
    io.write_json(run / "preprocessed" / "splits.json", [{"train": cases[:1], "val": cases[1:]}])
    train(TrainConfig(str(run), fold=0, num_epochs=1, iterations_per_epoch=2, val_iterations=1, num_workers=0,
                      device="cpu"))
    # predictions with the notebook's settings (so it keeps them), then moved by hand, with uncertainty maps
    # (all three: the notebook predicts a case again where one is missing)
    validate.predict_validation(run, 0, InferenceSettings(device="cpu", mirror_axes=()))
    out = PredLayout(run / "fold_0" / "validation")
    for c in cases[1:]:
        ref, geom = io.read_image(run / "raw" / "labelsTr" / f"{c}.nii.gz")
        pred = shifted_tumour(ref.astype(np.uint8))
        io.write_image(out.case(c), pred, geom)
        for kind, values in doubt_maps(ref.astype(np.uint8), pred).items():
            io.write_image(out.uncertainty(c, kind), values, geom)
    work = tmp_path / "lab"
    work.mkdir()
    papermill.execute_notebook(str(ROOT / "notebooks" / "05_validate.ipynb"), str(work / "05_validate.ipynb"),
                               prepare_only=True, parameters={
                                   "run_dir": str(run), "device": "cpu", "mirror_axes": [], "predict_test": False,
                                   "num_workers": 1, "viewer": "niivue", "headless": False, "review_source": "validation"})
    for served in serve_lab(tmp_path, work):
        yield (*served, run)


def canvas_shot(page, name: str) -> np.ndarray:
    """The review's planes canvas as RGB pixels, also saved in test-artifacts/ as `name`."""
    from PIL import Image

    planes = page.locator(".jp-OutputArea-output canvas").last
    planes.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    shot = np.asarray(Image.open(io.BytesIO(planes.screenshot())).convert("RGB"))
    Image.fromarray(shot).save(ARTIFACTS / name)
    return shot


HEAT_HUES = ((1.0, 0.5, 0.0), 35)  # the heat map's red, orange and yellow: hue 30 +- 35 degrees


def test_review_browser_steps_shows_errors_3d_and_saves_a_verdict(review_lab, browser):
    from PIL import Image

    from unetpp_lib.core.io import read_image
    from unetpp_lib.core.layout import PredLayout
    from unetpp_lib.evaluation.uncertainty import most_uncertain_point
    from unetpp_lib.qa import plots, review

    url, work, run = review_lab
    errors: list[str] = []
    page = new_page(browser, errors)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        run_all_cells(page, f"{url}/lab/tree/05_validate.ipynb")
        nxt = page.get_by_role("button", name="next >")
        nxt.wait_for(timeout=300_000)
        wait_all_ran(page, 300_000)
        cases = review.cases_of(run, "validation", 0)
        order = [r["case"] for r in review.sort_rows(review.case_rows(cases), next(iter(review.SORTS)))]
        news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's "notified about news?" toast
        if news.count():
            news.first.click()
        nxt.click()  # the second case of the list (tumour Dice, worst first)
        page.get_by_text(f"{order[1]} (fold_0/validation)").wait_for(timeout=60_000)
        page.wait_for_timeout(4000)  # NiiVue receives and draws the case's volumes
        shot = canvas_shot(page, "review_error_map.png")
        seen = {name: hue_pixels(shot, rgb) for name, rgb in plots.PALETTE.items()}
        assert all(n > 30 for n in seen.values()), f"error-map colours on the canvas (pixels): {seen}"
        # the uncertainty mode: the heat map alone over the CT (the label overlays hidden)
        page.get_by_role("button", name="uncertainty", exact=True).click()
        page.wait_for_timeout(1500)
        heat = canvas_shot(page, "review_uncertainty.png")
        seen = {"heat": hue_pixels(heat, *HEAT_HUES), "tumour": hue_pixels(heat, plots.PALETTE["tumour"]),
                "invented": hue_pixels(heat, plots.PALETTE["invented"])}
        assert seen["heat"] > 100 and seen["tumour"] < 30 and seen["invented"] < 30, f"heat map (pixels): {seen}"
        # "most uncertain" moves the crosshair into the fully uncertain (yellow) block
        entropy = read_image(PredLayout(run / "fold_0" / "validation").uncertainty(order[1]))[0]
        z, y, x = most_uncertain_point(entropy)
        page.get_by_role("button", name="most uncertain").click()
        page.get_by_text(f"crosshair at (z, y, x) ({z}, {y}, {x}), uncertainty 100 %").wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        moved = canvas_shot(page, "review_most_uncertain.png")
        yellow = (hue_pixels(heat, (1.0, 1.0, 0.0)), hue_pixels(moved, (1.0, 1.0, 0.0)))
        assert yellow[1] > 200 and yellow[1] > yellow[0], f"fully uncertain block before / after the jump: {yellow}"
        assert page.locator("select option", has_text="tumour probability").count() > 0  # lesion confidences
        page.get_by_role("button", name="error map", exact=True).click()
        page.get_by_role("button", name="3D view").click()
        page.wait_for_function("document.querySelectorAll('.jp-OutputArea-output canvas').length >= 2",
                               timeout=60_000)
        page.wait_for_timeout(5000)
        render = page.locator(".jp-OutputArea-output canvas").last
        shot3d = np.asarray(Image.open(io.BytesIO(render.screenshot())).convert("RGB"))
        Image.fromarray(shot3d).save(ARTIFACTS / "review_3d.png")
        coloured = sum(hue_pixels(shot3d, rgb) for rgb in plots.PALETTE.values())
        assert coloured > 200, f"the 3D view shows no surfaces ({coloured} coloured pixels)"
        page.get_by_placeholder("note").fill("tumour edge one voxel off")
        page.get_by_placeholder("note").press("Enter")
        page.get_by_role("button", name="fix", exact=True).click()
        page.get_by_text("fix saved to").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab_05_review.png"), full_page=False)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "jupyterlab_review_failure.png"))
        print("\n".join(errors), notebook_errors(page, work / "05_validate.ipynb"))  # shown with the failure
        raise
    saved = list(csv.DictReader(open(run / "fold_0" / "validation" / "qa_review.csv")))
    assert [(r["case"], r["verdict"], r["note"]) for r in saved] == [(order[1], "fix", "tumour edge one voxel off")]
    assert not errors, "\n".join(errors)
