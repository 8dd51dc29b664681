"""The demo page in a real headless Chromium (Debian's chromium and chromedriver, through
Selenium) against the stack on the embedded default: a real clip uploaded from the page, the
answer streamed in, the segment timeline and the kept-token overlay checked against the API's own
report, the numbers shown; with API keys on, the key typed once; the server's 4xx messages shown.
A screenshot of the page is written to build/test-artefacts/ (or $VIDEOLLM_TEST_ARTEFACTS).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import GatewayServer, gateway_settings
from videos import shipped_clip

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = Path(os.environ.get("VIDEOLLM_TEST_ARTEFACTS", REPO / "build" / "test-artefacts"))
WAIT_S = 180  # an answer on the 2-core CI machine, thumbnails decoded in software
KEY = "demo-key-7f3a"
BUNNY = shipped_clip("bigbuckbunny.mp4")  # 1280x720, 25 fps, 5.28 s


@pytest.fixture(scope="module")
def browser():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the demo page's test needs Chromium: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_script_timeout(30)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def bunny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "bigbuckbunny.mp4"
    path.write_bytes(BUNNY)
    return path


def wait(browser, condition, what: str, timeout_s: float = WAIT_S):
    try:
        return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(lambda _: condition())
    except Exception as err:
        problem = browser.find_element(By.ID, "error").text or browser.find_element(By.ID, "progress").text
        raise AssertionError(f"{what}: not within {timeout_s} s (the page says: {problem!r})") from err


def fill(browser, element_id: str, value) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def ask(browser, video: Path, frames: int, question: str = "What happens in this video?") -> None:
    browser.find_element(By.ID, "video-file").send_keys(str(video))
    fill(browser, "question", question)
    fill(browser, "num-frames", frames)
    browser.find_element(By.ID, "ask").click()


def done(browser) -> bool:
    return browser.find_element(By.ID, "progress").text.startswith("Done")


def shown_error(browser) -> str:
    box = browser.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


# JavaScript run in the page: the 14x14 cells of an overlay whose leftmost pixel (half-way down) is
# the kept outline's amber, exactly (the frame under a dropped cell is darkened far below it)
OUTLINED_CELLS = """
const canvas = arguments[0];
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const outlined = [];
for (let cell = 0; cell < 196; cell++) {
  const [column, row] = [cell % 14, Math.floor(cell / 14)];
  const x = Math.round(column * canvas.width / 14);
  const y = Math.round((row + 0.5) * canvas.height / 14);
  const i = 4 * (y * canvas.width + x);
  if (data[i] === 255 && data[i + 1] === 176 && data[i + 2] === 0) outlined.push(cell);  // #ffb000, the outline
}
return outlined;
"""
# the elements that stick out to the right of the window, outside a scrolling box of their own
TOO_WIDE = """
const width = document.documentElement.clientWidth;
const scrolls = (e) => e && e !== document.body && (getComputedStyle(e).overflowX === 'auto' || scrolls(e.parentElement));
return [...document.querySelectorAll('body *')]
  .filter((e) => e.getBoundingClientRect().right > width + 1 && !scrolls(e.parentElement) && e.offsetParent !== null)
  .map((e) => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`);
"""
# the spread of a thumbnail's pixel values: a drawn video frame varies, an empty canvas does not
PIXEL_SPREAD = """
const canvas = arguments[0];
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let low = 255, high = 0;
for (let i = 0; i < data.length; i += 4) { low = Math.min(low, data[i + 1]); high = Math.max(high, data[i + 1]); }
return high - low;
"""


def test_the_demo_answers_about_a_real_clip_and_shows_what_the_encoder_kept(gateway, browser, bunny_file,
                                                                               clean_redis):
    browser.get(gateway.url + "/")  # redirected to /demo/
    assert browser.current_url.endswith("/demo/")
    assert browser.find_element(By.ID, "key-section").is_displayed() is False  # no keys on this gateway
    ask(browser, bunny_file, frames=16)
    wait(browser, lambda: done(browser), "the streamed answer")
    assert browser.find_element(By.ID, "answer").text.strip()
    report = json.loads(browser.find_element(By.ID, "report-json").get_attribute("textContent"))

    # the report is the API's: the same question through the API (the upload has the same id) agrees
    video_id = httpx.post(f"{gateway.url}/v1/videos", files={"file": ("bunny.mp4", BUNNY, "video/mp4")},
                          timeout=60).json()["id"]
    body = {"model": "videollm", "max_tokens": 2, "videollm": {"num_frames": 16, "compression": {
                "method": "earlytom", "retain_ratio": 0.2}},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_id}},
                                                      {"type": "text", "text": "What happens in this video?"}]}]}
    truth = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert truth.status_code == 200, truth.text
    truth = truth.json()["videollm"]
    assert truth["cache"] == "hit"  # the page's upload and question made the entry
    for field in ("segments", "merged_frames", "kept", "visual_tokens", "frames_after_merge"):
        assert report[field] == truth[field], field

    # the timeline: one box per segment, one card per output frame, the fused frames under it
    segments = browser.find_elements(By.CSS_SELECTOR, "#timeline li.segment")
    assert len(segments) == len(truth["segments"]) >= 2
    for box, (first, last) in zip(segments, truth["segments"]):
        spans = [s for s in truth["merged_frames"] if first <= s[0] and s[1] <= last]
        assert len(box.find_elements(By.CSS_SELECTOR, "li.output-frame")) == len(spans)
        assert len(box.find_elements(By.CSS_SELECTOR, "canvas.thumb")) == sum(b - a + 1 for a, b in spans)
    overlays = browser.find_elements(By.CSS_SELECTOR, "canvas.overlay")
    assert len(overlays) == truth["frames_after_merge"] < truth["frames"]  # Stage I fused some frames
    kinds = [c.find_element(By.XPATH, "following-sibling::p").text.split(",")[0]
             for c in overlays]
    assert set(kinds) == {"dynamic", "static"}

    # thumbnails decoded from the file by the browser, and the overlay's outlined cells are exactly `kept`
    wait(browser, lambda: all(c.get_attribute("data-drawn") == "true"
                              for c in browser.find_elements(By.CSS_SELECTOR, "canvas.thumb, canvas.overlay")),
         "the thumbnails drawn from the chosen file")
    for canvas in browser.find_elements(By.CSS_SELECTOR, "canvas.thumb")[:4]:
        assert browser.execute_script(PIXEL_SPREAD, canvas) > 40
    for canvas, kept in zip(overlays, truth["kept"]):
        assert browser.execute_script(OUTLINED_CELLS, canvas) == sorted(kept)

    numbers = {item.get_attribute("data-name"): item.find_element(By.TAG_NAME, "dd").text
               for item in browser.find_elements(By.CSS_SELECTOR, "#numbers > div")}
    uncompressed = truth["compression"]["uncompressed_tokens"]
    assert numbers["Visual tokens"].startswith(f"{truth['visual_tokens']:,} of {uncompressed:,}")
    assert numbers["Cache"] == "miss" and numbers["Encode"].endswith(" ms")
    assert "%" in numbers["FLOPs saved, encoder"] and "%" in numbers["FLOPs saved, prefill"]
    assert numbers["Time to first token"].endswith(" here")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "demo.png"))
    browser.set_window_size(390, 1700)  # a phone's width: one column, nothing wider than the screen
    time.sleep(0.5)  # the layout settles
    assert browser.execute_script(TOO_WIDE) == []
    browser.save_screenshot(str(ARTEFACTS / "demo-phone.png"))
    browser.set_window_size(1280, 1700)

    # asked again: the same video is not uploaded again, and the answer is a hit
    uploads = browser.execute_script("return performance.getEntriesByName(location.origin + '/v1/videos').length")
    browser.find_element(By.ID, "ask").click()
    wait(browser, lambda: done(browser) and browser.find_element(By.CSS_SELECTOR, "#numbers [data-name=Cache] dd")
         .text == "hit", "the repeat answer")
    assert browser.execute_script(
        "return performance.getEntriesByName(location.origin + '/v1/videos').length") == uploads


@pytest.fixture(scope="module")
def keyed_gateway(encoder_service, llm_service, redis_server):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url, api_keys=[KEY])
    with GatewayServer(settings) as server:
        yield server


def test_with_api_keys_the_key_is_typed_once_and_4xx_messages_are_shown(keyed_gateway, browser, bunny_file,
                                                                       tmp_path, clean_redis):
    assert httpx.get(f"{keyed_gateway.url}/demo/", timeout=10).status_code == 200  # the page's files are open
    assert httpx.get(f"{keyed_gateway.url}/v1/models", timeout=10).status_code == 401  # the API is not
    browser.get(keyed_gateway.url + "/demo/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda: browser.find_element(By.ID, "key-section").is_displayed(), "the key prompt", 20)

    ask(browser, bunny_file, frames=4)  # before any key: the server's 401, shown
    wait(browser, lambda: "401" in shown_error(browser), "the 401 message", 30)
    assert "API key" in shown_error(browser)

    fill(browser, "api-key", "not-the-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda: "refused" in browser.find_element(By.ID, "key-help").text, "the wrong key refused", 20)
    fill(browser, "api-key", KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda: "accepted" in browser.find_element(By.ID, "key-help").text, "the key accepted", 20)

    fill(browser, "num-frames", 5000)  # over the encoder's max_frames: a 400 that names the field
    browser.find_element(By.ID, "ask").click()
    wait(browser, lambda: "400" in shown_error(browser), "the 400 message", 60)
    assert "num_frames" in shown_error(browser)

    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video\n" * 100)
    Select(browser.find_element(By.ID, "method")).select_by_value("none")
    ask(browser, not_a_video, frames=4)
    wait(browser, lambda: any(code in shown_error(browser) for code in ("400", "415")), "the refused upload's message",
         60)

    ask(browser, bunny_file, frames=4)  # the key typed once still goes with every request
    wait(browser, lambda: done(browser), "the answer with the key")
    assert not shown_error(browser)
    assert browser.find_element(By.ID, "answer").text.strip()
    assert browser.find_element(By.CSS_SELECTOR, "#numbers [data-name='Visual tokens'] dd").text.startswith(
        f"{4 * 196 + 1:,}")  # method none: every token
