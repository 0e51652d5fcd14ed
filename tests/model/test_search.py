"""The hyperparameter search on a tiny tiled mirror: nested trial runs, the search space, the best trial on the
parent, the same trials from the same seed (through the command line), and bad input and config named."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from tasks.lib import tracking
from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.lib.inputs import InputError
from tasks.lib.model import ModelParams
from tasks.lib.training_runs import CostParams
from tasks.search import PLOT_FILE, SEARCH_DIR, TRIALS_FILE, SearchParams, search
from tasks.train import TrainParams
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A network small enough to train an epoch in a second or two on 2 cores; the seed CNN is the params.yaml default.
TINY = ["model.conv_layers=[{filters: 4, kernel: 3, pool: 4}]", "model.dense_units=8"]
QUICK = ["train.batch_size=32", "train.system_metrics_interval_seconds=1", "search.epochs=1", "search.trials=3"]
LR_BOUNDS = ["search.learning_rate_min=0.0001", "search.learning_rate_max=0.05"]
LINEAGE = tracking.Lineage(git_commit="abc123", data_version="v1", snapshot="2026-11-16", dag_id="cloudscreen_search")


def sections(*overrides: str) -> dict:
    changes = [*TINY, *QUICK, *LR_BOUNDS, *overrides]
    return {
        "params": load_section("search", SearchParams, overrides=changes),
        "train_params": load_section("train", TrainParams, overrides=changes),
        "model_params": load_section("model", ModelParams, overrides=changes),
        "cost": load_section("cost", CostParams, overrides=changes),
    }


@pytest.fixture(scope="module")
def searched(training_data, tracking_uri):
    return search(manifest=training_data.manifest(), tiles=training_data.tiles, lineage=LINEAGE, **sections())


def _trials(parent_id: str) -> list:
    """The parent's nested runs, in trial order."""
    import mlflow

    experiment = mlflow.get_run(parent_id).info.experiment_id
    runs = mlflow.MlflowClient().search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(runs, key=lambda r: int(r.info.run_name.removeprefix("trial-")))


@pytest.fixture(scope="module")
def trials(searched):
    return _trials(searched.run_id)


def test_each_trial_is_a_nested_unregistered_train_run_under_a_search_parent(searched, trials):
    import mlflow

    parent = mlflow.get_run(searched.run_id)
    assert parent.data.tags[tracking.TAG_KIND] == "search"
    assert [t.info.run_name for t in trials] == ["trial-0", "trial-1", "trial-2"]
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == searched.run_id
        assert trial.data.tags[tracking.TAG_KIND] == "trial"
        assert trial.info.experiment_id == parent.info.experiment_id and trial.info.status == "FINISHED"
        assert trial.data.params["epochs"] == "1" and trial.data.params["model_conv0"] == "4x3x3/pool4"
    for run in (parent, *trials):
        assert run.data.tags[tracking.TAG_SNAPSHOT] == "2026-11-16"
        assert run.data.tags[tracking.TAG_DAG_ID] == "cloudscreen_search"
    assert mlflow.MlflowClient().search_model_versions() == []  # the search registers nothing
    assert searched.trials == 3


def test_trials_sample_the_configured_space(trials):
    chosen = [(float(t.data.params["learning_rate"]), t.data.params["optimizer"]) for t in trials]
    assert len(set(chosen)) == len(chosen)
    for learning_rate, optimizer in chosen:
        assert 0.0001 <= learning_rate <= 0.05
        assert optimizer in {"adam", "sgd", "rmsprop"}


def test_the_parent_records_the_best_trial(searched, trials):
    import mlflow

    best = min(trials, key=lambda t: t.data.metrics["best_val_loss"])
    parent = mlflow.get_run(searched.run_id).data
    assert parent.params["best_run_id"] == best.info.run_id == searched.best_run_id
    assert parent.params["best_trial"] == best.info.run_name.removeprefix("trial-")
    assert float(parent.params["best_learning_rate"]) == pytest.approx(float(best.data.params["learning_rate"]))
    assert parent.params["best_optimizer"] == best.data.params["optimizer"]
    assert parent.metrics["best_val_loss"] == pytest.approx(best.data.metrics["best_val_loss"])
    assert parent.metrics["best_val_auc"] == pytest.approx(best.data.metrics["best_val_auc"])
    assert searched.best_value == pytest.approx(best.data.metrics["best_val_loss"])
    assert parent.metrics["trials_completed"] == 3 and parent.metrics["trials_failed"] == 0
    total = sum(t.data.metrics["cost_usd"] for t in trials)
    assert parent.metrics["cost_usd"] == pytest.approx(total) and total > 0
    assert parent.params["search_learning_rate_min"] == "0.0001" and parent.params["search_metric"] == "best_val_loss"


