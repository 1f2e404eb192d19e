"""The widgets in a real JupyterLab, driven by headless Chromium.

A JupyterLab server runs on 127.0.0.1 (a free port, a token, no browser of its own) over a temporary
root holding a copy of ``notebooks/00_quickstart.ipynb`` (toy model, 5 steps) and a small
mask-review notebook (tiny random pipeline, a stand-in segmenter unless ``DAAMLIB_SAM_CHECKPOINT``
names SAM weights). Chromium opens each notebook, runs all cells and uses the widgets as a person
would: in the heatmap browser it picks another token and types another τ, and the overlay / mask
images must change with no widget or kernel error; in the mask review it adds a background point
(the mask must change), accepts one sample and rejects the next, and the decisions must be on disk.
Screenshots go to ``<tmp_path>/screenshots`` and, when ``DAAMLIB_TEST_ARTIFACTS`` is set, there too.

Skipped, with the reason, when chromium / chromedriver are not on PATH or selenium or jupyterlab
is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPOSITORY / "notebooks"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1600,1400"]
RUN_TIMEOUT = 600  # seconds for "run all cells" on a 2-core CPU


def test_every_notebook_cell_has_an_id():
    """Cells without ids make nbformat/papermill warn (MissingIDFieldWarning) on every run."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5), path.name
        ids = [cell.get("id") for cell in notebook["cells"]]
        assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: cells without ids or with repeated ids"


# -- what the test needs --------------------------------------------------------------------------
def _browser_or_skip() -> tuple[str, str]:
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: chromium and chromedriver must be on PATH "
                    "(Debian: apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium, or pip install -e '.[dev]')")
    try:
        import jupyterlab  # noqa: F401
        import jupyterlab_widgets  # noqa: F401
    except ImportError:
        pytest.skip("jupyterlab / jupyterlab_widgets are not installed (pip install -e '.[notebooks]')")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_parameters(notebook: dict, **values) -> dict:
    """Replace assignments in the ``parameters`` cell (one ``name = value`` line each)."""
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = "".join(cell["source"]).splitlines()
    for name, value in values.items():
        index = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == name)
        lines[index] = f"{name} = {value!r}"
    cell["source"] = "\n".join(lines) + "\n"
    return notebook


def _code_notebook(*sources: str) -> dict:
    cells = [{"cell_type": "code", "execution_count": None, "id": uuid.uuid4().hex[:8], "metadata": {},
              "outputs": [], "source": source} for source in sources]
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                         "name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}


