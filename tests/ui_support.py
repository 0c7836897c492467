"""Helpers for the browser test of the Dagster UI: a real `dagster dev` on 127.0.0.1 with a tmp
instance, warehouse and landing folder, and headless Debian Chromium driven by Selenium.

Chromium and chromedriver come from Debian's packages (`python3 tasks.py test` installs them when
missing). Both paths are given to Selenium, so Selenium Manager never tries to download a browser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import yaml
from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT, free_port, skip_or_fail

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  # Tall enough that the virtualized asset table renders every row of the catalog.
                  "--window-size=1600,2000"]
UI_WAIT_SECONDS = 30
FINISHED_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
# Variables that would point the code location at something outside the test's tmp dirs.
OUTSIDE_VARIABLES = ("ALERT_WEBHOOK_URL", "ONLINE_RETAIL_DIR", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                     "LANDING_PRODUCTS_PATTERN", "LANDING_CUSTOMERS_PATTERN", "LANDING_TRANSACTIONS_PATTERN")


def require_browser() -> None:
    """Skip without Chromium locally; under CI a missing browser is a failure, never a quiet skip."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    skip_or_fail(f"{', '.join(missing)} not installed "
                 "(python3 tasks.py test installs chromium chromium-driver via apt as root)")


def start_chromium(user_data_dir: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def write_dagster_home(home: Path) -> Path:
    """A fresh instance with the project's concurrency settings (the duckdb pool of one step)."""
    project_config = yaml.safe_load((ROOT / ".dagster_home" / "dagster.yaml").read_text())
    home.mkdir(parents=True, exist_ok=True)
    config = {"concurrency": project_config["concurrency"], "telemetry": {"enabled": False}}  # pools and run limits
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # A new instance greets its first visitor with a newsletter dialog over the page; this marks
    # it as seen, as it would be for a returning user.
    (home / ".nux").mkdir(exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    # Its SQLite files are made here, before any process starts: two processes creating the
    # schedule storage at once left it with two alembic heads (seen once, in a daemon test).
    with dg.DagsterInstance.from_config(str(home)):
        pass
    return home


def code_location_env(home: Path, warehouse: Path, landing: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in OUTSIDE_VARIABLES}
    env.update(DAGSTER_HOME=str(home), WAREHOUSE_PATH=str(warehouse), LANDING_DIR=str(landing),
               DUCKDB_MEMORY_LIMIT="512MB", MODEL_PROVIDER="local", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


class DagsterDev:
    """`dagster dev` (webserver, daemon, code server) in its own process group, on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> DagsterDev:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.port),
                 "-w", str(ROOT / "workspace.yaml")],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: teardown reaches its services and run workers
            )
        self.wait_until_loaded(timeout)
        return self

    def wait_until_loaded(self, timeout: float) -> None:
        """Until the webserver answers and the code location has finished loading."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.location_status() == "LOADED":
                return
            time.sleep(0.5)
        raise TimeoutError(f"dagster dev not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def location_status(self) -> str | None:
        try:
            data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }")
        except (OSError, urllib.error.URLError, ValueError):
            return None  # not serving yet
        entries = data["workspaceOrError"].get("locationEntries") or []
        return entries[0]["loadStatus"] if entries else None

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise ValueError(payload["errors"])
        return payload["data"]

    def run_status(self, run_id: str) -> str:
        data = self.graphql("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                            {"id": run_id})
        return data["runOrError"].get("status") or data["runOrError"]["__typename"]

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        """The run's final status, polled from the webserver (the daemon dequeues and launches it)."""
        deadline = time.monotonic() + timeout
        status = self.run_status(run_id)
        while status not in FINISHED_RUN_STATUSES and time.monotonic() < deadline:
            time.sleep(0.5)
            status = self.run_status(run_id)
        return status

    def log_tail(self, characters: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the whole group (dagster dev shuts its services down), then SIGKILL to what is
        left of it: its code server outlives it by a few seconds."""
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)
        self.process.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone


@contextmanager
def running_dagster_dev(env: dict[str, str], log_path: Path) -> Iterator[DagsterDev]:
    server = DagsterDev(env, log_path)
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def chromium() -> Iterator[WebDriver]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        driver = start_chromium(Path(profile))
        try:
            yield driver
        finally:
            driver.quit()


@contextmanager
def screenshot_on_failure(driver: WebDriver, path: Path) -> Iterator[None]:
    """On a failed assertion or wait, save what the browser showed and name the file in the error."""
    try:
        yield
    except (AssertionError, WebDriverException) as error:
        driver.save_screenshot(str(path))
        message = error.msg if isinstance(error, WebDriverException) else str(error)  # no driver stack dump
        raise AssertionError(f"{message}\nscreenshot: {path}\npage: {driver.current_url}") from error


# --- page helpers: explicit waits on visible text and aria labels, never sleeps ---

def wait(driver: WebDriver, timeout: float = UI_WAIT_SECONDS) -> WebDriverWait:
    # React re-renders replace elements between a look-up and a read: look again.
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))


def whole_text(text: str) -> str:
    """XPath of elements whose whole text is `text` (React may split it into several text nodes)."""
    return f"//*[normalize-space(.)='{text}']"


def visible_text(driver: WebDriver, text: str, within: str = "", timeout: float = UI_WAIT_SECONDS) -> WebElement:
    """The first visible element whose whole text is `text` (XPath `within` narrows the search)."""
    locator = (By.XPATH, within + whole_text(text))
    return wait(driver, timeout).until(ec.visibility_of_element_located(locator), f"no visible {text!r}")


def click_button(driver: WebDriver, label: str, within: str = "", timeout: float = UI_WAIT_SECONDS) -> None:
    locator = (By.XPATH, f"{within}//button[normalize-space()='{label}']")
    wait(driver, timeout).until(ec.element_to_be_clickable(locator), f"no clickable button {label!r}").click()


def wait_for_texts(driver: WebDriver, texts: set[str], timeout: float = UI_WAIT_SECONDS) -> None:
    """Until each text is the whole text of some visible element (lists and graphs render
    asynchronously; a whole-text match keeps `recommendations` from matching `validated_recommendations`)."""
    def missing() -> list[str]:
        return sorted(text for text in texts if not any(
            element.is_displayed() for element in driver.find_elements(By.XPATH, whole_text(text))))

    try:
        wait(driver, timeout).until(lambda _: not missing())
    except TimeoutException:
        raise AssertionError(f"not shown on {driver.current_url}: {missing()}") from None
