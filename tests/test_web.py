"""The service's page in a real browser: Debian's headless Chromium, driven by Selenium.

A real ``download service`` runs with a token on a free loopback port and a temporary data
folder; the test uses the page as a person would: it gives the token (a wrong one first),
starts a job from the form and watches it finish (progress bar and gallery), submits a bad
count and reads the service's error next to the form, starts a slower job and cancels it.
It saves a screenshot of the finished page; ``UPDATE_SCREENSHOT=1`` puts it in
``docs/screenshot.png``, the one the README shows.

Without chromium and chromedriver the test fails under CI (``.ci/run`` installs them) and
is skipped elsewhere, saying how to install them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from helpers import child_env, download_command
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parent.parent
# The README's screenshot; rewritten only on request (UPDATE_SCREENSHOT=1), so that running
# the suite leaves the checkout clean. Otherwise the screenshot goes to the test's tmp_path.
SCREENSHOT = REPO / "docs" / "screenshot.png"
DEADLINE_S = 60.0  # per wait; never reached when things work
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)
TOKEN = "a-token-for-the-browser-test"
SERVING = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = (
        "the browser test needs Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run it (.ci/run installs them)")
    pytest.skip(reason)


class JobService:
    """``download service`` with a token on a free loopback port; stderr kept for failure
    messages."""

    def __init__(self, data: Path) -> None:
        self.proc = subprocess.Popen(
            [*download_command(), "service", "--port", "0", "--data", str(data), "--token", TOKEN],
            cwd=data.parent,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.log: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(DEADLINE_S) or self.url is None:
            self.stop()
            pytest.fail("the service did not start:\n" + "".join(self.log))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            match = SERVING.search(line)
            if match and self.url is None:
                self.url = match[1]
                self.ready.set()
        self.ready.set()  # exited without serving

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[JobService]:
    browser_paths()  # skip or fail before starting anything
    running = JobService(tmp_path / "data")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    chromium, driver_path = browser_paths()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------- page helpers


def wait_for(driver: WebDriver, what: str, check: Any) -> Any:
    """Poll ``check(driver)`` until it is truthy; fail with ``what`` after DEADLINE_S."""
    waiter = WebDriverWait(
        driver, DEADLINE_S, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return waiter.until(check)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; the page said: {page_text(driver)}")


def page_text(driver: WebDriver) -> str:
    text: str = driver.find_element(By.TAG_NAME, "body").text
    return " | ".join(line for line in text.splitlines() if line.strip())[:1500]


def fill(driver: WebDriver, field: str, value: str) -> None:
    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def row(driver: WebDriver, job_id: str) -> WebElement:
    found: WebElement = driver.find_element(By.CSS_SELECTOR, f'#jobs li[data-id="{job_id}"]')
    return found


def row_says(job_id: str, selector: str, text: str) -> Any:
    def check(driver: WebDriver) -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, f'#jobs li[data-id="{job_id}"] {selector}')
        return bool(found) and found[0].text == text

    return check


def newest_job(driver: WebDriver, other_than: set[str]) -> str:
    def check(driver: WebDriver) -> str | None:
        for item in driver.find_elements(By.CSS_SELECTOR, "#jobs > li"):
            job_id = item.get_attribute("data-id")
            if job_id and job_id not in other_than:
                return job_id
        return None

    job_id: str = wait_for(driver, "the new job in the list", check)
    return job_id


def loaded_thumbnails(driver: WebDriver) -> int:
    """Thumbnails in the gallery that the browser has fetched and decoded."""
    count: int = driver.execute_script(
        "return [...document.querySelectorAll('#gallery img')]"
        ".filter(img => img.complete && img.naturalWidth > 0).length"
    )
    return count


def start_job(driver: WebDriver, count: str, latency_ms: str, known: set[str]) -> str:
    fill(driver, "count", count)
    fill(driver, "latency", latency_ms)
    driver.find_element(By.ID, "start").click()
    return newest_job(driver, known)


def settled(driver: WebDriver) -> bool:
    """No finite animation (a thumbnail fading in) still playing."""
    done: bool = driver.execute_script(
        "return document.getAnimations().every(a => a.playState !== 'running'"
        " || a.effect.getTiming().iterations === Infinity)"
    )
    return done


def save_screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page at 1280 px wide, however tall it is."""
    wait_for(driver, "the page to settle", settled)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1280, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    # 256 colours: a fifth of the bytes, for a PNG kept in the repository.
    with Image.open(io.BytesIO(png)) as shot:
        small = shot.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    path.parent.mkdir(exist_ok=True)
    small.save(path, optimize=True)


# ---------------------------------------------------------------------------- the test


def live(driver: WebDriver) -> bool:
    return bool(driver.find_element(By.ID, "live").text == "live")


def signs_in(driver: WebDriver) -> None:
    """The page asks for the token once; a wrong one is refused; none is kept or shown."""
    wait_for(driver, "the token prompt", lambda d: d.find_element(By.ID, "token").is_displayed())
    fill(driver, "token", "wrong")
    driver.find_element(By.ID, "token").send_keys(Keys.ENTER)

    def refused(d: WebDriver) -> bool:
        return "wrong token" in d.find_element(By.ID, "login-error").text

    wait_for(driver, "the wrong token refused", refused)
    fill(driver, "token", TOKEN)
    driver.find_element(By.ID, "token").send_keys(Keys.ENTER)
    wait_for(driver, "the live event stream", live)
    assert not driver.find_element(By.ID, "login").is_displayed()
    assert TOKEN not in driver.current_url
    assert driver.execute_script("return sessionStorage.length + localStorage.length") == 0


