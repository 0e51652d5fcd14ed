"""tasks.evaluate end to end: a stand-in pyfunc classifier logged to a SQLite MLflow store, evaluated on a tiled
and sampled small mirror; what the run then holds (metrics, artifacts, tags), model URIs, and the CLI. An evaluation
on other data than the model was trained on is a run of its own, linked to the model; the training run stays as it
was."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tasks import evaluate as ev
from tasks.lib.config import load_section
from tasks.lib.errors import EvaluationError
from tasks.lib.metrics import OPERATING_THRESHOLD, TARGET_RECALL
from tasks.lib.thresholds import operating_threshold
from tasks.lib.tracking import (
    CHAMPION,
    EVALUATION_DIR,
    METRICS_FILE,
    MODEL_ARTIFACT,
    PREDICTIONS_FILE,
    model_run_id,
    run_model_uri,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow

BRIGHTNESS_MODEL = Path(__file__).with_name("brightness_model.py")
REGISTERED = "cloudscreen-evaluate-test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlflow_evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)  # anything MLflow puts in the working directory stays in the test's directory
        yield root


def log_brightness_model(root: Path, trained_on: Path | None = None, **config) -> tuple[str, str]:
    """Log the stand-in classifier to a new run, with `trained_on` as its training input the way tasks.train logs it;
    return (run id, logged model URI)."""
    import mlflow

    from tasks.lib.tracking import Lineage
    from tasks.lib.training_runs import log_training_input

    experiment = mlflow.get_experiment_by_name("evaluate-tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        # An absolute artifact root: the CLI test runs in another working directory.
        else mlflow.create_experiment("evaluate-tests", artifact_location=(root / "artifacts").as_uri())
    )
    with mlflow.start_run(experiment_id=experiment_id) as run:
        if trained_on is not None:
            log_training_input(trained_on, pd.read_parquet(trained_on), Lineage.from_environment())
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(BRIGHTNESS_MODEL),
            model_config=config,
            pip_requirements=["mlflow"],  # skips requirement inference: slow, and nothing is installed from it here
        )
    return run.info.run_id, info.model_uri


@pytest.fixture(scope="module")
def params() -> ev.EvaluateParams:
    return load_section("evaluate", ev.EvaluateParams, overrides=["evaluate.batch_size=32"])


@pytest.fixture(scope="module")
def logged(tracking_root, training_data):
    import mlflow

    # (n, 1) output: coerced. "Trained" on the small set: the large set is other data.
    run_id, logged_uri = log_brightness_model(tracking_root, training_data.manifest("small"), output="column")
    registered = mlflow.register_model(run_model_uri(run_id), REGISTERED)
    mlflow.MlflowClient().set_registered_model_alias(REGISTERED, CHAMPION, registered.version)
    return {"run_id": run_id, "logged_uri": logged_uri, "version": registered.version}


@pytest.fixture(scope="module")
def evaluation(logged, training_data, params) -> ev.Evaluation:
    return ev.evaluate(
        model_uri=run_model_uri(logged["run_id"]),
        manifest=training_data.manifest("small"),
        tiles=training_data.tiles,
        params=params,
        log_to_run=logged["run_id"],
    )


@pytest.fixture(scope="module")
def downloaded(evaluation, tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    out = tmp_path_factory.mktemp("evaluation_artifacts")
    return Path(MlflowClient().download_artifacts(evaluation.run_id, EVALUATION_DIR, str(out)))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_the_run_holds_every_metric_of_the_result(evaluation, logged):
    from mlflow import MlflowClient

    logged_metrics = MlflowClient().get_run(logged["run_id"]).data.metrics
    assert evaluation.run_id == logged["run_id"]
    for name, value in evaluation.metrics.items():
        assert same(logged_metrics[name], float(value)), name
    for name in ("test_op_recall", "test_t50_precision", "natural_op_precision", "test_roc_auc", "val_op_recall"):
        assert name in logged_metrics
    assert logged_metrics[OPERATING_THRESHOLD] == pytest.approx(evaluation.threshold)
    assert logged_metrics[TARGET_RECALL] == pytest.approx(0.958)


def test_metrics_agree_with_scikit_learn_on_the_predictions(evaluation, training_data):
    predictions = evaluation.predictions
    manifest = pd.read_parquet(training_data.manifest("small"))
    natural = pd.read_parquet(training_data.manifest("small").with_name("natural.parquet"))
    counts = predictions["set"].value_counts().to_dict()
    assert counts == {
        "val": int((manifest["split"] == "val").sum()),
        "test": int((manifest["split"] == "test").sum()),
        "natural": len(natural),
    }
    assert predictions["score"].between(0, 1).all() and predictions["score"].dtype == np.float64

    val = predictions[predictions["set"] == "val"]
    confidence = evaluation.summary["threshold"]["confidence"]  # params.yaml's evaluate.threshold_confidence
    threshold = operating_threshold(val["label"].to_numpy(), val["score"].to_numpy(), 0.958, confidence)
    assert evaluation.threshold == threshold
    assert evaluation.metrics["val_op_recall"] >= 0.958
    for name in ("test", "natural"):
        part = predictions[predictions["set"] == name]
        y, s = part["label"].to_numpy(), part["score"].to_numpy()
        at_op, at_half = (s >= threshold).astype(int), (s >= 0.5).astype(int)
        m = evaluation.metrics
        assert m[f"{name}_op_recall"] == pytest.approx(skm.recall_score(y, at_op))
        assert same(m[f"{name}_op_precision"], skm.precision_score(y, at_op, zero_division=np.nan))
        assert m[f"{name}_t50_accuracy"] == pytest.approx(skm.accuracy_score(y, at_half))
        assert m[f"{name}_t50_f1"] == pytest.approx(skm.f1_score(y, at_half))
        assert m[f"{name}_roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))
        assert m[f"{name}_average_precision"] == pytest.approx(skm.average_precision_score(y, s))
        assert m[f"{name}_log_loss"] == pytest.approx(skm.log_loss(y, s))
        cells = skm.confusion_matrix(y, at_op, labels=[0, 1]).ravel().tolist()
        assert [m[f"{name}_op_{c}"] for c in ("tn", "fp", "fn", "tp")] == cells
    # The comparison above is not vacuous: the stand-in's scores differ from patch to patch. (Brightness alone no
    # longer ranks clouds well: the mirror's snow, bright covers and haze are as bright as cloud in R, G, B.)
    assert predictions["score"].nunique() > len(predictions) // 2


def test_slices_cover_every_season_and_country_with_their_sizes(evaluation):
    slices = evaluation.slices
    predictions = evaluation.predictions
    for name in ("test", "natural"):
        part = predictions[predictions["set"] == name]
        for column in ("season", "country"):
            rows = slices[(slices["set"] == name) & (slices["column"] == column)]
            assert dict(zip(rows["value"], rows["patches"], strict=True)) == part[column].value_counts().to_dict()
            assert rows["positives"].sum() == part["label"].sum()
    assert "val" not in set(slices["set"])


def test_artifacts_are_all_there_and_readable(downloaded, evaluation, training_data):
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(ev.ARTIFACTS)
    from matplotlib.image import imread

    for plot in (ev.THRESHOLD_PLOT, ev.PR_CURVE_PLOT, ev.CONFUSION_PLOT, ev.WORST_ERRORS_PLOT):
        assert (downloaded / plot).read_bytes()[:8] == PNG_MAGIC, plot
        assert imread(downloaded / plot).shape[2] in (3, 4), plot  # decodes as an image
    predictions = pd.read_parquet(downloaded / PREDICTIONS_FILE)
    assert list(predictions.columns) == ["patch_id", "set", "label", "score", "season", "country"]
    pd.testing.assert_frame_equal(predictions, evaluation.predictions)
    slices = pd.read_parquet(downloaded / ev.SLICES_FILE)
    assert len(slices) == len(evaluation.slices) and {"set", "column", "value", "patches"} <= set(slices.columns)

    summary = json.loads((downloaded / METRICS_FILE).read_text())
    assert summary["threshold"]["operating"] == evaluation.threshold
    assert summary["threshold"]["target_recall"] == 0.958
    assert summary["data"]["manifest"] == str(training_data.manifest("small").resolve())
    assert summary["data"]["tiles"] == str(training_data.tiles.resolve())
    assert summary["data"]["counts"]["natural"]["patches"] == int((predictions["set"] == "natural").sum())
    assert summary["metrics"]["test_op_recall"] == evaluation.metrics["test_op_recall"]


def test_tags_record_the_model_and_data(evaluation, training_data):
    from mlflow import MlflowClient

    from tasks.lib.files import file_digest

    tags = MlflowClient().get_run(evaluation.run_id).data.tags
    manifest = training_data.manifest("small")
    assert tags[ev.TAG_MODEL_URI] == run_model_uri(evaluation.run_id)
    assert tags[ev.TAG_MANIFEST] == str(manifest.resolve())
    assert tags[ev.TAG_NATURAL] == str(manifest.with_name("natural.parquet").resolve())
    assert tags[ev.TAG_TILES] == str(training_data.tiles.resolve())
    assert tags[ev.TAG_MANIFEST_SHA256] == file_digest(manifest, "sha256")


def test_model_uris_lead_to_their_source_run(logged):
    run_id = logged["run_id"]
    assert model_run_id(run_model_uri(run_id)) == run_id
    assert model_run_id(f"models:/{REGISTERED}@{CHAMPION}") == run_id
    assert model_run_id(f"models:/{REGISTERED}/{logged['version']}") == run_id
    assert model_run_id(logged["logged_uri"]) == run_id  # MLflow 3's logged model, models:/m-...
    with pytest.raises(EvaluationError, match="nosuchalias"):
        model_run_id(f"models:/{REGISTERED}@nosuchalias")
    with pytest.raises(EvaluationError, match="expected runs:/ID/PATH"):
        model_run_id("s3://bucket/model")


def test_without_a_run_nothing_is_logged(evaluation, logged, training_data, params):
    import mlflow

    before = mlflow.search_runs(search_all_experiments=True)
    history = mlflow.MlflowClient().get_metric_history(logged["run_id"], "test_op_recall")
    again = ev.evaluate(
        model_uri=f"models:/{REGISTERED}@{CHAMPION}",
        manifest=training_data.manifest("small"),
        tiles=training_data.tiles,
        params=params,
        log_to_run=None,
    )
    assert again.run_id is None and again.threshold == evaluation.threshold
    pd.testing.assert_frame_equal(again.predictions, evaluation.predictions)
    assert len(mlflow.search_runs(search_all_experiments=True)) == len(before)
    assert mlflow.MlflowClient().get_metric_history(logged["run_id"], "test_op_recall") == history


def test_an_unknown_run_or_a_model_breaking_the_contract_is_an_error(tracking_root, training_data, params):
    common = {"manifest": training_data.manifest("small"), "tiles": training_data.tiles, "params": params}
    run_id, _ = log_brightness_model(tracking_root, output="percent")
    with pytest.raises(EvaluationError, match="run 'nosuchrun'"):
        ev.evaluate(model_uri=run_model_uri(run_id), log_to_run="nosuchrun", **common)
    uri = run_model_uri(run_id)
    with pytest.raises(EvaluationError, match=rf"{uri}.*not probabilities in \[0, 1\]"):
        ev.evaluate(model_uri=uri, log_to_run=run_id, **common)


def training_record(run_id: str) -> dict:
    """What a run says about itself: metrics, tags, the length of every metric's history, artifacts, inputs."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    return {
        "metrics": run.data.metrics,
        "tags": run.data.tags,
        "history": {name: len(client.get_metric_history(run_id, name)) for name in run.data.metrics},
        "artifacts": sorted(a.path for a in client.list_artifacts(run_id, EVALUATION_DIR)),
        "inputs": sorted((i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs),
    }


