"""`sdtune ui` driven in headless Chromium: train a LoRA on the builtin model, watch progress reach 100%,
generate with it through the artifact picker, open a comparison report, inspect and convert the artifact.

Skips cleanly when chromium, chromedriver, selenium or gradio is missing. Set SDTUNE_UI_SCREENSHOTS=DIR to
write a screenshot of each tab there (docs/ui-*.png come from this test).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from headless import chromium, chromium_paths  # noqa: E402

if not all(chromium_paths()):  # skip before the app starts
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 60  # seconds: the longest any step may take (training a few steps takes a few seconds)


def fake_compare(out: Path, methods: str) -> list[str]:
    """Stands in for `sdtune compare` (minutes of training): prints progress, writes a report."""
    script = ("import sys, pathlib; out = pathlib.Path(sys.argv[1]); print('comparing', sys.argv[2]); "
              "(out / 'report.html').write_text('<h2>Comparison of ' + sys.argv[2] + '</h2>')")
    return [sys.executable, "-c", script, str(out), methods]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The app on 127.0.0.1 with a free port, serving a fresh workspace; stopped at the end."""
    from sdtune.ui import create_app
    from sdtune.ui.server import start_in_thread

    root = tmp_path_factory.mktemp("ui")
    app = create_app("builtin", root / "workspace", compare=fake_compare)
    server = start_in_thread(app.asgi, "127.0.0.1", 0)
    assert server.url.startswith("http://127.0.0.1:")
    yield app, server, root
    server.stop()
    assert not server.thread.is_alive()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        driver.set_page_load_timeout(WAIT)
        yield driver


def wait_for(driver, condition, timeout: float = WAIT, message: str = ""):
    """Poll `condition(driver)` until it returns something truthy (stale elements are retried); a timeout
    reports the page's status lines."""
    try:
        return WebDriverWait(driver, timeout, 0.2, ignored_exceptions=(StaleElementReferenceException,)).until(
            condition)
    except TimeoutException:
        notices = {e.get_attribute("id"): e.text for e in driver.find_elements(By.CSS_SELECTOR, "[id$=-notice]")}
        raise AssertionError(f"{message}; status lines: {notices}") from None


def by_id(driver, elem_id: str):
    return driver.find_element(By.ID, elem_id)


def value_of(driver, elem_id: str) -> str:
    """The current text of the input (or textarea) inside component `elem_id`."""
    return by_id(driver, elem_id).find_element(By.CSS_SELECTOR, "input, textarea").get_attribute("value")


def type_into(driver, elem_id: str, text: str) -> None:
    """Replace the text of the input (or textarea) inside component `elem_id`, as a user types it."""
    field = by_id(driver, elem_id).find_element(By.CSS_SELECTOR, "input, textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    driver.execute_script("arguments[0].blur()", field)  # Gradio commits number fields on change


def choose(driver, elem_id: str, prefix: str) -> None:
    """Open dropdown `elem_id` and click the option whose label starts with `prefix`."""
    by_id(driver, elem_id).find_element(By.CSS_SELECTOR, "input").click()
    options = "[data-testid=dropdown-option]"
    wait_for(driver, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, options)
                                     if o.text.startswith(prefix)), None),
             message=f"no option {prefix!r} in {elem_id}").click()


def open_tab(driver, label: str) -> None:
    buttons = driver.find_elements(By.CSS_SELECTOR, "#sd-tabs button[role='tab']")
    next(b for b in buttons if b.text.strip() == label).click()