def first_job_finishes(driver: WebDriver, base_url: str) -> str:
    """30 images from the built-in server: 30/30 in its bar, 30 thumbnails in its gallery."""
    assert driver.find_element(By.ID, "local").is_selected()
    fill(driver, "keywords", "cat,dog")
    job = start_job(driver, "30", "0", set())
    wait_for(driver, "30/30 in the progress bar", row_says(job, ".progress-text", "30/30"))
    wait_for(driver, "the first job done", row_says(job, ".state", "done"))
    wait_for(driver, "30 thumbnails", lambda d: loaded_thumbnails(d) == 30)
    timeline = "at once: up to"  # the job's own spans, drawn (web/timeline.js)
    wait_for(
        driver, "its timeline", lambda d: timeline in d.find_element(By.ID, "timeline-title").text
    )
    full = driver.find_element(By.CSS_SELECTOR, "#gallery a").get_attribute("href")
    assert re.fullmatch(rf"{re.escape(base_url)}/files/{job}/[^/]+\.jpg", str(full))
    assert row(driver, job).find_element(By.CSS_SELECTOR, ".retry").is_displayed()
    return job


def bad_count_is_refused(driver: WebDriver) -> None:
    """Submitted from the keyboard: the service's one line next to the form, nothing lost."""
    fill(driver, "count", "0")
    driver.find_element(By.ID, "count").send_keys(Keys.ENTER)

    def error_shown(d: WebDriver) -> bool:
        return "count must be at least 1" in d.find_element(By.ID, "form-error").text

    wait_for(driver, "the error text", error_shown)
    count = driver.find_element(By.ID, "count")
    assert count.get_attribute("aria-invalid") == "true"
    assert count.get_attribute("value") == "0"
    assert driver.find_element(By.ID, "keywords").get_attribute("value") == "cat,dog"


def button(driver: WebDriver, job_id: str, name: str) -> WebElement:
    found: WebElement = row(driver, job_id).find_element(By.CSS_SELECTOR, f".{name}")
    return found


def second_job_pauses_resumes_and_is_cancelled(driver: WebDriver, first: str, shots: Path) -> str:
    """A slow job (1.5 s a request) at priority 5: paused once its first images are in,
    resumed, then cancelled."""
    fill(driver, "priority", "5")
    job = start_job(driver, "200", "1500", {first})
    assert driver.find_element(By.ID, "form-error").text == ""
    wait_for(driver, "the second job running", row_says(job, ".state", "running"))
    assert row(driver, job).find_element(By.CSS_SELECTOR, ".priority").text == "priority 5"
    assert not button(driver, job, "resume").is_displayed()

    def some_done(d: WebDriver) -> bool:
        text: str = row(d, job).find_element(By.CSS_SELECTOR, ".progress-text").text
        return not text.startswith("0/")

    wait_for(driver, "the second job's first images", some_done)
    button(driver, job, "pause").click()
    wait_for(driver, "the second job paused", row_says(job, ".state", "paused"))
    assert not button(driver, job, "pause").is_displayed()
    assert button(driver, job, "cancel").is_displayed()
    save_screenshot(driver, shots / "paused.png")
    button(driver, job, "resume").click()
    wait_for(driver, "the second job running again", row_says(job, ".state", "running"))
    assert not button(driver, job, "resume").is_displayed()
    row(driver, job).find_element(By.CSS_SELECTOR, ".cancel").click()
    wait_for(driver, "the second job cancelled", row_says(job, ".state", "cancelled"))
    assert not row(driver, job).find_element(By.CSS_SELECTOR, ".cancel").is_displayed()
    return job


def test_the_page_starts_watches_pauses_and_cancels_jobs(
    service: JobService, browser: WebDriver, tmp_path: Path
) -> None:
    driver, base_url = browser, str(service.url)
    driver.get(f"{base_url}/")
    signs_in(driver)
    api_link = driver.find_element(By.ID, "api-link").get_attribute("href")
    assert api_link == f"{base_url}/api/v1/openapi.json"
    first = first_job_finishes(driver, base_url)
    bad_count_is_refused(driver)
    second = second_job_pauses_resumes_and_is_cancelled(driver, first, tmp_path)
    assert row(driver, first).find_element(By.CSS_SELECTOR, ".state").text == "done"
    rows = driver.find_elements(By.CSS_SELECTOR, "#jobs > li")
    assert [item.get_attribute("data-id") for item in rows] == [second, first]  # newest first

    row(driver, first).find_element(By.CSS_SELECTOR, ".job-id").click()
    wait_for(driver, "the first job's gallery again", lambda d: loaded_thumbnails(d) == 30)
    update = os.environ.get("UPDATE_SCREENSHOT") == "1"
    save_screenshot(driver, SCREENSHOT if update else tmp_path / "screenshot.png")

    # No script error on the way (the 401s before the token are network entries).
    errors = [e for e in driver.get_log("browser") if e.get("source") != "network"]
    assert errors == []

    # At a phone's width nothing runs off the side.
    driver.set_window_size(390, 844)
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