def equal_records(a: dict, b: dict) -> bool:
    metrics_equal = a["metrics"].keys() == b["metrics"].keys() and all(
        same(a["metrics"][k], b["metrics"][k]) for k in a["metrics"]
    )
    return metrics_equal and all(a[k] == b[k] for k in ("tags", "history", "artifacts", "inputs"))


@pytest.fixture(scope="module")
def elsewhere(evaluation, logged, training_data, params):
    """The champion evaluated on the large set (not its training data), with the training run's record before."""
    before = training_record(logged["run_id"])
    result = ev.evaluate(
        model_uri=f"models:/{REGISTERED}@{CHAMPION}",
        manifest=training_data.manifest("large"),
        tiles=training_data.tiles,
        params=params,
        log_to_run=None,
        log_evaluation=True,
    )
    return before, result


def test_an_evaluation_on_other_data_leaves_the_training_run_as_it_was(elsewhere, logged, evaluation):
    before, result = elsewhere
    assert result.kind == "evaluation" and result.run_id not in (None, logged["run_id"])
    after = training_record(logged["run_id"])
    assert equal_records(after, before)
    # The figures really differ: were they written over the training run, the check above would catch it.
    assert not same(result.metrics["test_op_precision"], evaluation.metrics["test_op_precision"])
    assert after["tags"][ev.TAG_MANIFEST].endswith("small/manifest.parquet")