def test_the_parent_holds_the_trials_table_and_plot(searched, trials, tmp_path):
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=searched.run_id, artifact_path=SEARCH_DIR, dst_path=tmp_path)
    table = pd.read_parquet(Path(local) / TRIALS_FILE)
    assert table["user_attrs_run_id"].tolist() == [t.info.run_id for t in trials]
    assert table["value"].tolist() == pytest.approx([t.data.metrics["best_val_loss"] for t in trials])
    assert (table["state"] == "COMPLETE").all()
    assert (Path(local) / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_training_dags_search_mode_runs_the_cli_and_plans_training_with_the_best_trial(
    searched, trials, training_data, tracking_uri, tmp_path
):
    """pipeline.search_step, as the training DAG's search_hyperparameters task calls it: tasks.search as a
    subprocess (the same seed gives the same trials), then the plan with the best trial's learning rate and
    optimizer as its last overrides, for the local trainer and the pod alike; the trained run is tagged with the
    search."""
    import mlflow

    from tasks.lib import pipeline
    from tasks.lib.backends import TrainingRequest

    overrides = (*TINY, *QUICK, *LR_BOUNDS, "search.trials=2")
    run = pipeline.Run(snapshot="manual__1", params_path=REPO / "params.yaml", overrides=overrides,
                       data_root=tmp_path / "data")  # fmt: skip
    data = {"snapshot": "manual__1", "data_version": "v1", "dataset": "small",
            "manifest": str(training_data.manifest()), "tiles": str(training_data.tiles)}  # fmt: skip
    plan = pipeline.search_step(run, plan=pipeline.plan_training(run, data=data))

    found = plan["search"]
    assert found["run_id"] != searched.run_id and found["trials"] == 2
    again = _trials(found["run_id"])
    assert [t.data.tags[tracking.TAG_SNAPSHOT] for t in again] == ["manual__1"] * 2  # the request's lineage
    for first, second in zip(trials[:2], again, strict=True):
        assert first.data.params["optimizer"] == second.data.params["optimizer"]
        assert math.isclose(float(first.data.params["learning_rate"]), float(second.data.params["learning_rate"]))
    best = min(again, key=lambda t: t.data.metrics["best_val_loss"])
    assert found["best_run_id"] == best.info.run_id
    chosen = (f"train.learning_rate={float(best.data.params['learning_rate'])!r}",
              f"train.optimizer={best.data.params['optimizer']}")  # fmt: skip
    request = TrainingRequest.from_json(plan["request"])
    assert request.overrides == (*overrides, *chosen)  # last, so they win over the form's
    arguments = plan["kubernetes_arguments"]
    assert arguments[-4:] == ["--set", chosen[0], "--set", chosen[1]]

    pipeline.record_trigger(found["best_run_id"], {**data, "trigger": "manual"}, plan)
    assert mlflow.get_run(found["best_run_id"]).data.tags[pipeline.TAG_SEARCH_RUN] == found["run_id"]


def test_a_missing_manifest_is_named_before_any_run_opens(training_data, tracking_uri, tmp_path):
    import mlflow

    missing = tmp_path / "nowhere" / "manifest.parquet"
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(InputError, match=f"{missing}: manifest not found"):
        search(manifest=missing, tiles=training_data.tiles, lineage=LINEAGE, **sections())
    assert len(mlflow.search_runs(search_all_experiments=True)) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.learning_rate_min=0.1", "learning_rate_min 0.1 must be below learning_rate_max"),
        ("search.optimizers=[adam, adagrad]", r"optimizers \['adagrad'\] unknown"),
        ("search.optimizers=[adam, adam]", "lists one twice"),
        ("search.metric=val_loss", r"search\.metric"),
    ],
)
def test_a_bad_search_space_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_section("search", SearchParams, overrides=[*LR_BOUNDS, override])
