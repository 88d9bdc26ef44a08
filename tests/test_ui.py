"""The web UI in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): every tab runs, and refusals show the library's message in the page.

Runs on the shipped ToyWorld model, so the checker's verdict in the Generate tab is real.
Skipped, with the reason, only where Gradio or the browser is missing and ``CI`` is unset.
"""

import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run the browser tests: scripts/setup.sh installs it)")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    try:
        import gradio  # noqa: F401
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need(False, "the UI extra is not installed (pip install 'retouch[ui]' selenium)")
    _need(bool(CHROMIUM and DRIVER), "no chromium/chromedriver (apt-get install chromium "
                                     "chromium-driver)")
    from retouch.app.ui import serve

    port = _free_port()
    app = serve(None, port=port, block=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,2400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.get(f"http://127.0.0.1:{port}/")
    try:
        yield driver
    finally:
        driver.quit()
        app.close()


def _el(driver, css: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _tab(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    _el(driver, "button[role='tab']")
    for button in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
        if button.text.strip() == title:
            button.click()
            return
    raise AssertionError(f"no tab {title!r}")


def _type(driver, elem_id: str, text: str) -> None:
    box = _el(driver, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _status(driver, elem_id: str, timeout: float = 240) -> str:
    """The status box's text once the run has written it (it starts empty)."""
    box = _el(driver, f"#{elem_id} textarea")
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = box.get_attribute("value") or ""
        if value.strip():
            return value
        time.sleep(0.3)
    raise AssertionError(f"{elem_id} stayed empty for {timeout} s")


def _run(driver, button: str, status: str) -> str:
    box = _el(driver, f"#{status} textarea")
    driver.execute_script("arguments[0].value = ''", box)
    _el(driver, f"#{button}").click()
    return _status(driver, status)


def _upload(driver, elem_id: str, path) -> None:
    _el(driver, f"#{elem_id} input[type='file']").send_keys(str(path))
    _el(driver, f"#{elem_id} img")  # the preview: the upload has arrived


def test_generate_shows_the_image_and_the_checkers_verdict(browser):
    _tab(browser, "Generate")
    _type(browser, "generate-prompt", "a big red circle on a white background")
    text = _run(browser, "generate-run", "generate-status")
    assert "generated 64x64; checker:" in text, text
    assert _el(browser, "#generate-image img").get_attribute("src")


def test_generate_refuses_unknown_words_and_an_empty_prompt_in_the_page(browser):
    _tab(browser, "Generate")
    _type(browser, "generate-prompt", "a purple cat")
    text = _run(browser, "generate-run", "generate-status")
    assert text.startswith("Error: the ToyWorld model does not know the word(s) cat"), text
    _type(browser, "generate-prompt", " ")
    assert _run(browser, "generate-run", "generate-status") == \
        "Error: the prompt is empty: type what to generate"


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import ObjectSpec, Scene

    folder = tmp_path_factory.mktemp("ui")
    scene = Scene((ObjectSpec("circle", "red", "big", "center"),), "white")
    rgb = render(scene, 64).image
    Image.fromarray(rgb).save(folder / "scene.png")
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "scene_rgba.png")
    Image.new("RGB", (96, 48), "white").save(folder / "wide.png")
    Image.fromarray(rgb).convert("L").resize((1024, 1024)).save(folder / "big_grey.png")
    return folder


def test_invert_reconstructs_an_uploaded_rgba_image(browser, scene_files):
    _tab(browser, "Invert")
    _upload(browser, "invert-image", scene_files / "scene_rgba.png")
    _type(browser, "invert-prompt", "a big red circle on a white background")
    text = _run(browser, "invert-run", "invert-status")
    assert text.startswith("bdia: PSNR") and "network evaluations" in text, text


def test_invert_takes_a_big_greyscale_image(browser, scene_files):
    _tab(browser, "Invert")
    _upload(browser, "invert-image", scene_files / "big_grey.png")
    _type(browser, "invert-prompt", "a big red circle on a white background")
    text = _run(browser, "invert-run", "invert-status")
    assert text.startswith("bdia: PSNR"), text


def test_invert_refuses_a_non_square_image_in_the_page(browser, scene_files):
    _tab(browser, "Invert")
    _upload(browser, "invert-image", scene_files / "wide.png")
    _type(browser, "invert-prompt", "a big red circle")
    text = _run(browser, "invert-run", "invert-status")
    assert text.startswith("Error: the image is 96x48") and "crop it to a square" in text, text


def test_edit_shows_source_edit_and_difference(browser, scene_files):
    _tab(browser, "Edit")
    _upload(browser, "edit-image", scene_files / "scene.png")
    _type(browser, "edit-source", "a big red circle on a white background")
    _type(browser, "edit-target", "a big blue circle on a white background")
    text = _run(browser, "edit-run", "edit-status")
    assert text == "edited with p2p after direct", text
    for elem in ("edit-source-image", "edit-edited", "edit-difference"):
        assert _el(browser, f"#{elem} img").get_attribute("src")


def test_guide_moves_an_object_and_refuses_an_empty_request(browser, scene_files):
    _tab(browser, "Guide")
    _upload(browser, "guide-image", scene_files / "scene.png")
    _type(browser, "guide-source", "a big red circle on the center on a white background")
    _type(browser, "guide-word", "circle")
    assert "nothing to do" in _run(browser, "guide-run", "guide-status")
    _type(browser, "guide-target", "a big red circle on the right on a white background")
    _type(browser, "guide-dx", "0.25")
    text = _run(browser, "guide-run", "guide-status")
    assert text == "self-guidance: moved circle by (+0.25, +0)", text
    for elem in ("guide-source-image", "guide-edited"):
        assert _el(browser, f"#{elem} img").get_attribute("src")


def test_attention_maps_each_word(browser):
    _tab(browser, "Attention")
    _type(browser, "attention-prompt", "a big red circle on the left")
    text = _run(browser, "attention-run", "attention-status")
    assert text.startswith("words: big, red, circle, left"), text
    _type(browser, "attention-prompt", "a big red dog")
    assert "does not know the word(s) dog" in _run(browser, "attention-run", "attention-status")