def test_the_evaluation_run_holds_the_new_figures_linked_to_the_model(elsewhere, logged, training_data):
    import mlflow
    from mlflow import MlflowClient

    from tasks.lib.tracking import KIND_EVALUATION, TAG_KIND

    _, result = elsewhere
    client = MlflowClient()
    run = client.get_run(result.run_id)
    training = client.get_run(logged["run_id"])
    model_id = run_model_uri(logged["run_id"]).removeprefix("models:/")
    assert run.info.experiment_id == training.info.experiment_id and run.info.status == "FINISHED"
    for name, value in result.metrics.items():
        assert same(run.data.metrics[name], float(value)), name
    tags = run.data.tags
    large = training_data.manifest("large")
    assert tags[TAG_KIND] == KIND_EVALUATION
    assert tags[ev.TAG_TRAINING_RUN] == logged["run_id"] and tags[ev.TAG_MODEL_ID] == model_id
    assert (tags[ev.TAG_REGISTERED_MODEL], tags[ev.TAG_MODEL_VERSION]) == (REGISTERED, str(logged["version"]))
    assert tags[ev.TAG_MODEL_URI] == f"models:/{REGISTERED}@{CHAMPION}"
    assert tags[ev.TAG_MANIFEST] == str(large.resolve())
    assert sorted(a.path.split("/")[-1] for a in client.list_artifacts(result.run_id, EVALUATION_DIR)) == sorted(
        ev.ARTIFACTS
    )
    # Linked to the model: the run takes it as input, and the logged model holds the metrics by dataset.
    assert [i.model_id for i in run.inputs.model_inputs] == [model_id]
    (data,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == ev.DATA_CONTEXT
    digest = mlflow.data.from_pandas(pd.read_parquet(large)).digest
    assert data.dataset.digest == digest
    by_data = {
        (m.dataset_digest, m.run_id): m.value
        for m in client.get_logged_model(model_id).metrics
        if m.key == "test_op_precision"
    }
    assert by_data[(digest, result.run_id)] == pytest.approx(result.metrics["test_op_precision"])
    (trained,) = [i.dataset.digest for i in training.inputs.dataset_inputs]
    assert by_data[(trained, logged["run_id"])] == pytest.approx(training.data.metrics["test_op_precision"])


def test_on_its_own_data_the_evaluation_goes_to_the_training_run(elsewhere, logged, training_data, params):
    from mlflow import MlflowClient

    client = MlflowClient()
    history = len(client.get_metric_history(logged["run_id"], "test_op_recall"))
    result = ev.evaluate(
        model_uri=f"models:/{REGISTERED}/{logged['version']}",
        manifest=training_data.manifest("small"),
        tiles=training_data.tiles,
        params=params,
        log_to_run=None,
        log_evaluation=True,
    )
    assert (result.kind, result.run_id) == ("training", logged["run_id"])
    assert len(client.get_metric_history(logged["run_id"], "test_op_recall")) == history + 1


def test_the_training_run_refuses_an_evaluation_on_other_data(logged, training_data, params):
    with pytest.raises(EvaluationError, match=rf"run {logged['run_id']} was trained on other data"):
        ev.evaluate(
            model_uri=run_model_uri(logged["run_id"]),
            manifest=training_data.manifest("large"),
            tiles=training_data.tiles,
            params=params,
            log_to_run=logged["run_id"],
        )
    with pytest.raises(EvaluationError, match="ask for one"):
        ev.evaluate(
            model_uri=run_model_uri(logged["run_id"]),
            manifest=training_data.manifest("small"),
            tiles=training_data.tiles,
            params=params,
            log_to_run=logged["run_id"],
            log_evaluation=True,
        )


def test_cli_evaluates_the_champion_elsewhere_in_a_run_of_its_own(elsewhere, logged, training_data):
    """The issue's case: `tasks.evaluate --model models:/NAME@champion --manifest OTHER`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "tasks.evaluate",
        "--model",
        f"models:/{REGISTERED}@{CHAMPION}",
        "--manifest",
        str(training_data.manifest("large")),
        "--tiles",
        str(training_data.tiles),
        "--set",
        "evaluate.batch_size=7",
    ]
    before = training_record(logged["run_id"])
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    _, result = elsewhere
    assert summary["logged_to"] == "evaluation" and summary["run_id"] not in (logged["run_id"], result.run_id)
    assert summary["model_uri"] == f"models:/{REGISTERED}@{CHAMPION}"
    assert summary[OPERATING_THRESHOLD] == pytest.approx(result.threshold)
    assert summary["test_op_precision"] == pytest.approx(result.metrics["test_op_precision"])
    assert equal_records(training_record(logged["run_id"]), before)


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    command = [
        sys.executable,
        "-m",
        "tasks.evaluate",
        "--params",
        str(REPO / "params.yaml"),
        "--run-id",
        "abc",
        "--manifest",
        str(tmp_path / "manifest.parquet"),
        "--tiles",
        str(tmp_path),
    ]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "run abc: Run with id=abc not found" in done.stderr and "Traceback" not in done.stderr


def test_cli_run_file_that_is_not_a_training_result_is_one_line(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('{"model_version": "3"}')
    command = [sys.executable, "-m", "tasks.evaluate", "--params", str(REPO / "params.yaml"), "--run-file", str(bad),
               "--manifest", str(tmp_path / "manifest.parquet"), "--tiles", str(tmp_path)]  # fmt: skip
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{bad}: no run_id in this training result" in done.stderr and "Traceback" not in done.stderr
