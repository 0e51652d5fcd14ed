"""The DAG files: they load, their graphs are as designed, their settings come from params.yaml, and the Kubernetes
backend's pod renders with a GPU request and validates against the Kubernetes schema."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import jinja2
import kubernetes_validate
import pytest
import yaml

from tasks.lib.backends import BackendsParams
from tasks.lib.config import load_section
from tasks.lib.pipeline import PipelineParams

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.31"


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def refresh(bag):
    return bag.dags["cloudscreen_refresh"]


@pytest.fixture(scope="module")
def training(bag):
    return bag.dags["cloudscreen_training"]


@pytest.fixture(scope="module")
def screening(bag):
    return bag.dags["cloudscreen_screening"]


@pytest.fixture(scope="module")
def rollback(bag):
    return bag.dags["cloudscreen_rollback"]


@pytest.fixture(scope="module")
def every_dag(refresh, training, screening, rollback):
    return (refresh, training, screening, rollback)


def edges(dag) -> set[tuple[str, str]]:
    return {(task.task_id, down) for task in dag.tasks for down in task.downstream_task_ids}


def test_every_dag_loads_without_import_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dags) == {
        "cloudscreen_refresh", "cloudscreen_training", "cloudscreen_screening", "cloudscreen_rollback"
    }  # fmt: skip


def test_refresh_chains_the_data_steps_by_either_ingest_path(refresh):
    assert {t.task_id for t in refresh.tasks} == {
        "choose_ingest", "download", "validate", "tile", "ingest", "tiles", "sample", "version"
    }  # fmt: skip
    assert edges(refresh) == {
        ("choose_ingest", "download"),  # extract: the steps one by one ...
        ("choose_ingest", "ingest"),  # ... or stream: the archive read once into the same outputs
        ("download", "validate"),
        ("download", "tile"),  # the patches' folder comes from the download's result
        ("validate", "tile"),
        ("tile", "tiles"),
        ("ingest", "tiles"),
        ("tiles", "sample"),
        ("tiles", "version"),
        ("sample", "version"),
    }
    assert refresh.get_task("tiles").trigger_rule == "none_failed_min_one_success"  # one of the two paths is skipped
    assert refresh.params["ingest"] == load_section("pipeline", PipelineParams).ingest


def test_training_branches_to_one_backend_then_evaluates_and_gates(training):
    trains = {"train_local", "train_docker", "train_kubernetes"}
    assert {t.task_id for t in training.tasks} == trains | {
        "training_data", "plan_training", "search_hyperparameters", "choose_backend", "training_result", "evaluate",
        "gate", "new_champion", "summary",
    }  # fmt: skip
    graph = edges(training)
    assert ("training_data", "training_result") in graph  # it tags the run with why it trained ...
    assert ("search_hyperparameters", "training_result") in graph  # ... and with the search that chose its params
    assert ("plan_training", "search_hyperparameters") in graph
    for train in trains:
        assert ("choose_backend", train) in graph
        assert ("search_hyperparameters", train) in graph  # the plan, with the best trial's params after a search
        assert (train, "training_result") in graph
    assert {
        ("training_result", "evaluate"),
        ("evaluate", "gate"),
        ("gate", "summary"),
        ("gate", "new_champion"),
    } <= graph
    assert [o.name for o in training.get_task("new_champion").outlets] == ["cloudscreen_champion"]
    # Whichever backend ran, the others are skipped: the join must not need them all.
    assert training.get_task("training_result").trigger_rule == "none_failed_min_one_success"


def test_screening_follows_new_data_and_new_champions_one_task_per_snapshot(screening, rollback):
    assert {t.task_id for t in screening.tasks} == {
        "plan", "snapshots", "choose_backend", "screen", "screening_pods", "screen_kubernetes", "screening_result",
        "monitor", "request_retraining", "summary",
    }  # fmt: skip
    assert {
        ("plan", "snapshots"), ("snapshots", "screen"), ("plan", "screen"), ("screen", "screening_result"),
        ("screening_result", "monitor"), ("monitor", "request_retraining"), ("request_retraining", "summary"),
    } <= edges(screening)  # fmt: skip
    assert screening.get_task("screen").is_mapped and screening.get_task("monitor").is_mapped
    assert [o.name for o in screening.get_task("request_retraining").outlets] == ["cloudscreen_drift"]
    assert screening.get_task("summary").trigger_rule == "none_failed"  # a skipped request is no failure
    condition = str(screening.timetable.asset_condition)
    assert "cloudscreen_training_data" in condition and "cloudscreen_champion" in condition
    assert screening.catchup is False
    assert set(screening.params) == {"snapshot", "every_snapshot", "model", "backend"}
    assert screening.params["model"] == "models:/cloudscreen-classifier@champion"
    # A rollback from the UI moves the champion too, and says so on the same Asset.
    assert type(rollback.timetable).__name__ == "NullTimetable"  # manual only
    assert [o.name for o in rollback.get_task("rollback").outlets] == ["cloudscreen_champion"]


def test_schedules_and_limits_come_from_params(refresh, training):
    settings = load_section("pipeline", PipelineParams)
    assert refresh.timetable.expression == "0 0 * * 0"  # params.yaml's @weekly
    assert refresh.start_date == dt.datetime.combine(settings.start_date, dt.time(), dt.UTC)
    assert refresh.max_active_runs == settings.max_active_runs
    assert refresh.catchup is False
    # New data or the periodic retrain, whichever comes first.
    assert "cloudscreen_training_data" in str(training.timetable.asset_condition)
    assert training.timetable.timetable.expression == "0 0 1 * *"  # params.yaml's @monthly
    assert training.max_active_runs == 1
    assert [o.name for o in refresh.get_task("version").outlets] == ["cloudscreen_training_data"]


def test_io_tasks_retry_with_exponential_backoff_and_everything_has_a_timeout(refresh, training, screening):
    settings = load_section("pipeline", PipelineParams)
    for task_id in ("download", "version"):
        task = refresh.get_task(task_id)
        assert task.retries == settings.retries
        assert task.retry_exponential_backoff == settings.retry_exponential_backoff
        assert task.max_retry_delay == dt.timedelta(seconds=settings.max_retry_delay_seconds)
    for dag in (refresh, training, screening):
        for task in dag.tasks:
            assert task.execution_timeout is not None, task.task_id
    for task_id in ("tile", "ingest"):
        assert refresh.get_task(task_id).execution_timeout == dt.timedelta(minutes=settings.timeout_minutes["tile"])
    assert refresh.get_task("ingest").retries == settings.retries  # it may fetch the archive first


def test_permanent_errors_fail_every_python_task_without_retries(every_dag):
    """Each Python task body is wrapped by tasks.lib.errors.fail_fast with Airflow's AirflowFailException: a permanent
    error (bad data, bad params) fails at once, transient ones keep the task's retries (tests/e2e/test_retries.py)."""
    import inspect

    from airflow.sdk.exceptions import AirflowFailException

    for dag in every_dag:
        for task in dag.tasks:
            body = getattr(task, "python_callable", None)
            if body is None or task.task_id.startswith("choose_"):  # the KPO runs an image; a branch only picks
                continue
            assert hasattr(body, "__wrapped__"), f"{dag.dag_id}.{task.task_id} is not wrapped by fail_fast"
            assert inspect.getclosurevars(body).nonlocals["fail"] is AirflowFailException, task.task_id