REVIEW_CELLS = (
    """import os
import numpy as np
from daamlab.testing.unet import tiny_random_pipeline
from daamlab.experiments import build_dataset
from daamlab.review import MaskReview

class BoxSegmenter:
    # a stand-in for SAM: the prompt's box, 3x3 squares set at object / cleared at background points
    def __call__(self, image, box, points, labels):
        mask = np.zeros(image.shape[:2], bool)
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
        for (x, y), label in zip(np.round(points).astype(int), labels):
            mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = bool(label)
        return mask

checkpoint = os.environ.get("DAAMLIB_SAM_CHECKPOINT")
if checkpoint:
    from daamlab.sam import SamSegmenter, load_sam
    segmenter = SamSegmenter(load_sam(checkpoint))
else:
    segmenter = BoxSegmenter()""",
    """dataset = build_dataset(tiny_random_pipeline(), "dataset", ["car", "person"], [0, 1], num_inference_steps=2,
                        progress=False)""",
    """review = MaskReview(dataset, segmenter)
review.widget""",
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, root dir, artifact dirs) of a JupyterLab server with the test notebooks."""
    _browser_or_skip()
    root = tmp_path_factory.mktemp("lab-root")
    state = tmp_path_factory.mktemp("lab-state")
    quickstart = json.loads((NOTEBOOKS / "00_quickstart.ipynb").read_text())
    _set_parameters(quickstart, run_dir=str(root / "run"), num_inference_steps=5, device="cpu")
    (root / "00_quickstart.ipynb").write_text(json.dumps(quickstart, indent=1))
    (root / "review.ipynb").write_text(json.dumps(_code_notebook(*REVIEW_CELLS), indent=1))
    settings = state / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM (no windowing), so widgets can be found and clicked wherever they are
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = state / "settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(state / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.user_settings_dir={state / 'settings'}", f"--LabApp.workspaces_dir={state / 'workspaces'}",
         "--LabApp.expose_app_in_browser=True", *(["--allow-root"] if os.name == "posix" and os.geteuid() == 0 else []), "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5).read()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"JupyterLab did not start:\n{(state / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    artifacts = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("DAAMLIB_TEST_ARTIFACTS"):
        artifacts.append(Path(os.environ["DAAMLIB_TEST_ARTIFACTS"]))
        artifacts[-1].mkdir(parents=True, exist_ok=True)
    yield base, token, root, artifacts
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture()
def driver(lab, tmp_path):
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.set_script_timeout(60)
    yield browser
    browser.quit()


# -- driving JupyterLab -----------------------------------------------------------------------------
def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    """Poll ``condition`` until it is truthy; an element the page re-rendered meanwhile counts as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _open_and_run_all(driver, lab, name: str) -> None:
    base, token, _, _ = lab
    driver.get(f"{base}/lab/tree/{name}?token={token}")
    # the notebook panel by its path (headless Chromium may leave shell.currentWidget unset)
    find = ("const app = window.jupyterapp; const w = app && Array.from(app.shell.widgets('main'))"
            ".find(x => x.context && x.context.path === arguments[0]);")
    ready = find + ("if (w) app.shell.activateById(w.id); const s = w && w.sessionContext;"
                    "return !!(s && s.session && s.session.kernel && s.session.kernel.connectionStatus === 'connected'"
                    " && s.session.kernel.status === 'idle');")
    _wait(lambda: driver.execute_script(ready, name), 180, f"{name} open with an idle kernel")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    done = find + ("const kernel = w.sessionContext.session.kernel;"
                   "const cells = Array.from(w.content.model.cells).filter(c => c.type === 'code');"
                   "return kernel.status === 'idle' && cells.every(c => c.executionCount !== null"
                   " && c.executionState !== 'running');")
    _wait(lambda: driver.execute_script(done, name), RUN_TIMEOUT, f"all cells of {name} to run", poll=2)
    errors = driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
        ".map(e => e.innerText).filter(t => t.includes('Traceback') || t.includes('Error displaying widget'));")
    assert not errors, f"{name}: cells failed:\n" + "\n".join(errors)[-3000:]


def _image_digest(driver, element) -> str:
    """A digest of the bytes an <img> shows (ipywidgets serves them as blob: URLs, new on every update)."""
    data = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => {"
        " const bytes = new Uint8Array(b); let s = ''; for (const x of bytes) s += String.fromCharCode(x);"
        " done(btoa(s)); }).catch(e => done('error: ' + e));", element)
    assert not data.startswith("error"), data
    return hashlib.sha256(data.encode()).hexdigest()


def _widget_errors(driver) -> list[str]:
    return driver.execute_script(
        "const texts = Array.from(document.querySelectorAll('.jp-OutputArea-output, .daamlib-error'))"
        ".map(e => e.innerText);"
        "return texts.filter(t => /Error displaying widget|Model not found|Traceback/.test(t))"
        ".concat(Array.from(document.querySelectorAll('.daamlib-error')).map(e => 'widget message: ' + e.innerText));")


def _screenshot(driver, lab, name: str, element=None) -> None:
    for folder in lab[3]:
        path = folder / f"{name}.png"
        if element is not None:
            element.screenshot(str(path))
        else:
            driver.save_screenshot(str(path))


def _changed(driver, element, before: str, what: str, timeout: float = 120) -> str:
    return _wait(lambda: (d := _image_digest(driver, element)) != before and d, timeout, what)


def _set_text(driver, element, value) -> None:
    from selenium.webdriver.common.keys import Keys

    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(str(value))
    element.send_keys(Keys.ENTER)