def shot(driver, name: str) -> None:
    folder = os.environ.get("SDTUNE_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(folder) / f"ui-{name}.png"))


def test_train_generate_compare_artifacts_in_a_browser(ui, browser):
    from sdtune.toyworld.subject import write_instance_images

    app, server, root = ui
    browser.get(server.url)
    wait_for(browser, lambda d: "No training yet" in by_id(d, "train-progress").text, message="page never loaded")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(server.url) for url in fetched)  # nothing from outside this machine

    # Train: upload the builtin subject's images, a LoRA for a few steps, validation images on the way.
    images = write_instance_images(root / "upload")
    by_id(browser, "train-upload").find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
        "\n".join(str(p) for p in images))
    wait_for(browser, lambda d: "Uploaded 5 images" in by_id(d, "train-notice").text, message="upload not saved")
    type_into(browser, "train-class", "circle")
    type_into(browser, "train-steps", "12")
    type_into(browser, "train-validate", "6")
    type_into(browser, "train-ckpt", "0")
    by_id(browser, "train-start").click()
    wait_for(browser, lambda d: "Started sks" in by_id(d, "train-notice").text, message="training did not start")
    by_id(browser, "train-start").click()  # a second training while one runs is refused in one sentence
    wait_for(browser, lambda d: by_id(d, "train-notice").text == "Error: A training (sks) is already running; "
             "wait for it to finish or cancel it before starting another.", message="no answer to a second start")
    done = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#train-progress .sd-progress[data-state=done]"),
                    message="training never finished")
    assert "100%" in done.text and "step 12 of 12" in done.text
    assert "wrote sks.safetensors" in done.text
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#train-validation img")) == 2,
             message="validation images (steps 6 and 12) not shown")
    assert (app.state.workspace.runs / "sks" / "sks.safetensors").is_file()
    shot(browser, "train")

    # Generate: pick the new LoRA from the picker, which writes <lora:sks:1> into the prompt.
    open_tab(browser, "Generate")
    type_into(browser, "gen-count", "2")
    choose(browser, "gen-picker", "sks · lora")
    wait_for(browser, lambda d: value_of(d, "gen-prompt") == "a photo of a sks circle <lora:sks:1>",
             message="the picker did not insert the LoRA tag")
    by_id(browser, "gen-run").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gen-gallery img")) == 2,
             message="generated images never appeared")
    assert "2 image(s), seed 0" in by_id(browser, "gen-notice").text
    assert len(list(app.state.workspace.generations.glob("*.png"))) == 3  # two images and their grid
    shot(browser, "generate")

    # Generate errors read as the CLI's one-line messages.
    type_into(browser, "gen-prompt", "a sks circle <lora:nosuch:1>")
    by_id(browser, "gen-run").click()
    wait_for(browser, lambda d: by_id(d, "gen-notice").text.startswith("Error: ") and "nosuch" in
             by_id(d, "gen-notice").text, message="a missing LoRA gave no error")

    # Compare: open an existing report folder; its report.html (and the images it links) load in a frame.
    report = make_report(app.state.workspace.comparisons / "lora-vs-ti")
    open_tab(browser, "Compare")
    type_into(browser, "cmp-folder", str(report))
    by_id(browser, "cmp-open").click()
    frame = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#cmp-report iframe"), message="no report")
    browser.switch_to.frame(frame)
    wait_for(browser, lambda d: "Four methods, one subject" in d.find_element(By.TAG_NAME, "h1").text)
    assert browser.execute_script("return document.querySelector('img').naturalWidth") == 64
    browser.switch_to.default_content()
    assert "lora" in by_id(browser, "cmp-results").text
    shot(browser, "compare")
    (root / "secret.txt").write_text("not served")
    key = app.state.reports.register(report)
    for escape in ("..%2F..%2F..%2F..%2Fsecret.txt", "%2E%2E/%2E%2E/%2E%2E/%2E%2E/secret.txt"):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{server.url}sdtune/reports/{key}/{escape}", timeout=10)

    # ... or run a comparison (here a stand-in for `sdtune compare`): its log shows, then its report opens.
    by_id(browser, "cmp-run-section").find_element(By.CSS_SELECTOR, "button, .label-wrap").click()
    wait_for(browser, lambda d: by_id(d, "cmp-run").is_displayed(), message="the run section did not open")
    type_into(browser, "cmp-name", "quick")
    type_into(browser, "cmp-methods", "lora,hypernetwork")
    by_id(browser, "cmp-run").click()
    wait_for(browser, lambda d: "comparing lora,hypernetwork" in value_of(d, "cmp-log"), message="no log")
    frame = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#cmp-report iframe"))
    browser.switch_to.frame(frame)
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "h2").text == "Comparison of lora,hypernetwork",
             message="the new report did not open")
    browser.switch_to.default_content()

    # Artifacts: the trained LoRA is listed; inspect shows its run card; convert writes a diffusers file.
    open_tab(browser, "Artifacts")
    wait_for(browser, lambda d: "sks" in by_id(d, "art-table").text, message="the LoRA is not listed")
    choose(browser, "art-choice", "sks · lora")
    details = wait_for(browser, lambda d: value_of(d, "art-details"), message="inspect showed nothing")
    assert "LoRA (kohya" in details and "method: lora" in details
    target = app.state.workspace.runs / "sks" / "sks-diffusers.safetensors"
    wait_for(browser, lambda d: value_of(d, "art-output") == str(target), message="no default output path")
    by_id(browser, "art-convert").click()
    wait_for(browser, lambda d: f"Wrote {target}" in by_id(d, "art-notice").text, message="convert failed")
    assert target.is_file()
    shot(browser, "artifacts")


def make_report(folder: Path) -> Path:
    """A small report folder in the layout `sdtune compare` writes (report.html, results.json, a plot)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    plot = Image.new("RGB", (64, 40), "white")
    draw = ImageDraw.Draw(plot)
    for i, height in enumerate((30, 22, 12, 26)):
        draw.rectangle([4 + 15 * i, 38 - height, 14 + 15 * i, 38], fill=(60 + 50 * i, 90, 200 - 40 * i))
    plot.save(folder / "fidelity.png")
    rows = "".join(f"<tr><td>{m}</td><td>{f}</td></tr>" for m, f in
                   (("dreambooth", 0.81), ("lora", 0.74), ("textual-inversion", 0.52), ("hypernetwork", 0.66)))
    (folder / "report.html").write_text(
        "<!doctype html><html><body style='font-family:sans-serif'><h1>Four methods, one subject</h1>"
        f"<table border=1><tr><th>method</th><th>subject fidelity</th></tr>{rows}</table>"
        "<p><img src='fidelity.png' width=256></p></body></html>")
    (folder / "results.json").write_text('{"methods": ["dreambooth", "lora", "textual-inversion", "hypernetwork"]}')
    return folder
