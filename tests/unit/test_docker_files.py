"""docker/: what the images, the local stack and the GPU pod would run, checked without an engine or a cluster.

The Kubernetes objects against the Kubernetes schema (kubernetes-validate), the compose file against the Compose
Specification's schema (as check-jsonschema ships it) and for its wiring, the Dockerfiles with hadolint and for the
rules of this project: pinned bases, a non-root user, dependencies before code, no credentials, versions from the lock.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tasks.lib.config import load_section
from tests.conftest import REPO

DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
KUBERNETES_VERSION = "1.35.0"  # the one `make lint` validates against
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
K8S_FILES = sorted(K8S.glob("*.yaml"))
TRAINER_IMAGE = "europe-west4-docker.pkg.dev/PROJECT_ID/cloudscreen/trainer:latest"
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
CREDENTIAL_RE = re.compile(r"(\.json$|\.pem$|\.key$|\.p12$|credential|service-account|secret|\.env$|id_rsa)", re.I)


def _resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _lock_version(name: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == name]
    return version


# --- Kubernetes ------------------------------------------------------------------------------------------------------


def test_the_k8s_files_are_the_ones_the_gpu_backend_needs():
    assert {p.name for p in K8S_FILES} == {
        "namespace.yaml",
        "serviceaccount.yaml",
        "mlflow-secret.example.yaml",
        "trainer-pod.yaml",
        "trainer-pod-spot.yaml",
        "screen-pod.yaml",
        "serve-deployment.yaml",
        "serve-service.yaml",
        "serve-hpa.yaml",
    }


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_every_k8s_object_validates_against_the_kubernetes_schema(path):
    resources = _resources(path)
    assert resources, f"{path} holds no object"
    for resource in resources:
        assert kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True) == "1.35"


def test_the_schema_check_would_catch_a_broken_pod():
    (pod,) = _resources(K8S / "trainer-pod.yaml")
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["resources"]["limits"] = ["nvidia.com/gpu"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["gpus"] = 1  # strict: unknown fields are errors
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def pod() -> dict:
    (resource,) = _resources(K8S / "trainer-pod.yaml")
    return resource


@pytest.fixture(scope="module")
def trainer(pod) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def test_the_trainer_pod_gets_one_v100_and_tolerates_the_gpu_taint(pod, trainer):
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == "cloudscreen"
    assert str(trainer["resources"]["limits"]["nvidia.com/gpu"]) == "1"  # extended resources: limits only
    assert trainer["resources"]["requests"] == {"cpu": "4", "memory": "24Gi"}
    assert trainer["resources"]["limits"]["memory"] == "24Gi"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["restartPolicy"] == "Never"


def test_the_trainer_pod_runs_the_trainer_image_as_the_workload_identity_account(pod, trainer):
    assert pod["spec"]["serviceAccountName"] == "cloudscreen-trainer"
    assert trainer["name"] == "base"  # the container KubernetesPodOperator treats as the task's
    assert trainer["image"] == TRAINER_IMAGE
    assert "command" not in trainer, "the image's ENTRYPOINT (python -m tasks.train) is the command"


def test_the_trainer_pod_runs_as_non_root_without_host_access(pod, trainer):
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    assert not trainer["securityContext"].get("privileged", False)
    assert all("hostPath" not in volume for volume in spec.get("volumes", []))
    assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))


def test_the_trainer_pod_environment_and_data_volume(pod, trainer):
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.cloudscreen.svc.cluster.local:5000"
    assert env["CLOUDSCREEN_MACHINE_TYPE"]["value"] == "n1-standard-8"
    assert env["CLOUDSCREEN_ACCELERATOR"]["value"] == "nvidia-tesla-v100"
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "cloudscreen-mlflow", "key": "tracking-token"}
    }
    assert all("value" not in e for e in trainer["env"] if "TOKEN" in e["name"] or "PASSWORD" in e["name"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in trainer["volumeMounts"] if m["mountPath"] == "/data"]
    assert volumes[mount["name"]] == {"name": mount["name"], "emptyDir": {}}


def test_the_pod_machine_and_accelerator_are_priced_in_params(trainer):
    from tasks.lib.training_runs import CostParams

    cost = load_section("cost", CostParams)
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["CLOUDSCREEN_MACHINE_TYPE"] in cost.machine_usd_per_hour
    assert env["CLOUDSCREEN_ACCELERATOR"] in cost.accelerator_usd_per_hour


def test_the_pod_user_is_the_trainer_image_user(pod):
    user = _final_stage(DOCKER / "trainer.Dockerfile")["USER"][-1]
    assert user.split(":")[0] == str(pod["spec"]["securityContext"]["runAsUser"])


def test_the_screen_pod_is_the_trainer_pod_running_tasks_screen_with_the_dags_arguments(pod, trainer):
    """docker/k8s/screen-pod.yaml (for kubectl and reviewers) says what cloudscreen_screening's kubernetes backend
    runs: the trainer pod's image, GPU, node pool, identity and data volume, with `python -m tasks.screen` and the
    arguments tasks.lib.backends gives each snapshot's pod."""
    from tasks.lib.backends import POD_XCOM_FILE, BackendsParams, screening_arguments

    settings = load_section("backends", BackendsParams).kubernetes
    (screen_pod,) = _resources(K8S / "screen-pod.yaml")
    (screener,) = screen_pod["spec"]["containers"]
    assert screener["name"] == "base"
    assert screener["command"] == ["python", "-m", "tasks.screen"]
    assert screener["args"] == screening_arguments(
        snapshot="2026-11-16",
        data_version="0123456789abcdef0123456789abcdef.dir",
        model="models:/cloudscreen-classifier/3",
        out="gs://cloudscreen/screened/2026-11-16",
        data_dir=settings.data_dir,
        xcom_out=POD_XCOM_FILE,
    )
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "securityContext", "volumes", "restartPolicy"):
        assert screen_pod["spec"][key] == pod["spec"][key], key
    for key in ("image", "resources", "volumeMounts", "securityContext"):
        assert screener[key] == trainer[key], key
    assert screen_pod["metadata"]["namespace"] == pod["metadata"]["namespace"]


