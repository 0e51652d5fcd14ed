"""The MLflow UI in headless Chromium: the project's experiment opens on its training runs, the latest first, each with
its registered model version.

A real `mlflow server` (mlflow/server.sh through ops.tracking_server, artifacts in a local directory) holds two
training runs of the stand-in classifier of the model tests, each registered: no network is trained here, what is
checked is the record and how the UI shows it. The experiment is created the way every trainer creates it
(tasks.lib.tracking.experiment_id), which tags it as model development and describes it.

MLflow 3.17's UI chooses between its GenAI and model-training views with a switch of its own (remembered in the
browser, GenAI by default; `?workflowType=machine_learning` in a link selects model training), so the test opens the
link the project gives out: tasks.lib.tracking.experiment_ui_url. Screenshot: test-artifacts/mlflow-ui-runs.png.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib import tracking
from tests.e2e.test_ui import ARTIFACTS, WAIT_SECONDS, chromium, require_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BRIGHTNESS_MODEL = Path(__file__).resolve().parent.parent / "model" / "brightness_model.py"
EXPERIMENT = "cloudscreen"
REGISTERED = "cloudscreen-classifier"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tracking server with two registered training runs; the URI, experiment id and the latest run's name."""
    from ops.tracking_server import mlflow_server

    require_chromium()  # before the server starts
    root = tmp_path_factory.mktemp("mlflow_ui")
    server = mlflow_server(backend_uri=f"sqlite:///{root / 'mlflow.db'}", artifacts_destination=str(root / "artifacts"))
    import mlflow

    # An earlier test of the session may have called mlflow.set_tracking_uri, which wins over the environment.
    previous = mlflow.get_tracking_uri()
    with server as uri, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        experiment = tracking.experiment_id(EXPERIMENT)
        for name in ("train-earlier", "train-latest"):
            tags = {tracking.TAG_KIND: "train"}
            with mlflow.start_run(experiment_id=experiment, run_name=name, tags=tags) as run:
                mlflow.log_metric("val_auc", 0.9)
                mlflow.pyfunc.log_model(
                    name=tracking.MODEL_ARTIFACT,
                    python_model=str(BRIGHTNESS_MODEL),
                    pip_requirements=["mlflow"],  # skips requirement inference
                    registered_model_name=REGISTERED,
                )
        try:
            yield {"uri": uri, "experiment": experiment, "latest": name, "run_id": run.info.run_id, "version": "2"}
        finally:
            mlflow.set_tracking_uri(previous)


def test_the_experiment_says_it_holds_model_training(tracked):
    from mlflow import MlflowClient

    tags = MlflowClient(tracked["uri"]).get_experiment(tracked["experiment"]).tags
    assert tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND == "custom_model_development"
    assert tags[tracking.TAG_NOTE] == tracking.EXPERIMENT_DESCRIPTION
    # Found again (another trainer, a later run): the tags stay, a description written by hand is kept.
    MlflowClient(tracked["uri"]).set_experiment_tag(tracked["experiment"], tracking.TAG_NOTE, "by hand")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
        assert tracking.experiment_id(EXPERIMENT) == tracked["experiment"]
    tags = MlflowClient(tracked["uri"]).get_experiment(tracked["experiment"]).tags
    assert tags[tracking.TAG_NOTE] == "by hand" and tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND
    MlflowClient(tracked["uri"]).set_experiment_tag(
        tracked["experiment"], tracking.TAG_NOTE, tracking.EXPERIMENT_DESCRIPTION
    )


def test_the_runs_table_shows_the_latest_training_run_and_its_registered_version(tracked, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path / "chromium-profile")
    screenshot = ARTIFACTS / "mlflow-ui-runs.png"
    driver.set_window_size(2400, 1000)  # the runs table renders only the columns in view: Models is far right
    try:
        driver.get(tracking.experiment_ui_url(tracked["uri"], tracked["experiment"]))
        wait = WebDriverWait(driver, WAIT_SECONDS)

        def rows(d) -> list[list[str]]:
            """The table's rows, top first, as lists of cell texts. The grid (ag-grid) draws each row in pieces, one
            per column section (pinned, scrolled), all with the row's run id; read in one script, since the table
            re-renders while it loads and element handles would go stale between calls."""
            pieces = d.execute_script(
                "return [...document.querySelectorAll('[role=row][row-id]')]"
                ".map(r => [Number(r.getAttribute('row-index')), r.getAttribute('row-id'), r.innerText])"
            )
            joined: dict[tuple[int, str], list[str]] = {}
            for index, run_id, text in pieces:
                joined.setdefault((index, run_id), []).extend(x.strip() for x in text.splitlines() if x.strip())
            return [[run_id, *cells] for (_, run_id), cells in sorted(joined.items())]

        with contextlib.suppress(TimeoutException):  # the assertions below say what is missing
            wait.until(lambda d: len(rows(d)) == 2 and all(REGISTERED in r for r in rows(d)))
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(screenshot))
        url, body, shown = driver.current_url, driver.find_element(By.TAG_NAME, "body").text, rows(driver)
    finally:
        driver.quit()
    assert f"/experiments/{tracked['experiment']}/runs" in url, f"opened {url}, not the runs view; see {screenshot}"
    assert tracking.EXPERIMENT_DESCRIPTION.split(".")[0] in body, f"no description shown; see {screenshot}"
    assert shown, f"no training run in the runs table; see {screenshot}"
    latest = shown[0]
    assert latest[0] == tracked["run_id"] and tracked["latest"] in latest, (
        f"first row {latest} is not the latest training run; see {screenshot}"
    )
    assert f"v{tracked['version']}" in latest and REGISTERED in latest, (
        f"first row {latest} does not show {REGISTERED} v{tracked['version']}; see {screenshot}"
    )
