"""tasks.serve for real: the server started as a subprocess against a SQLite tracking store holding two registered
versions of a small untrained CNN (logged by the project's own logging function), asked over HTTP. Answers equal the
in-process scorer for JSON, .npy and GeoTIFF uploads; every kind of bad input gets its 4xx and the server keeps
answering; a version without a threshold is refused at start; `champion` moves under load with no failed request."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from tasks.lib import bigearthnet as ben
from tasks.lib.tiles import PATCH_SHAPE, RGB_CHANNELS
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "cloudscreen-serve-test"
THRESHOLDS = {"1": 0.5, "2": 0.25}  # version 3 (version 1's model again) has none
MAX_BODY_MB = 8
STARTUP_SECONDS = 240  # imports and the first model load; minutes on a busy two-core machine
JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy"}


@dataclass(frozen=True)
class Server:
    url: str
    log: Path
    refused: subprocess.Popen[str]  # the same command on a version without a threshold, started beside it

    def post(self, body: bytes | str, headers: dict[str, str], **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/invocations", data=body, headers=headers, timeout=60, **kwargs)

    def json(self, patches: np.ndarray, **extra) -> requests.Response:
        return self.post(json.dumps({"inputs": patches.tolist(), **extra}), JSON)

    def npy(self, patches: np.ndarray, params: dict[str, str] | None = None) -> requests.Response:
        return self.post(_npy(patches), NPY, params=params)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_versions(root: Path) -> None:
    """Two untrained tiny CNNs (seeds 1 and 2) logged as tasks.train logs its network and registered as versions 1
    and 2 with their thresholds; version 3 is version 1's model registered again, without a threshold."""
    import keras
    import mlflow

    from tasks.lib import serving
    from tasks.lib.config import load_section
    from tasks.lib.model import ModelParams, build_model
    from tasks.lib.tracking import CHAMPION, TAG_OPERATING_THRESHOLD
    from tasks.lib.training_runs import log_pyfunc_model

    params = load_section(
        "model", ModelParams, overrides=["model.conv_layers=[{filters: 4, kernel: 5, pool: 4}]", "model.dense_units=8"]
    )
    mean = [ben.BAND_MEAN[band] for band in RGB_CHANNELS]
    variance = [ben.BAND_STD[band] ** 2 for band in RGB_CHANNELS]
    client = mlflow.MlflowClient()
    experiment = mlflow.create_experiment("serve-tests", artifact_location=(root / "artifacts").as_uri())
    for version, seed in (("1", 1), ("2", 2)):
        keras.utils.set_random_seed(seed)
        model = build_model(params, mean, variance)
        with mlflow.start_run(experiment_id=experiment), tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "classifier.keras"
            model.save(saved)
            info = log_pyfunc_model(
                serving.RawPatchClassifier(),
                artifacts={serving.KERAS_ARTIFACT: str(saved)},
                input_example=np.zeros((1, *PATCH_SHAPE), np.uint16),
                pip_requirements=["mlflow"],  # skips requirement inference; nothing is installed from it here
                registered_model_name=NAME,
            )
        assert str(info.registered_model_version) == version
        client.set_model_version_tag(NAME, version, TAG_OPERATING_THRESHOLD, repr(THRESHOLDS[version]))
        if version == "1":
            first = info.model_uri
    mlflow.register_model(first, NAME)  # version 3: no threshold
    client.set_registered_model_alias(NAME, CHAMPION, "1")


