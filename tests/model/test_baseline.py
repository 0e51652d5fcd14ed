"""The SGD baseline: a logged run shaped like a training run, serving the same model contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.baseline import BaselineParams, baseline
from tasks.lib import tracking
from tasks.lib.config import load_section
from tasks.lib.tiles import load_patches
from tasks.lib.training_runs import CostParams
from tasks.train import TrainParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(training_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        yield baseline(
            manifest=training_data.manifest(),
            tiles=training_data.tiles,
            params=load_section("baseline", BaselineParams, overrides=["baseline.epochs=3"]),
            train_params=load_section("train", TrainParams),
            cost=load_section("cost", CostParams),
            lineage=tracking.Lineage(snapshot="2026-11-16", data_version="0" * 32 + ".dir"),
        )


def test_run_is_tagged_baseline_with_lineage_and_dataset_sizes(result, training_data):
    import mlflow

    run = mlflow.get_run(result.run_id)
    assert run.data.tags[tracking.TAG_KIND] == "baseline"
    assert run.data.tags[tracking.TAG_SNAPSHOT] == "2026-11-16"
    assert run.data.params["model_architecture"] == "sgd_logistic_flat_pixels"
    manifest = pd.read_parquet(training_data.manifest())
    assert int(run.data.params["train_cloud"]) == int(((manifest["split"] == "train") & (manifest["label"] == 1)).sum())
    assert len(run.inputs.dataset_inputs) == 1


def test_epoch_metrics_use_the_trainers_names_so_runs_compare_side_by_side(result):
    from mlflow import MlflowClient

    client = MlflowClient()
    for name in ("train_loss", "val_loss", "val_auc", "val_precision", "val_recall", "images_per_second"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [0, 1, 2], name
    assert result.metrics["cost_usd"] > 0 and "cost_usd_per_1k_images" in result.metrics


def test_model_serves_raw_uint16_patches_and_matches_sklearn(result, training_data):
    import mlflow

    model = mlflow.pyfunc.load_model(tracking.run_model_uri(result.run_id))
    manifest = pd.read_parquet(training_data.manifest())
    patches = load_patches(training_data.tiles, manifest["patch_id"].head(6).tolist())
    scores = model.predict(patches)
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 1)).all()
    pipeline = model.unwrap_python_model().pipeline
    expected = pipeline.predict_proba(patches.reshape(6, -1).astype(np.float32))[:, 1]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    # not registered: a yardstick, never a candidate for champion
    assert not mlflow.MlflowClient().search_model_versions(f"run_id = '{result.run_id}'")
