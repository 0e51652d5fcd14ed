"""Where the training step runs: one trainer entrypoint (`python -m tasks.train`), three ways to start it; and the
screening step's GPU pod, which runs the same image.

- `local`: a subprocess of the Airflow worker, on the worker's files (the embedded default, CI).
- `docker`: the trainer image on one GPU machine through the Docker engine API (the seed project's workflow).
- `kubernetes`: the trainer image in a pod on a GPU node pool (production); the DAG's KubernetesPodOperator takes its
  container resources, tolerations, secrets and environment from `kubernetes_spec`.

The image runs away from the worker's files, so the two image backends restore the snapshot's data version from the
DVC remote into the container first (`tasks.train --restore-data`); every backend returns the trainer's result,
`{"run_id", "model_version"}`, the JSON the trainer writes with `--xcom-out` (for a pod, /airflow/xcom/return.json,
which the operator's sidecar reads).

The screening DAG starts `python -m tasks.screen` from the same image in the same kind of pod (`kubernetes_spec` with
`module=SCREENER_MODULE`, `screening_arguments`): it restores the snapshot's data version the same way, writes the
screening to the object store (`screen.store`) and its result, tasks.lib.xcoms.Screened, to the XCom file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.lib import xcoms
from tasks.lib.config import StepParams, default_params
from tasks.lib.errors import TrainingBackendError

log = logging.getLogger(__name__)

POD_XCOM_FILE = "/airflow/xcom/return.json"  # where the KubernetesPodOperator's sidecar reads the result
DOCKER_XCOM_FILE = "/tmp/cloudscreen/return.json"  # read back from the stopped container
TRAINER_MODULE = "tasks.train"  # the image's ENTRYPOINT
SEARCH_MODULE = "tasks.search"
SCREENER_MODULE = "tasks.screen"
POD_APPS = {TRAINER_MODULE: "cloudscreen-trainer", SCREENER_MODULE: "cloudscreen-screener"}  # the pods' `app` label


class SecretEnv(BaseModel):
    """An environment variable of the trainer taken from a Kubernetes Secret (never from the image or params)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    env: str
    secret: str
    key: str


class Toleration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = None


class KubernetesParams(StepParams):
    namespace: str
    image: str
    service_account: str  # bound to a Google service account by Workload Identity: no key files anywhere
    gpus: int = Field(ge=0)
    spot: bool  # the GKE spot (preemptible) GPU pool: its node selector and taint, and the preemptible prices
    node_selector: dict[str, str]
    tolerations: tuple[Toleration, ...]
    requests: dict[str, str]
    limits: dict[str, str]
    env: dict[str, str]
    secrets: tuple[SecretEnv, ...]
    data_dir: str  # the emptyDir the data version is restored into
    run_as_user: int = Field(ge=1)  # the trainer image's non-root user
    startup_timeout_seconds: int = Field(ge=1)
    poll_interval_seconds: float = Field(gt=0)


class DockerParams(StepParams):
    image: str
    base_url: str | None = None  # None: DOCKER_HOST, else the local socket
    gpus: int = Field(ge=-1)  # -1: every GPU of the machine; 0: CPU only
    env: dict[str, str]
    data_dir: str


class BackendsParams(StepParams):
    # gs:// base of the image backends' checkpoints (`<base>/<dag_id>/<dag_run_id>`): a trainer killed with its
    # machine resumes from its last epoch wherever it starts again; null = no checkpoint (a restart trains afresh)
    checkpoints: str | None = Field(pattern=r"^gs://[^/]+/")
    kubernetes: KubernetesParams
    docker: DockerParams