def test_the_service_account_is_bound_to_the_trainer_gsa_by_workload_identity():
    (namespace,) = _resources(K8S / "namespace.yaml")
    (account,) = _resources(K8S / "serviceaccount.yaml")
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == "cloudscreen"
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == "cloudscreen-trainer"
    assert account["metadata"]["namespace"] == "cloudscreen"
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "cloudscreen-trainer@PROJECT_ID.iam.gserviceaccount.com"
    }


def test_the_secret_manifest_is_an_example_with_a_placeholder():
    path = K8S / "mlflow-secret.example.yaml"
    (secret,) = _resources(path)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "cloudscreen-mlflow"
    assert set(secret["stringData"]) == {"tracking-token"}
    assert "PLACEHOLDER" in secret["stringData"]["tracking-token"]
    assert "data" not in secret, "a base64 value in git is a real-looking credential"
    assert path.read_text().startswith("# EXAMPLE ONLY")


# --- compose -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_validates_against_the_compose_specification(compose):
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(compose)
    broken = copy.deepcopy(compose)
    broken["services"]["postgres"]["depends_on"] = {"gcs": {"condition": "service_ready"}}
    assert not validator.is_valid(broken)


def test_compose_runs_the_whole_pipeline(compose):
    assert set(compose["services"]) == {"postgres", "gcs", "mlflow", "serve", *AIRFLOW_SERVICES}
    commands = {name: service.get("command") for name, service in compose["services"].items()}
    init = commands["airflow-init"]
    assert init[:2] == ["bash", "-c"] and "airflow db migrate && " in init[2]
    pipeline = yaml.safe_load((REPO / "params.yaml").read_text())["pipeline"]
    assert f"airflow pools set {pipeline['gpu_pool']} {pipeline['gpu_pool_slots']} " in init[2]  # training tasks' pool
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert commands[f"airflow-{name}"] == [name]  # the image's entrypoint runs `airflow <command>`
    assert commands["gcs"] == [
        "gcp-storage-emulator", "start", "--host", "0.0.0.0", "--port", "9023", "--default-bucket", "cloudscreen"
    ]  # fmt: skip