def test_every_training_backend_runs_in_the_gpu_pool(training):
    pool = load_section("pipeline", PipelineParams).gpu_pool
    for task_id in ("train_local", "train_docker", "train_kubernetes"):
        assert training.get_task(task_id).pool == pool


def test_every_dag_and_task_is_documented(refresh, every_dag):
    for dag in every_dag:
        assert dag.doc_md and len(dag.doc_md) > 200
        for task in dag.tasks:
            assert task.doc_md and task.doc_md.strip(), f"{dag.dag_id}.{task.task_id} has no doc_md"
    assert "<data root>/raw/<snapshot>/" in refresh.get_task("download").doc_md


def test_the_training_form_offers_the_run_choices(training):
    params = training.params
    assert {
        "dataset", "snapshot", "epochs", "learning_rate", "search", "backend", "force_promote", "reason", "overrides"
    } <= set(params.keys())  # fmt: skip
    assert params["search"] is False  # a plain training unless asked
    assert params.get_param("backend").schema["enum"] == ["local", "docker", "kubernetes"]
    assert params.get_param("dataset").schema["enum"] == ["small", "large"]
    # A bad value is refused by the form, before any task runs.
    from airflow.sdk.definitions.param import ParamsDict

    good = ParamsDict({k: params.get_param(k) for k in params})
    good.update({"epochs": 3})
    good.validate()
    bad = ParamsDict({k: params.get_param(k) for k in params})
    with pytest.raises(Exception, match=r"epochs|minimum"):
        bad.update({"epochs": 0})
        bad.validate()