class ScreeningPlacement(StepParams):
    """Where the screening DAG screens and a pod keeps its screening: the `screen` section's keys that say where, not
    what, is computed (tasks.screen.ScreenParams adds those and leaves these out of its fingerprint). Read alone, the
    other keys of the section are ignored, so a DAG file can read it without importing the step."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    backend: Literal["local", "kubernetes"]  # local: on the Airflow worker (or its Dask cluster) · kubernetes: GPU pods
    store: str | None = Field(pattern=r"^gs://[^/]+/")  # pods' screenings: <store>/<snapshot>/<version>/
    device: Literal["auto", "cpu", "gpu"]  # what scores (tasks.lib.inference); the kubernetes backend's pods ask: gpu


SPOT_LABEL = "cloud.google.com/gke-spot"  # GKE labels and taints spot nodes with it ("true")
PREEMPTIBLE = "-preemptible"  # the cost table's suffix for the spot price of a machine type or an accelerator
PRICED_ENV = ("CLOUDSCREEN_MACHINE_TYPE", "CLOUDSCREEN_ACCELERATOR")


@dataclass(frozen=True)
class TrainingRequest:
    """What to train on and how: the same for every backend."""

    snapshot: str
    data_version: str
    dataset: str
    manifest: Path  # on the worker's data root (local backend)
    tiles: Path
    overrides: tuple[str, ...] = ()
    checkpoint_dir: Path | None = None  # local backend: a retried task resumes from here
    checkpoint_url: str | None = None  # image backends: gs://... the trainer resumes from wherever it starts
    dag_id: str | None = None
    dag_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingRequest:
        values = dict(data)
        for key in ("manifest", "tiles", "checkpoint_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        values["overrides"] = tuple(values.get("overrides") or ())
        return cls(**values)

    def lineage_env(self) -> dict[str, str]:
        """The lineage tags' sources (tasks.lib.tracking.Lineage): identical for a subprocess, a container and a pod."""
        env = {"CLOUDSCREEN_SNAPSHOT": self.snapshot, "CLOUDSCREEN_DATA_VERSION": self.data_version}
        if self.dag_id:
            env["CLOUDSCREEN_DAG_ID"] = self.dag_id
        if self.dag_run_id:
            env["CLOUDSCREEN_DAG_RUN_ID"] = self.dag_run_id
        return env

    def _overrides(self) -> list[str]:
        return [arg for item in self.overrides for arg in ("--set", item)]

    def local_arguments(self, xcom_out: Path) -> list[str]:
        args = ["--manifest", str(self.manifest), "--tiles", str(self.tiles), "--xcom-out", str(xcom_out)]
        args += ["--snapshot", self.snapshot, "--data-version", self.data_version]
        if self.checkpoint_dir is not None:
            args += ["--checkpoint-dir", str(self.checkpoint_dir)]
        return args + self._overrides()

    def search_arguments(self, xcom_out: Path) -> list[str]:
        """tasks.search's: the same data, lineage and overrides as the training it prepares."""
        args = ["--manifest", str(self.manifest), "--tiles", str(self.tiles), "--xcom-out", str(xcom_out)]
        return [*args, "--snapshot", self.snapshot, "--data-version", self.data_version, *self._overrides()]

    def remote_arguments(self, data_dir: str, xcom_out: str) -> list[str]:
        """The trainer image's arguments: restore the data version into `data_dir`, then train on it."""
        return [
            "--snapshot", self.snapshot,
            "--data-version", self.data_version,
            "--restore-data", data_dir,
            "--manifest", f"samples/{self.dataset}/manifest.parquet",
            "--tiles", "tiles",
            "--xcom-out", xcom_out,
            *(["--checkpoint-url", self.checkpoint_url] if self.checkpoint_url else []),
            *self._overrides(),
        ]  # fmt: skip


def screening_arguments(
    *, snapshot: str, data_version: str, model: str, out: str, data_dir: str, xcom_out: str
) -> list[str]:
    """The screening pod's arguments (`python -m tasks.screen` in the trainer image): restore the snapshot's data
    version into `data_dir`, screen its tiles with the pinned `model` into `out` (gs://…/<snapshot>), write the result
    to `xcom_out`."""
    return [
        "--snapshot", snapshot,
        "--data-version", data_version,
        "--restore-data", data_dir,
        "--tiles", "tiles",
        "--model", model,
        "--out", out,
        "--xcom-out", xcom_out,
        "--set", "screen.device=gpu",  # the pod is on the GPU pool: fail there rather than screen on its CPU
    ]  # fmt: skip