# -- the tests -------------------------------------------------------------------------------------
def test_heatmap_browser_in_jupyterlab(driver, lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open_and_run_all(driver, lab, "00_quickstart.ipynb")
    overlay = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "img.daamlib-overlay"), 60, "the overlay image")[0]
    mask = driver.find_element(By.CSS_SELECTOR, "img.daamlib-mask")
    browser = driver.find_element(By.CSS_SELECTOR, ".daamlib-token").find_element(
        By.XPATH, "ancestor::div[contains(@class, 'jp-OutputArea-output')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", browser)
    token = Select(driver.find_element(By.CSS_SELECTOR, ".daamlib-token select"))
    assert token.first_selected_option.text == "car"  # opens on the object word, not on "a"
    _screenshot(driver, lab, "heatmap_browser_opened", browser)
    overlay_before, mask_before = _image_digest(driver, overlay), _image_digest(driver, mask)

    token.select_by_visible_text("environment")
    overlay_after = _changed(driver, overlay, overlay_before, "the overlay to change with the token")
    assert not _widget_errors(driver)

    readout = driver.find_element(By.CSS_SELECTOR, ".daamlib-threshold .widget-readout")
    mask_token = _image_digest(driver, mask)
    _set_text(driver, readout, 0.8)
    _wait(lambda: "τ = 0.80" in driver.find_element(By.XPATH, "//*[contains(text(), 'tick at')]").text, 60,
          "the scale label to report τ = 0.80")
    _changed(driver, mask, mask_token, "the mask to change with τ")
    assert _image_digest(driver, overlay) == overlay_after  # τ moves the mask, not the D / max D overlay
    assert _image_digest(driver, mask) != mask_before
    assert not _widget_errors(driver)
    _screenshot(driver, lab, "heatmap_browser_environment_tau080", browser)
    _screenshot(driver, lab, "heatmap_browser_page")


def test_mask_review_in_jupyterlab(driver, lab):
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    from daamlab.experiments import ThesisDataset
    from daamlab.review import DECISIONS_FILE
    from daamlib.methods import daam
    from daamlab.sam import heatmap_prompt

    _open_and_run_all(driver, lab, "review.ipynb")
    root = lab[2]

    def button(label):
        return driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']")

    view = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img.widget-image"), 60,
                 "the review image")[0]
    widget = view.find_element(By.XPATH, "ancestor::div[contains(@class, 'jp-OutputArea-output')]")
    dataset = ThesisDataset.open(root / "dataset")
    row = dataset.manifest.iloc[0]
    image = dataset.image(row)
    box, peak = heatmap_prompt(daam(dataset.record(row), row["word"]), image.shape, 0.4)
    x, y = int(peak[0][0]), int(peak[0][1])  # a background point on the heatmap's own object point
    before = _image_digest(driver, view)
    button("background").click()
    inputs = widget.find_elements(By.CSS_SELECTOR, ".widget-text input")
    _set_text(driver, inputs[0], x)
    _set_text(driver, inputs[1], y)
    button("add point").click()
    _changed(driver, view, before, "the mask to change after a background point")
    assert not _widget_errors(driver)
    _screenshot(driver, lab, "mask_review_background_point", widget)

    decisions_path = root / "dataset" / DECISIONS_FILE
    button("accept").click()
    _wait(lambda: decisions_path.exists() and json.loads(decisions_path.read_text())[row["name"]]["status"] == "accepted",
          60, "the accepted decision on disk")
    decision = json.loads(decisions_path.read_text())[row["name"]]
    assert decision["points"] == [[x, y]] and decision["labels"] == [0]
    saved = np.asarray(Image.open(root / "dataset" / row["mask"])) > 127
    assert not saved[y, x] and saved.any()  # the background point cleared the accepted mask there

    second = dataset.manifest.iloc[1]
    _wait(lambda: f"{second['name']}</b>" in widget.get_attribute("innerHTML") or second["name"] in widget.text, 60,
          "the next sample")
    button("reject").click()
    _wait(lambda: json.loads(decisions_path.read_text())[second["name"]]["status"] == "rejected", 60,
          "the rejected decision on disk")
    assert not (root / "dataset" / second["mask"]).exists()  # a rejected sample keeps no mask
    _wait(lambda: "1 accepted, 1 rejected" in widget.text, 60, "the summary to count the decisions")  # the view updates after the file
    assert not _widget_errors(driver)
    _screenshot(driver, lab, "mask_review_after_accept_reject", widget)
