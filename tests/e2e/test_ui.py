"""The Airflow UI in headless Chromium: log in as the admin, open each DAG's graph, find every task.

The React UI renders client-side, so the test waits for the graph's nodes (React Flow, one node per task id) rather
than reading the HTML. Screenshots go to test-artifacts/ (gitignored; `make clean` removes it).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import REFRESH, TRAINING, E2EStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless on a closed network: without the background-networking flags Chromium's own connections (updates, sync,
# field trials) are refused and slow every page down.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
ARTIFACTS = REPO / "test-artifacts"
WAIT_SECONDS = 60.0


def require_chromium() -> None:
    """Fail (not skip: CI must run this test) when Chromium or its driver is not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(str(p))]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser` (installs chromium and chromium-driver)",
            pytrace=False,
        )


def chromium(profile: Path) -> object:
    """Headless Chromium through chromedriver with a fresh profile in `profile` (no local storage carried over)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Chromium through chromedriver, logged in to the stack's UI as the admin."""
    require_chromium()  # before the stack starts: a minute saved when it is missing
    e2e_stack: E2EStack = request.getfixturevalue("e2e_stack")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        stack = e2e_stack.airflow
        driver.get(f"{stack.url}/auth/login")
        wait = WebDriverWait(driver, WAIT_SECONDS)
        wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(stack.username)
        driver.find_element(By.NAME, "password").send_keys(stack.password)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[type=submit]"))).click()
        wait.until(lambda d: "/auth/login" not in d.current_url)
        yield driver
    finally:
        driver.quit()


@pytest.mark.parametrize("dag_id", [REFRESH, TRAINING])
def test_graph_view_shows_every_task(browser, e2e_stack, dag_id):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = e2e_stack.airflow.client
    expected = {t["task_id"] for t in client.collect(f"/api/v2/dags/{dag_id}/tasks", "tasks")}
    assert expected, f"the API lists no tasks of {dag_id}"

    browser.get(f"{e2e_stack.airflow.url}/dags/{dag_id}")
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label^='Show Graph']"))).click()

    def shown(driver) -> set[str]:
        return {n.get_attribute("data-id") for n in driver.find_elements(By.CSS_SELECTOR, ".react-flow__node")}

    with contextlib.suppress(TimeoutException):  # the assertion below says what is missing
        wait.until(lambda d: expected <= shown(d))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / f"ui-graph-{dag_id}.png"
    browser.save_screenshot(str(screenshot))
    found = shown(browser)
    assert expected <= found, (
        f"graph view of {dag_id} misses tasks {sorted(expected - found)} (shows {sorted(found)}); see {screenshot}"
    )