def test_every_compose_service_has_an_image_a_healthcheck_and_existing_dependencies(compose):
    services = compose["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]) and not service["image"].endswith(":latest")
        if name != "airflow-init":  # one-shot
            assert service["healthcheck"]["test"], name
        for target, condition in service.get("depends_on", {}).items():
            assert target in services and target != name, (name, target)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target], (name, target)
            elif condition["condition"] == "service_completed_successfully":
                assert target == "airflow-init", (name, target)
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"] == {"condition": "service_completed_successfully"}
        assert depends["postgres"] == {"condition": "service_healthy"}
    assert set(services["airflow-scheduler"]["depends_on"]) >= {"mlflow", "gcs"}  # the LocalExecutor runs tasks here
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "gcs"}


def test_compose_airflow_environment_and_data_root(compose):
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
        assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:9023"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["CLOUDSCREEN_DATA_ROOT"] == "/opt/cloudscreen/data"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert "data:/opt/cloudscreen/data" in service["volumes"]


def test_compose_volumes_are_declared_and_ports_are_the_uis(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), (name, volume)
            else:
                assert source in declared, (name, volume)
    ports = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert ports["airflow-api-server"] == ["127.0.0.1:8080:8080"]
    assert ports["mlflow"] == ["127.0.0.1:5000:5000"]
    assert ports["serve"] == ["127.0.0.1:8000:8000"]


