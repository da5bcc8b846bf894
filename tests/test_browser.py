"""The serve page in a real headless Chromium: upload a Venice photo, see the marker and the place.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``)
and the PyPI package ``selenium``; skips with the reason when any is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

CHROMIUM = os.environ.get("DELG_GEO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("DELG_GEO_CHROMEDRIVER") or shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip(
        "headless Chromium not found (needs `apt-get install -y chromium chromium-driver`): "
        f"chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium: pip install selenium")
pytest.importorskip("fastapi", reason="the browser test needs fastapi/uvicorn: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the browser test needs fastapi/uvicorn: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _tiny_index import tiny_geo  # noqa: E402,F401  (session fixture)

pytestmark = pytest.mark.shared


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_geo):
    import uvicorn

    from delg_geo.apps.serve import create_app

    geo, _, _ = tiny_geo
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(geo), host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _console_errors(drv, strict: bool = True) -> list[str]:
    """The page's SEVERE console messages. A log that cannot be read fails the test (an empty
    list would pass for "no errors"); ``strict=False`` (for a failure message already being
    written) gives the reason as the one message instead."""
    try:
        logs = drv.get_log("browser")
    except Exception as e:  # noqa: BLE001
        if not strict:
            return [f"(the browser's console log could not be read: {type(e).__name__}: {e})"]
        pytest.fail(f"the browser's console log could not be read ({type(e).__name__}: {e}); "
                    "the test cannot tell whether the page logged errors")
    # Tiles from the internet fail here (no network): that is expected and handled by the page.
    return [e["message"] for e in logs if e["level"] == "SEVERE" and "tile.openstreetmap.org" not in e["message"]]


def test_upload_shows_marker_and_place(server, browser, tiny_geo, tmp_path):
    from delg_geo.core.places import nearest_place

    geo, ref, venice = tiny_geo
    i = 7
    photo = (venice / ref.image[i]).resolve()
    expected = nearest_place(float(ref.lat[i]), float(ref.lon[i]))  # a reference photo finds itself

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return typeof L !== 'undefined' && !!document.querySelector('.leaflet-container')"))
    # No CDN: every script and stylesheet the page loaded came from our server.
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(function (e) {"
        " return e.initiatorType === 'script' || e.initiatorType === 'link'; }).map(function (e) { return e.name; });")
    assert resources and all(r.startswith(server) for r in resources), resources

    browser.find_element(By.ID, "dg-file").send_keys(str(photo))
    try:
        WebDriverWait(browser, 90).until(lambda d: d.find_element(By.ID, "dg-place").text.strip())
    except TimeoutException:
        pytest.fail(f"no place shown; status: {browser.find_element(By.ID, 'dg-status').text!r}; "
                    f"console: {_console_errors(browser, strict=False)}")
    place = browser.find_element(By.ID, "dg-place").text
    assert expected.name in place and "IT" in place, place
    status = browser.find_element(By.ID, "dg-status").text
    assert status.startswith("Located"), status

    markers = browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-pane .dg-pred")
    assert len(markers) == 1 and markers[0].is_displayed()
    # the marker sits where the API put the prediction
    latlng = browser.execute_script(
        "var m = null; document.querySelectorAll('.leaflet-marker-icon').forEach(function (e) {"
        " if (e.querySelector('.dg-pred')) m = e; }); return m && m.getBoundingClientRect().toJSON();")
    assert latlng and latlng["width"] > 0
    coords = browser.find_element(By.ID, "dg-coords").text
    assert coords == f"{float(ref.lat[i]):.6f}, {float(ref.lon[i]):.6f}"
    assert browser.find_elements(By.CSS_SELECTOR, ".leaflet-marker-pane .dg-alt")

    # top matches with thumbnails, and the match picture, all loaded
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "var imgs = Array.from(document.querySelectorAll('#dg-matches img')).concat([document.getElementById('dg-match-img')]);"
        "return imgs.length > 1 && imgs.every(function (im) { return im.complete && im.naturalWidth > 0; });"))
    assert browser.find_element(By.CSS_SELECTOR, "#dg-matches li").text.startswith("best match")
    browser.save_screenshot(os.environ.get("DELG_GEO_SCREENSHOT") or str(tmp_path / "located.png"))
    assert not _console_errors(browser)


def test_upload_of_a_non_image_shows_the_reason(server, browser, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    browser.get(server + "/")
    browser.find_element(By.ID, "dg-file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: "Could not locate" in d.find_element(By.ID, "dg-status").text)
    text = browser.find_element(By.ID, "dg-status").text
    assert "not a readable image" in text
    assert browser.find_element(By.ID, "dg-status").get_attribute("class") == "dg-error"


def test_offline_fallback_outline_is_drawn(server, browser):
    browser.get(server + "/")
    # the world outline comes from our server and is drawn in its own pane under the tiles
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "var p = document.querySelector('.leaflet-dgOutline-pane'); return p && p.querySelectorAll('path').length > 0;"))
    info = json.loads(browser.find_element(By.ID, "dg-info").get_attribute("textContent"))
    assert info["num_images"] == 20