# --- local ----------------------------------------------------------------------------------------------------------


def run_local(request: TrainingRequest, *, params_path: Path | None = None, tail: int = 40) -> xcoms.Trained:
    """Run the trainer as a subprocess of this process, its log streamed into ours; return its result."""
    return _run_module(TRAINER_MODULE, request.local_arguments, request, params_path, tail)


def run_search_local(request: TrainingRequest, *, params_path: Path | None = None, tail: int = 40) -> xcoms.Searched:
    """Run tasks.search on the request's data as a subprocess of this process, its log streamed into ours; return
    its result (the parent run and the best trial's params)."""
    return _run_module(SEARCH_MODULE, request.search_arguments, request, params_path, tail)


def _run_module(
    module: str, arguments: Any, request: TrainingRequest, params_path: Path | None, tail: int
) -> dict[str, Any]:
    """`python -m module --params ... *arguments(xcom_out)` with the request's lineage in its environment; the JSON
    it wrote to xcom_out. A failure raises TrainingBackendError with the end of its log."""
    with tempfile.TemporaryDirectory(prefix="cloudscreen-train-") as scratch:
        xcom_out = Path(scratch) / "return.json"
        params = str(params_path or default_params())
        command = [sys.executable, "-m", module, "--params", params, *arguments(xcom_out)]
        env = {**os.environ, **request.lineage_env(), "PYTHONUNBUFFERED": "1"}
        log.info("running locally: %s", " ".join(command))
        name = module.rpartition(".")[2]
        last_lines: deque[str] = deque(maxlen=tail)
        with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stderr is not None
            for line in proc.stderr:
                line = line.rstrip()
                last_lines.append(line)
                log.info("%s: %s", name, line)
        if proc.returncode != 0:
            raise TrainingBackendError(
                f"{module} exited with code {proc.returncode}; its last lines:\n" + "\n".join(last_lines)
            )
        return _result(xcom_out.read_text(), where=str(xcom_out))


def _result(text: str, where: str) -> dict[str, Any]:
    try:
        result = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingBackendError(f"{where}: the trainer's result is not JSON: {exc}") from exc
    if not isinstance(result, dict) or not result.get("run_id"):
        raise TrainingBackendError(f"{where}: the trainer's result has no run_id: {text[:200]!r}")
    return result


# --- docker ---------------------------------------------------------------------------------------------------------


def docker_spec(request: TrainingRequest, params: DockerParams) -> dict[str, Any]:
    """The container the docker backend starts: keyword arguments of docker's `containers.run`."""
    from docker.types import DeviceRequest

    spec: dict[str, Any] = {
        "image": params.image,
        "command": request.remote_arguments(params.data_dir, DOCKER_XCOM_FILE),
        "environment": {**params.env, **request.lineage_env(), "CLOUDSCREEN_IMAGE": params.image},
        "detach": True,
        "labels": {"app": "cloudscreen-trainer", "cloudscreen.snapshot": request.snapshot},
    }
    if request.dag_run_id:
        spec["labels"]["cloudscreen.dag_run_id"] = request.dag_run_id
    if params.gpus:
        spec["device_requests"] = [DeviceRequest(count=params.gpus, capabilities=[["gpu"]])]
    return spec