def test_the_training_form_offers_a_budget_in_minutes_or_dollars(training):
    from airflow.sdk.definitions.param import ParamsDict

    params = training.params
    form = ParamsDict({k: params.get_param(k) for k in params})
    assert form["budget_minutes"] is None and form["budget_usd"] is None  # params.yaml's budget (none) by default
    form.update({"budget_minutes": 4.5, "budget_usd": 0.2})
    form.validate()
    for field, value in (("budget_minutes", 0), ("budget_usd", -1)):
        bad = ParamsDict({k: params.get_param(k) for k in params})
        with pytest.raises(Exception, match=r"budget|Minimum|minimum"):
            bad.update({field: value})
            bad.validate()


def rendered_pod(training, arguments: list[str]) -> dict:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task = training.get_task("train_kubernetes")
    # The arguments are an XComArg (plan_training's result) until the task runs; give them their runtime value.
    with (
        mock.patch.object(task, "arguments", arguments),
        # No cluster here: rendering must not try to load a kubeconfig.
        mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False),
    ):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


def test_kubernetes_pod_requests_a_gpu_on_the_gpu_pool_and_validates(training):
    settings = load_section("backends", BackendsParams).kubernetes
    arguments = ["--snapshot", "2026-11-16", "--data-version", "0" * 32 + ".dir", "--restore-data", "/data"]
    pod = rendered_pod(training, arguments)
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)

    spec = pod["spec"]
    (trainer,) = [c for c in spec["containers"] if c["name"] == "base"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == str(settings.gpus)
    assert trainer["image"] == settings.image
    assert trainer["args"] == arguments
    assert spec["nodeSelector"] == settings.node_selector
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["serviceAccountName"] == settings.service_account
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["restartPolicy"] == "Never"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "cloudscreen-mlflow",
        "key": "tracking-token",
    }
    assert env["CLOUDSCREEN_IMAGE"]["value"] == settings.image
    assert env["CLOUDSCREEN_DAG_RUN_ID"]["value"] == "{{ run_id }}"  # rendered by Airflow when the task runs
    # No credentials by file: nothing from the host, the data in an emptyDir, the result through the XCom sidecar.
    assert all("hostPath" not in v for v in spec["volumes"])
    mounts = {m["mountPath"] for m in trainer["volumeMounts"]}
    assert {settings.data_dir, "/airflow/xcom"} <= mounts


def test_kubernetes_task_is_deferrable_and_deletes_its_pod(training):
    task = training.get_task("train_kubernetes")
    assert task.deferrable is True
    assert task.do_xcom_push is True
    assert task.on_finish_action.value == "delete_pod"


def test_k8s_pod_template_in_docker_agrees_with_the_backend_settings():
    """docker/k8s/trainer-pod.yaml (for kubectl and reviewers) says what the operator runs."""
    template = REPO / "docker" / "k8s" / "trainer-pod.yaml"
    if not template.exists():
        pytest.fail(f"{template} is missing")
    settings = load_section("backends", BackendsParams).kubernetes
    pod = yaml.safe_load(template.read_text())
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert pod["metadata"]["namespace"] == settings.namespace
    assert spec["serviceAccountName"] == settings.service_account
    assert spec["nodeSelector"] == settings.node_selector
    assert container["image"] == settings.image
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == str(settings.gpus)
    assert [t["key"] for t in spec["tolerations"]] == [t.key for t in settings.tolerations]


def test_screening_branches_to_local_screens_or_gpu_pods_and_joins_either(screening):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from tasks.lib.backends import ScreeningPlacement

    graph = edges(screening)
    # The branch picks the local screens, or the pods' arguments, which the pods (one per snapshot) follow.
    assert {("choose_backend", "screen"), ("choose_backend", "screening_pods")} <= graph
    assert ("choose_backend", "screen_kubernetes") not in graph
    assert {("plan", "screening_pods"), ("screening_pods", "screen_kubernetes")} <= graph
    pods = screening.get_task("screen_kubernetes")
    assert pods.is_mapped and pods.operator_class is KubernetesPodOperator
    assert set(pods.expand_input.value) == {"arguments"}
    # Whichever backend ran, the other is skipped: the join must not need them both.
    assert {("screen", "screening_result"), ("screen_kubernetes", "screening_result")} <= graph
    assert screening.get_task("screening_result").trigger_rule == "none_failed_min_one_success"
    form = screening.params.get_param("backend")
    assert form.schema["enum"] == ["local", "kubernetes"]
    assert form.value == load_section("screen", ScreeningPlacement).backend
    branch = screening.get_task("choose_backend").python_callable
    for backend, first in (("local", "screen"), ("kubernetes", "screening_pods")):
        context = {"params": {"backend": backend}}
        with mock.patch.dict(branch.__globals__, {"get_current_context": lambda context=context: context}):
            assert branch() == first


