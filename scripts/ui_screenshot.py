"""Regenerate docs/images/ui.png: the Generate tab of `retouch ui` on the shipped ToyWorld model,
after one run of the README's prompt at the tab's default settings, in headless Chromium (Debian's
chromium and chromedriver; nothing is downloaded). Run it after the shipped weights or the UI
change: .venv/bin/python scripts/ui_screenshot.py [--out docs/images/ui.png]
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from retouch.app.ui import serve
from retouch.files import save_image

WINDOW = (1200, 1000)
PROMPT = "a big red circle on the left and a small blue square on the right"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _driver() -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("no chromium/chromedriver: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/ui.png")
    out = Path(parser.parse_args().out)
    port = _free_port()
    app = serve(None, port=port, block=False)
    driver = _driver()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 300)
        status = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#generate-status textarea")))
        box = driver.find_element(By.CSS_SELECTOR, "#generate-prompt textarea")
        box.clear()
        box.send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#generate-run").click()
        wait.until(lambda d: (status.get_attribute("value") or "").strip())
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#generate-image img")))
        time.sleep(1)  # let the image paint
        print(status.get_attribute("value"))
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    finally:
        driver.quit()
        app.close()
    rows = np.flatnonzero((shot < 250).any(axis=(1, 2)))  # crop the empty page below
    if rows.size == 0:
        raise SystemExit("the page rendered blank: nothing to save")
    save_image(shot[: min(shot.shape[0], rows[-1] + 24)], out)


if __name__ == "__main__":
    main()
