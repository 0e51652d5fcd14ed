"""tasks.lib.backends: one trainer entrypoint started three ways, with the same data, overrides and lineage."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tasks.lib.backends import (
    DOCKER_XCOM_FILE,
    POD_XCOM_FILE,
    SCREENER_MODULE,
    BackendsParams,
    TrainingBackendError,
    TrainingRequest,
    docker_spec,
    kubernetes_spec,
    run_docker,
    run_local,
    screening_arguments,
)
from tasks.lib.config import load_section
from tasks.lib.errors import CloudscreenError

VERSION = "0123456789abcdef0123456789abcdef.dir"


@pytest.fixture
def request_(tmp_path) -> TrainingRequest:
    return TrainingRequest(
        snapshot="2026-11-16",
        data_version=VERSION,
        dataset="small",
        manifest=tmp_path / "samples" / "small" / "manifest.parquet",
        tiles=tmp_path / "tiles",
        overrides=("train.epochs=2", "model.architecture=mobilenet_v2"),
        checkpoint_dir=tmp_path / "checkpoints",
        dag_id="cloudscreen_training",
        dag_run_id="manual__1",
    )


def pairs(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        out.setdefault(flag, []).append(value)
    return out


def test_local_arguments_point_at_the_workers_files(request_, tmp_path):
    args = pairs(request_.local_arguments(tmp_path / "out.json"))
    assert args["--manifest"] == [str(request_.manifest)]
    assert args["--tiles"] == [str(request_.tiles)]
    assert args["--checkpoint-dir"] == [str(request_.checkpoint_dir)]
    assert args["--xcom-out"] == [str(tmp_path / "out.json")]
    assert args["--snapshot"] == ["2026-11-16"] and args["--data-version"] == [VERSION]
    assert args["--set"] == ["train.epochs=2", "model.architecture=mobilenet_v2"]


def test_image_arguments_restore_the_data_version_and_use_paths_inside_it(request_):
    args = pairs(request_.remote_arguments("/data", POD_XCOM_FILE))
    assert args["--restore-data"] == ["/data"]
    assert args["--data-version"] == [VERSION]
    assert args["--manifest"] == ["samples/small/manifest.parquet"]  # relative to the restored data
    assert args["--tiles"] == ["tiles"]
    assert args["--xcom-out"] == ["/airflow/xcom/return.json"]
    assert args["--set"] == list(request_.overrides)
    assert "--checkpoint-dir" not in args  # the worker's disk is not the container's
    assert "--checkpoint-url" not in args
    remote = TrainingRequest.from_json(request_.to_json() | {"checkpoint_url": "gs://b/checkpoints/d/r"})
    assert pairs(remote.remote_arguments("/data", POD_XCOM_FILE))["--checkpoint-url"] == ["gs://b/checkpoints/d/r"]
    assert "--checkpoint-url" not in remote.local_arguments(Path("out.json"))


def test_request_survives_xcom(request_):
    assert TrainingRequest.from_json(request_.to_json()) == request_


def test_lineage_reaches_every_backend_by_environment(request_):
    env = request_.lineage_env()
    assert env == {
        "CLOUDSCREEN_SNAPSHOT": "2026-11-16",
        "CLOUDSCREEN_DATA_VERSION": VERSION,
        "CLOUDSCREEN_DAG_ID": "cloudscreen_training",
        "CLOUDSCREEN_DAG_RUN_ID": "manual__1",
    }
    docker = load_section("backends", BackendsParams).docker
    assert env.items() <= docker_spec(request_, docker)["environment"].items()


def test_docker_container_requests_gpus_and_reports_its_image(request_):
    docker = load_section("backends", BackendsParams).docker
    spec = docker_spec(request_, docker)
    (gpus,) = spec["device_requests"]
    assert gpus["Count"] == docker.gpus and gpus["Capabilities"] == [["gpu"]]
    assert spec["image"] == docker.image
    assert spec["environment"]["CLOUDSCREEN_IMAGE"] == docker.image
    assert pairs(spec["command"])["--xcom-out"] == [DOCKER_XCOM_FILE]
    cpu = docker.model_copy(update={"gpus": 0})
    assert "device_requests" not in docker_spec(request_, cpu)


def test_kubernetes_spec_puts_the_gpu_in_limits_and_secrets_by_reference(request_):
    settings = load_section("backends", BackendsParams).kubernetes
    spec = kubernetes_spec(request_.remote_arguments(settings.data_dir, POD_XCOM_FILE), settings)
    assert spec["container_resources"].limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in (spec["container_resources"].requests or {})
    secret_env = [e for e in spec["env_vars"] if e.value_from is not None]
    assert [(e.name, e.value_from.secret_key_ref.name) for e in secret_env] == [
        ("MLFLOW_TRACKING_TOKEN", "cloudscreen-mlflow")
    ]
    assert spec["deferrable"] is True and spec["on_finish_action"] == "delete_pod" and spec["do_xcom_push"] is True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docker_backend_without_an_engine_says_so(request_):
    docker = load_section("backends", BackendsParams).docker
    no_engine = docker.model_copy(update={"base_url": f"tcp://127.0.0.1:{_closed_port()}"})
    with pytest.raises(CloudscreenError, match="Docker"):
        run_docker(request_, no_engine)


@pytest.mark.slow
def test_a_failing_trainer_fails_the_task_with_the_end_of_its_log(request_, tmp_path):
    # The manifest does not exist: the real trainer, started as the local backend starts it, refuses it.
    with pytest.raises(TrainingBackendError) as failure:
        run_local(request_)
    message = str(failure.value)
    assert "exited with code 2" in message
    assert str(request_.manifest) in message  # the trainer's own one-line error, carried into the task's failure
    assert not Path(tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_the_spot_pool_adds_gkes_selector_and_toleration_and_the_preemptible_prices():
    from tasks.lib.training_runs import CostParams

    on_demand = load_section("backends", BackendsParams).kubernetes
    assert on_demand.spot is False
    spot = on_demand.model_copy(update={"spot": True})
    regular, preemptible = kubernetes_spec([], on_demand), kubernetes_spec([], spot)
    assert "cloud.google.com/gke-spot" not in regular["node_selector"]
    assert preemptible["node_selector"] == on_demand.node_selector | {"cloud.google.com/gke-spot": "true"}
    (added,) = [t for t in preemptible["tolerations"] if t.key == "cloud.google.com/gke-spot"]
    assert (added.operator, added.value, added.effect) == ("Equal", "true", "NoSchedule")
    env = {e.name: e.value for e in preemptible["env_vars"]}
    cost = load_section("cost", CostParams)
    assert env["CLOUDSCREEN_MACHINE_TYPE"] == on_demand.env["CLOUDSCREEN_MACHINE_TYPE"] + "-preemptible"
    assert env["CLOUDSCREEN_MACHINE_TYPE"] in cost.machine_usd_per_hour
    assert env["CLOUDSCREEN_ACCELERATOR"] in cost.accelerator_usd_per_hour
    assert env["CLOUDSCREEN_ACCELERATOR"].endswith("-preemptible")


def test_the_screening_pod_runs_tasks_screen_from_the_trainer_image_and_restores_its_snapshot():
    settings = load_section("backends", BackendsParams).kubernetes
    args = screening_arguments(
        snapshot="2026-11-16",
        data_version=VERSION,
        model="models:/cloudscreen-classifier/3",
        out="gs://cloudscreen/screened/2026-11-16",
        data_dir=settings.data_dir,
        xcom_out=POD_XCOM_FILE,
    )
    flags = pairs(args)
    assert flags["--restore-data"] == [settings.data_dir] and flags["--data-version"] == [VERSION]
    assert flags["--tiles"] == ["tiles"]  # inside the restored data version
    assert flags["--out"] == ["gs://cloudscreen/screened/2026-11-16"] and flags["--xcom-out"] == [POD_XCOM_FILE]
    assert flags["--set"] == ["screen.device=gpu"]  # a pod without a usable GPU fails instead of scoring on its CPUs
    screener = kubernetes_spec(None, settings, module=SCREENER_MODULE)
    trainer = kubernetes_spec(args, settings)
    assert screener["cmds"] == ["python", "-m", "tasks.screen"] and "cmds" not in trainer  # the entrypoint trains
    assert "arguments" not in screener  # a mapped operator's .partial(): they come with .expand()
    assert screener["labels"] == {"app": "cloudscreen-screener"} and trainer["labels"] == {"app": "cloudscreen-trainer"}
    same = ("image", "service_account_name", "node_selector", "tolerations", "container_resources", "volumes")
    assert all(screener[key] == trainer[key] for key in same)


def test_where_the_screening_runs_is_read_alone_and_never_changes_what_it_computes():
    from tasks.lib.backends import ScreeningPlacement
    from tasks.lib.errors import ConfigError
    from tasks.screen import ScreenParams

    # The DAG reads backend and store without importing the step; the step still refuses keys it does not know.
    assert load_section("screen", ScreeningPlacement).backend == "local"
    with pytest.raises(ConfigError, match=r"screen\.bogus"):
        load_section("screen", ScreenParams, overrides=["screen.bogus=1"])
    here = load_section("screen", ScreenParams)
    pods = load_section("screen", ScreenParams, overrides=["screen.backend=kubernetes", "screen.store=gs://b/x"])
    assert here.computed_json() == pods.computed_json() and "backend" not in here.computed()
    assert (
        load_section("screen", ScreenParams, overrides=["screen.batch_size=8"]).computed_json() != here.computed_json()
    )