def run_docker(request: TrainingRequest, params: DockerParams) -> xcoms.Trained:
    """Run the trainer image through the Docker engine, follow its log, return its result; the container is removed."""
    from tasks.lib.docker_engine import docker_client

    client = docker_client(params.base_url)
    spec = docker_spec(request, params)
    log.info("training in a container of %s: %s", params.image, " ".join(spec["command"]))
    container = client.containers.run(**spec)
    try:
        for chunk in container.logs(stream=True, follow=True):
            log.info("trainer: %s", chunk.decode(errors="replace").rstrip())
        status = container.wait()
        if status.get("StatusCode") != 0:
            raise TrainingBackendError(f"the trainer container {container.short_id} exited with {status}")
        stream, _ = container.get_archive(DOCKER_XCOM_FILE)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.extractfile(Path(DOCKER_XCOM_FILE).name)
            if member is None:
                raise TrainingBackendError(f"{DOCKER_XCOM_FILE}: missing in container {container.short_id}")
            return _result(member.read().decode(), where=f"{container.short_id}:{DOCKER_XCOM_FILE}")
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


# --- kubernetes -----------------------------------------------------------------------------------------------------


def kubernetes_spec(
    request_args: list[str] | Any,
    params: KubernetesParams,
    env: dict[str, str] | None = None,
    module: str = TRAINER_MODULE,
) -> dict[str, Any]:
    """KubernetesPodOperator keyword arguments for a pod of the trainer image (the DAG adds task id, pool, timeouts,
    docs): the trainer (the image's entrypoint), or with `module=SCREENER_MODULE` the screening.

    The GPU is an extended resource and so goes in limits; the node selector and tolerations put the pod on the GPU
    node pool; the service account carries the cloud identity (Workload Identity), secrets come from Kubernetes
    Secrets, and the data version is restored into an emptyDir. `request_args` may be an Airflow XComArg and `env`
    values Airflow templates (the DAG run's ids for the lineage tags): the operator resolves both when the task runs.
    None leaves the arguments out, for a mapped operator's `.partial()` (they come with `.expand(arguments=...)`).
    """
    from kubernetes.client import models as k8s

    limits = dict(params.limits)
    if params.gpus:
        limits["nvidia.com/gpu"] = str(params.gpus)
    volume = k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource())
    plain_env = {**params.env, **(env or {}), "CLOUDSCREEN_IMAGE": params.image}
    node_selector, tolerations = dict(params.node_selector), list(params.tolerations)
    if params.spot:
        node_selector[SPOT_LABEL] = "true"
        tolerations.append(Toleration(key=SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule"))
        plain_env |= spot_prices(plain_env)
    spec: dict[str, Any] = {
        "namespace": params.namespace,
        "image": params.image,
        "service_account_name": params.service_account,
        "container_resources": k8s.V1ResourceRequirements(requests=dict(params.requests), limits=limits),
        "node_selector": node_selector,
        "tolerations": [
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in tolerations
        ],
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in plain_env.items()]
        + [
            k8s.V1EnvVar(
                name=s.env,
                value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=s.secret, key=s.key)),
            )
            for s in params.secrets
        ],
        "volumes": [volume],
        "volume_mounts": [k8s.V1VolumeMount(name="data", mount_path=params.data_dir)],
        # Pod-wide, so that the operator's XCom sidecar (alpine, root by default) runs as the trainer's user too.
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=params.run_as_user,
            run_as_group=params.run_as_user,
            fs_group=params.run_as_user,
        ),
        "startup_timeout_seconds": params.startup_timeout_seconds,
        "poll_interval": params.poll_interval_seconds,
        "labels": {"app": POD_APPS[module]},
        "do_xcom_push": True,
        "deferrable": True,
        "on_finish_action": "delete_pod",
        "get_logs": True,
    }
    if module != TRAINER_MODULE:
        spec["cmds"] = ["python", "-m", module]
    if request_args is not None:
        spec["arguments"] = request_args
    return spec


def spot_prices(env: dict[str, str]) -> dict[str, str]:
    """The pod's machine type and accelerator as the cost table prices them on spot nodes (`<name>-preemptible`), so
    that cost_usd and a dollar budget count the spot price."""
    return {
        var: value if value == "none" or value.endswith(PREEMPTIBLE) else value + PREEMPTIBLE
        for var, value in env.items()
        if var in PRICED_ENV
    }