def test_compose_serves_the_champion_from_the_tracking_server(compose):
    serve = compose["services"]["serve"]
    assert serve["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert serve["command"] == ["--model", "models:/cloudscreen-classifier@champion"]
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert serve["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert "/health" in serve["healthcheck"]["test"][-1]


def test_compose_mlflow_uses_postgres_and_the_emulator_bucket(compose):
    env = compose["services"]["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "gs://cloudscreen/mlflow"
    assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:9023"
    assert env["MLFLOW_HOST"] == "0.0.0.0"
    # The Airflow containers call the server by its service name: MLflow must accept that Host header.
    assert "mlflow:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init_sql


# --- Dockerfiles ---------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _final_stage(path: Path) -> dict[str, list[str]]:
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in _stages(path)[-1]:
        by_keyword.setdefault(keyword, []).append(rest)
    return by_keyword


def test_the_dockerfiles_are_the_ones_the_stack_uses():
    assert {p.name for p in DOCKERFILES} == {
        "trainer.Dockerfile",
        "airflow.Dockerfile",
        "mlflow.Dockerfile",
        "gcs.Dockerfile",
        "serve.Dockerfile",
    }


def test_hadolint_passes_on_every_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_a_release_tag(path):
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            base = next(w for w in rest.split() if not w.startswith("--"))
            assert "$" not in base, f"{path.name}: FROM {base}: a variable hides the pin"
            name, _, tag = base.rpartition(":")
            assert name and re.fullmatch(r"\d[\w.-]*", tag), f"{path.name}: FROM {base} is not pinned to a release"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_final_stage_runs_as_a_numeric_non_root_user(path):
    users = _final_stage(path).get("USER", [])
    assert users, f"{path.name}: no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_credentials_are_copied_or_set(path):
    for keyword, rest in _instructions(path):
        if keyword in {"COPY", "ADD"}:
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            for source in args[:-1]:
                assert not CREDENTIAL_RE.search(source), f"{path.name}: {keyword} {source}"
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"GOOGLE_APPLICATION_CREDENTIALS|PASSWORD|TOKEN|SECRET|_KEY\b", rest), rest


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_are_installed_before_the_code_is_copied(path):
    final = _stages(path)[-1]
    installs = [i for i, (k, rest) in enumerate(final) if k == "RUN" and "pip install" in rest]
    code = [i for i, (k, rest) in enumerate(final) if k == "COPY" and re.search(r"\b(tasks|dags|mlflow)\b", rest)]
    assert installs, f"{path.name}: no dependency install in the final stage"
    assert all(i > max(installs) for i in code), f"{path.name}: code is copied before the dependencies are installed"


def test_the_trainer_is_the_gpu_tensorflow_image_with_the_lock_minus_tensorflow_cpu():
    path = DOCKER / "trainer.Dockerfile"
    final = _final_stage(path)
    assert final["FROM"] == [f"tensorflow/tensorflow:{_lock_version('tensorflow-cpu')}-gpu"]
    assert final["ENTRYPOINT"] == ['["python", "-m", "tasks.train"]']
    export = [rest for stage in _stages(path) for k, rest in stage if k == "RUN" and "uv export" in rest]
    assert export and all("--frozen" in e and "--no-emit-package tensorflow-cpu" in e for e in export)
    assert any("--require-hashes" in run for run in final["RUN"])
    assert any("--system-site-packages" in run for run in final["RUN"])  # the base image's tensorflow stays visible
    assert any("CLOUDSCREEN_GIT_COMMIT" in env for env in final["ENV"])  # the image has no .git


def test_the_airflow_image_matches_the_lock_and_carries_dags_and_tasks():
    final = _final_stage(DOCKER / "airflow.Dockerfile")
    assert final["FROM"] == [f"apache/airflow:{_lock_version('apache-airflow')}-python3.11"]
    copies = " ".join(final["COPY"])
    assert "dags /opt/airflow/dags" in copies and "tasks /opt/cloudscreen/tasks" in copies
    assert "ops /opt/cloudscreen/ops" in copies  # the DAGs import ops.alerts
    assert any("PYTHONPATH=/opt/cloudscreen" in env for env in final["ENV"])
    assert any("CLOUDSCREEN_DATA_ROOT=/opt/cloudscreen/data" in env for env in final["ENV"])


def test_the_mlflow_and_emulator_images_pin_the_lock_versions():
    mlflow_run = " ".join(_final_stage(DOCKER / "mlflow.Dockerfile")["RUN"])
    assert f"mlflow=={_lock_version('mlflow')}" in mlflow_run
    assert f"google-cloud-storage=={_lock_version('google-cloud-storage')}" in mlflow_run
    assert re.search(r"psycopg2-binary==\d", mlflow_run)
    assert _final_stage(DOCKER / "mlflow.Dockerfile")["CMD"] == ['["bash", "/opt/mlflow/server.sh"]']
    gcs_run = " ".join(_final_stage(DOCKER / "gcs.Dockerfile")["RUN"])
    assert f"gcp-storage-emulator=={_lock_version('gcp-storage-emulator')}" in gcs_run


def test_the_dockerignore_keeps_local_state_out_of_every_build():
    from ops.image import check_build_inputs, context_files

    for path in DOCKERFILES:
        relative = check_build_inputs(REPO, path)  # every COPY source is in the context
        sent = context_files(REPO, relative)
        for local in (".venv", ".local", ".git", "tests", "test-artifacts"):
            assert not any(p == local or p.startswith(local + "/") for p in sent), (path.name, local)


def test_the_spot_pod_is_the_trainer_pod_on_the_spot_pool_at_preemptible_prices(pod):
    """trainer-pod-spot.yaml is trainer-pod.yaml plus GKE's spot selector and toleration and the spot prices, as the
    backend renders it with `backends.kubernetes.spot: true`."""
    from tasks.lib.backends import BackendsParams, kubernetes_spec
    from tasks.lib.training_runs import CostParams

    (spot,) = _resources(K8S / "trainer-pod-spot.yaml")
    assert spot["spec"]["nodeSelector"] == pod["spec"]["nodeSelector"] | {"cloud.google.com/gke-spot": "true"}
    toleration = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    assert spot["spec"]["tolerations"] == [*pod["spec"]["tolerations"], toleration]
    (container,) = spot["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    cost = load_section("cost", CostParams)
    assert env["CLOUDSCREEN_MACHINE_TYPE"] == "n1-standard-8-preemptible" in cost.machine_usd_per_hour
    assert env["CLOUDSCREEN_ACCELERATOR"] == "nvidia-tesla-v100-preemptible" in cost.accelerator_usd_per_hour
    # everything else is the on-demand pod's
    unchanged = copy.deepcopy(spot)
    unchanged["metadata"]["name"] = pod["metadata"]["name"]
    unchanged["spec"]["nodeSelector"], unchanged["spec"]["tolerations"] = (
        pod["spec"]["nodeSelector"], pod["spec"]["tolerations"]
    )  # fmt: skip
    unchanged["spec"]["containers"][0]["env"] = pod["spec"]["containers"][0]["env"]
    assert unchanged == pod

    settings = load_section("backends", BackendsParams, overrides=["backends.kubernetes.spot=true"]).kubernetes
    rendered = kubernetes_spec([], settings)
    assert rendered["node_selector"] == spot["spec"]["nodeSelector"]
    assert [t.to_dict() for t in rendered["tolerations"]] == [
        {"key": t["key"], "operator": t["operator"], "value": t.get("value"), "effect": t["effect"],
         "toleration_seconds": None}
        for t in spot["spec"]["tolerations"]
    ]  # fmt: skip
    rendered_env = {e.name: e.value for e in rendered["env_vars"]}
    assert {k: rendered_env[k] for k in ("CLOUDSCREEN_MACHINE_TYPE", "CLOUDSCREEN_ACCELERATOR")} == {
        k: env[k] for k in ("CLOUDSCREEN_MACHINE_TYPE", "CLOUDSCREEN_ACCELERATOR")
    }


# --- the model server ----------------------------------------------------------------------------------------------


def _serve_objects() -> dict[str, dict]:
    return {kind: resource for name in ("deployment", "service", "hpa")
            for resource in _resources(K8S / f"serve-{name}.yaml") for kind in [resource["kind"]]}  # fmt: skip


def test_the_serve_image_pins_the_lock_and_runs_tasks_serve_on_every_address():
    final = _final_stage(DOCKER / "serve.Dockerfile")
    run = " ".join(final["RUN"])
    packages = (
        "mlflow",
        "tensorflow-cpu",
        "keras",
        "fastapi",
        "uvicorn",
        "python-multipart",
        "tifffile",
        "onnxruntime",
    )
    for package in (*packages, "onnx"):
        assert f"{package}=={_lock_version(package)}" in run, package
    assert "airflow" not in run
    assert final["ENTRYPOINT"] == ['["python", "-m", "tasks.serve", "--host", "0.0.0.0", "--port", "8000"]']
    assert final["EXPOSE"] == ["8000"]
    assert any("CLOUDSCREEN_GIT_COMMIT" in env for env in final["ENV"])


def test_the_serve_deployment_probes_health_and_ping_and_reads_the_model_from_the_environment():
    objects = _serve_objects()
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["metadata"]["namespace"] == "cloudscreen"
    assert container["image"].startswith("europe-west4-docker.pkg.dev/PROJECT_ID/cloudscreen/serve")
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/ping"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.cloudscreen.svc.cluster.local:5000"
    assert env["CLOUDSCREEN_MODEL"]["value"] == "models:/cloudscreen-classifier@champion"
    assert container["args"] == ["--model", "$(CLOUDSCREEN_MODEL)"]
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cloudscreen-mlflow"
    assert all("value" not in e for e in container["env"] if "TOKEN" in e["name"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    user = _final_stage(DOCKER / "serve.Dockerfile")["USER"][-1]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert user.split(":")[0] == str(pod["spec"]["securityContext"]["runAsUser"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_serve_service_and_autoscaler_point_at_the_deployment():
    objects = _serve_objects()
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"cloudscreen"}