def _start(port: int, model: str, log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tasks.serve", "--model", model, "--port", str(port), "--refresh-seconds", "1"]
    command += ["--set", f"serve.max_body_mb={MAX_BODY_MB}", "--set", "serve.access_log=false"]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        _log_versions(root)
        yield root


@pytest.fixture(scope="module")
def launched(registry) -> Iterator[tuple[subprocess.Popen[str], str, subprocess.Popen[str]]]:
    """The server on a free loopback port, following `champion` every second, and beside it the same command on a
    version without a threshold; started first, so that they load while this process loads its own scorers."""
    port = _free_port()
    proc = _start(port, f"models:/{NAME}@champion", registry / "serve.log")
    refused = _start(_free_port(), f"models:/{NAME}/3", registry / "refused.log")
    try:
        yield proc, f"http://127.0.0.1:{port}", refused
    finally:
        for p in (proc, refused):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def scorers(launched) -> dict[str, object]:
    """The in-process scorers of versions 1 and 2, as tasks.lib.scoring gives them."""
    from tasks.lib.scoring import load_scorer, resolve_version

    return {v: load_scorer(resolve_version(f"models:/{NAME}/{v}")) for v in THRESHOLDS}


@pytest.fixture(scope="module")
def server(registry, launched, scorers) -> Server:
    """The server once healthy; /ping answers while it loads, /health says 503 until then."""
    proc, url, refused = launched
    log = registry / "serve.log"
    seen = set()
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        assert proc.poll() is None, f"the server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not healthy in {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}"
        try:
            status = requests.get(f"{url}/health", timeout=5).status_code
        except requests.ConnectionError:
            time.sleep(0.5)
            continue
        seen.add(status)
        if status == 200:
            break
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
        time.sleep(0.2)
    assert seen <= {503, 200}, seen
    return Server(url, log, refused)


@pytest.fixture(scope="module")
def real_patches(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The B04, B03 and B02 files of the 6 real BigEarthNet patches bigearthnet-common ships: patch → band → bytes."""
    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(ben.example_archive()) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            for band in RGB_CHANNELS:
                if member.isfile() and name.endswith(f"_{band}.tif"):
                    files.setdefault(Path(member.name).parent.name, {})[band] = tar.extractfile(member).read()
    assert len(files) == 6 and all(len(bands) == 3 for bands in files.values())
    return files


def _stack(bands: dict[str, bytes]) -> np.ndarray:
    import tifffile

    return np.stack([tifffile.imread(io.BytesIO(bands[band])) for band in RGB_CHANNELS], axis=-1)


@pytest.fixture(scope="module")
def patches(real_patches) -> np.ndarray:
    """The 6 real patches (their R, G, B bands), plus 2 synthetic ones reaching the top of the uint16 range."""
    real = np.stack([_stack(bands) for bands in real_patches.values()])
    rng = np.random.default_rng(3)
    synthetic = rng.integers(0, 65536, size=(2, *PATCH_SHAPE), dtype=np.uint16)
    return np.concatenate([real, synthetic]).astype(np.uint16)


def _check_answer(response: requests.Response, patches: np.ndarray, scorers) -> str:
    assert response.status_code == 200, response.text
    answer = response.json()
    version = answer["model"]["version"]
    assert answer["model"] == {"name": NAME, "version": version, "threshold": THRESHOLDS[version]}
    assert response.headers["X-Model-Version"] == version
    expected = scorers[version](patches)
    got = np.array([p["cloud_probability"] for p in answer["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert [p["is_cloud"] for p in answer["predictions"]] == [bool(p >= THRESHOLDS[version]) for p in got]
    return version


# --- the protocol ------------------------------------------------------------------------------------------------


def test_ping_health_and_version(server):
    ping = requests.get(f"{server.url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.content == b""
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    from tasks.lib.scoring import resolve_version

    version = requests.get(f"{server.url}/version", timeout=10).json()
    assert version == resolve_version(version["asked"]).to_json()
    assert version["asked"] == f"models:/{NAME}@champion" and version["name"] == NAME


def test_json_answers_equal_the_in_process_model(server, patches, scorers):
    _check_answer(server.json(patches), patches, scorers)
    _check_answer(server.json(patches[:1]), patches[:1], scorers)
    # Other keys (here the declared bands) take the general JSON parser: the same answer.
    _check_answer(server.json(patches, bands=list(RGB_CHANNELS)), patches, scorers)
    body = json.dumps({"instances": patches[:2].tolist()}, indent=1)  # MLflow's other tensor key, pretty-printed
    _check_answer(server.post(body, JSON), patches[:2], scorers)


def test_npy_answers_equal_the_in_process_model(server, patches, scorers):
    _check_answer(server.npy(patches), patches, scorers)
    _check_answer(server.npy(patches, params={"bands": ",".join(RGB_CHANNELS)}), patches, scorers)
    _check_answer(server.post(_npy(patches[2:3]), {"Content-Type": "application/octet-stream"}), patches[2:3], scorers)


def test_a_patch_folders_geotiffs_answer_as_the_in_process_model(server, real_patches, scorers):
    for patch_id, bands in real_patches.items():
        files = {band: (ben.band_file(patch_id, band), data, "image/tiff") for band, data in bands.items()}
        response = requests.post(f"{server.url}/invocations", files=files, timeout=60)
        _check_answer(response, _stack(bands)[None], scorers)
    # Field names need not be bands when the file names are BigEarthNet's.
    patch_id, bands = next(iter(real_patches.items()))
    files = [("files", (ben.band_file(patch_id, band), data)) for band, data in bands.items()]
    _check_answer(requests.post(f"{server.url}/invocations", files=files, timeout=60), _stack(bands)[None], scorers)


# --- bad input: a 4xx naming the fault, and the server keeps answering ----------------------------------------------


def _tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def _bad_requests(patches: np.ndarray, real: dict[str, bytes]) -> dict[str, tuple[dict, int, str]]:
    """name → (requests.post keyword arguments, expected status, a phrase the error must hold)."""
    two = patches[:2]
    big = MAX_BODY_MB * 1024 * 1024 + 1
    nan = two.astype(np.float32)
    nan[0, 0, 0, 0] = np.nan
    patch = "S2A_MSIL2A_20170613T101031_0_48"  # the name the files are uploaded under
    upload = {band: (ben.band_file(patch, band), data) for band, data in real.items()}
    negative = two.astype(np.int32)

    def files(band: str, data: bytes) -> dict:
        return {"files": upload | {band: (ben.band_file(patch, band), data)}}

    negative[1, 5, 5, 2] = -1

    def js(value: object, **kw) -> dict:
        return {"data": json.dumps(value) if not isinstance(value, (bytes, str)) else value, "headers": JSON} | kw

    def npy(array: np.ndarray, **kw) -> dict:
        return {"data": _npy(array), "headers": NPY} | kw

    return {
        "wrong shape": (js({"inputs": patches[:1, :64, :64].tolist()}), 422, "shape (1, 64, 64, 3)"),
        "one patch without the batch axis": (js({"inputs": patches[0].tolist()}), 422, "wrap it in a list"),
        "channels first": (npy(two.transpose(0, 3, 1, 2).copy()), 422, "channels first"),
        "wrong dtype (.npy)": (npy(two.astype(np.float32)), 422, "dtype float32"),
        "wrong dtype (JSON floats)": (js({"inputs": (two / 10000).tolist()}), 422, "non-integer"),
        "negative values": (js({"inputs": negative.tolist()}), 422, "values from -1"),
        "values over uint16": (js({"inputs": (two.astype(np.int32) + 65535).tolist()}), 422, "65535"),
        "strings": (js({"inputs": [["a"]]}), 422, "strings"),
        "band count": (npy(np.zeros((1, 120, 120, 4), np.uint16)), 422, "4 bands"),
        "band order (JSON)": (js({"inputs": two.tolist(), "bands": ["B02", "B03", "B04"]}), 422, "band order"),
        "band order (.npy)": (npy(two, params={"bands": "B02,B03,B04"}), 422, "band order"),
        "NaN (JSON)": (js('{"inputs": [[[[1, 2, NaN]]]]}'), 422, "NaN"),
        "NaN (.npy)": (npy(nan), 422, "NaN"),
        "empty batch (JSON)": (js({"inputs": []}), 422, "empty batch"),
        "empty batch (.npy)": (npy(np.zeros((0, *PATCH_SHAPE), np.uint16)), 422, "empty batch"),
        "ragged": (js({"inputs": [[1, 2], [3]]}), 422, "rectangular"),
        "no inputs key": (js({"dataframe_split": {"data": [[1]]}}), 422, '"inputs"'),
        "malformed JSON": (js('{"inputs": [[1, 2'), 400, "malformed JSON"),
        "not a .npy file": ({"data": b"\x00" * 100, "headers": NPY}, 400, "not a .npy"),
        "a pickled .npy": (npy(np.array([{"a": 1}], dtype=object)), 400, "unreadable .npy"),
        "body over the limit": ({"data": b"0" * big, "headers": JSON}, 413, "over the limit"),
        "body over the limit, chunked": (
            {"data": iter([b"0" * (1024 * 1024)] * (MAX_BODY_MB + 1)), "headers": NPY}, 413, "over the limit"
        ),
        "unsupported content type": ({"data": b"inputs=1", "headers": {"Content-Type": "text/csv"}}, 415, "text/csv"),
        "corrupt TIFF": (files("B03", real["B03"][:300]), 400, "band B03: corrupt"),
        "not a TIFF": (files("B02", b"hello"), 400, "band B02: corrupt"),
        "a band of the wrong size": (files("B04", _tiff(np.zeros((60, 60), np.uint16))), 422, "60×60"),
        "a band of the wrong dtype": (files("B04", _tiff(np.zeros((120, 120), np.float32))), 422, "dtype float32"),
        "a missing band": ({"files": {k: v for k, v in upload.items() if k != "B02"}}, 422, "missing ['B02']"),
        "an extra band": (files("B08", real["B02"]), 422, "not used: ['B08']"),
        "an unnamed file": ({"files": upload | {"file": ("photo.png", b"png")}}, 422, "cannot tell which band"),
    }  # fmt: skip


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_answering(server, patches, real_patches, scorers):
    cases = _bad_requests(patches, next(iter(real_patches.values())))
    wrong = {}
    for name, (kwargs, status, phrase) in cases.items():
        response = requests.post(f"{server.url}/invocations", timeout=60, **kwargs)
        error = response.json().get("error", "") if response.headers.get("content-type") == "application/json" else ""
        if response.status_code != status or phrase not in error:
            wrong[name] = (response.status_code, response.text[:300])
        assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200, f"the server stopped after {name}"
    assert not wrong, "\n".join(f"{name}: {status} {text}" for name, (status, text) in wrong.items())
    _check_answer(server.json(patches[:2]), patches[:2], scorers)  # and still scores


# --- the registry -------------------------------------------------------------------------------------------------


def test_a_version_without_a_threshold_is_refused_at_start(server, registry):
    proc = server.refused
    proc.wait(timeout=120)
    log = (registry / "refused.log").read_text()
    assert proc.returncode == 2, log
    assert "has no operating threshold" in log and f"version 3 of '{NAME}'" in log
    assert "Traceback" not in log


def test_champion_moves_under_load_without_a_failed_request(server, patches, scorers):
    """Four clients keep asking while `champion` moves from version 1 to 2: every request succeeds, each answer
    is the named version's (probabilities and decisions), and every client switches to version 2 for good."""
    import mlflow

    from tasks.lib.tracking import CHAMPION

    batch = patches[:4]
    body = json.dumps({"inputs": batch.tolist()})
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []
    mismatched: list[str] = []

    def client(versions: list[str]) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(f"{server.url}/invocations", data=body, headers=JSON, timeout=60)
                    versions.append(_check_answer(response, batch, scorers))
                except AssertionError as exc:
                    mismatched.append(str(exc)[:300])
                except requests.RequestException as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(versions,)) for versions in seen]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while min(len(v) for v in seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        mlflow.MlflowClient().set_registered_model_alias(NAME, CHAMPION, "2")
        deadline = time.monotonic() + 120
        while not all(v and v[-1] == "2" for v in seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # a few more answers after the swap
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    assert not failures and not mismatched, (failures[:3], mismatched[:3])
    for versions in seen:
        assert versions[0] == "1" and versions[-1] == "2", versions
        first_two = versions.index("2")
        assert set(versions[first_two:]) == {"2"}, versions  # never back to the old version
    assert requests.get(f"{server.url}/version", timeout=10).json()["version"] == "2"