def rendered_screening_pod(screening, arguments: list[str]) -> dict:
    """One mapped screening pod as the worker renders it: the operator unmapped with this snapshot's arguments."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task = screening.get_task("screen_kubernetes").unmap({"arguments": arguments})
    with mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


def test_screening_pod_runs_tasks_screen_on_a_gpu_with_the_trainers_settings_and_validates(screening):
    from tasks.lib.backends import POD_XCOM_FILE, screening_arguments

    settings = load_section("backends", BackendsParams).kubernetes
    arguments = screening_arguments(
        snapshot="2026-11-16",
        data_version="0" * 32 + ".dir",
        model="models:/cloudscreen-classifier/3",
        out="gs://cloudscreen/screened/2026-11-16",
        data_dir=settings.data_dir,
        xcom_out=POD_XCOM_FILE,
    )
    pod = rendered_screening_pod(screening, arguments)
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)

    spec = pod["spec"]
    (screener,) = [c for c in spec["containers"] if c["name"] == "base"]
    assert screener["command"] == ["python", "-m", "tasks.screen"]  # not the image's entrypoint, which trains
    assert screener["args"] == arguments
    assert screener["image"] == settings.image
    assert screener["resources"]["limits"]["nvidia.com/gpu"] == str(settings.gpus)
    assert spec["nodeSelector"] == settings.node_selector
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["serviceAccountName"] == settings.service_account
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["labels"]["app"] == "cloudscreen-screener"
    env = {e["name"]: e for e in screener["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cloudscreen-mlflow"
    assert env["CLOUDSCREEN_DAG_RUN_ID"]["value"] == "{{ run_id }}"
    assert all("hostPath" not in v for v in spec["volumes"])
    mounts = {m["mountPath"] for m in screener["volumeMounts"]}
    assert {settings.data_dir, "/airflow/xcom"} <= mounts
    task = screening.get_task("screen_kubernetes")
    kwargs = task.partial_kwargs
    assert kwargs["deferrable"] is True and kwargs["do_xcom_push"] is True
    assert kwargs["on_finish_action"] == "delete_pod"
    assert kwargs["pool"] == load_section("pipeline", PipelineParams).gpu_pool
    assert task.doc_md and "GPU" in task.doc_md
    # Each mapped pod and monitoring is listed by its snapshot in the UI, not by 0, 1, 2.
    pod_label = jinja2.Template(kwargs["map_index_template"]).render(task=SimpleNamespace(arguments=arguments))
    assert pod_label == "2026-11-16"
    monitor_label = jinja2.Template(screening.get_task("monitor").partial_kwargs["map_index_template"]).render(
        task=SimpleNamespace(op_kwargs={"screened": {"snapshot": "2026-11-16", "out": "screened/2026-11-16/3"}})
    )
    assert monitor_label == "2026-11-16"


@pytest.mark.parametrize(
    ("retrain_on", "asset"), [("every_snapshot", "cloudscreen_training_data"), ("drift", "cloudscreen_drift")]
)
def test_retrain_on_chooses_what_triggers_training_besides_the_schedule(tmp_path, monkeypatch, retrain_on, asset):
    from airflow.dag_processing.dagbag import DagBag

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"]["retrain_on"] = retrain_on
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("CLOUDSCREEN_PARAMS", str(tmp_path / "params.yaml"))
    training = DagBag(dag_folder=str(REPO / "dags" / "cloudscreen_training.py")).dags["cloudscreen_training"]
    condition = str(training.timetable.asset_condition)
    assert asset in condition
    other = ({"cloudscreen_training_data", "cloudscreen_drift"} - {asset}).pop()
    assert other not in condition
    assert training.timetable.timetable.expression == "0 0 1 * *"  # the monthly safety net either way


def test_why_a_training_run_trains():
    from tasks.lib.pipeline import training_trigger

    drift = {"snapshot": "2026-11-30", "decision": "drift", "reasons": ["B04_mean: wasserstein distance 4.1 >= 0.2"]}
    kind, words = training_trigger(run_type="asset_triggered", events=[drift])
    assert kind == "drift" and "2026-11-30: drift: B04_mean" in words
    assert training_trigger(run_type="asset_triggered", events=[{"snapshot": "s1"}]) == (
        "new_data",
        "new snapshot(s): s1",
    )
    assert training_trigger(run_type="scheduled")[0] == "schedule"
    assert training_trigger(run_type="manual")[0] == "manual"
