"""Serving benchmark: tasks.serve over loopback HTTP beside the same predictions made in process, in one run.

    python -m bench.serve [--rounds 3] [--calls 40] [--batches 3] [--clients 4] [--model URI]

(a) one patch: latency of `--calls` requests of one patch, p50 and p99, as JSON and as .npy, beside the in-process
    scorer (tasks.lib.scoring.load_scorer, the function the server calls) on the same patch. Target: HTTP p50 <= 1.5x
    the in-process p50 (HTTP, decoding and the answer add little to inference).
(b) batch 64: throughput (patches/s) of `--batches` requests of 64 patches per client, by 1 client and by `--clients`
    concurrent clients, as .npy and as JSON, beside the in-process scorer on the same batches one after another.
    Target: >= 0.8x the in-process throughput.
Clients send bodies encoded once beforehand (a real client encodes on its own machine) over keep-alive connections
of the standard library's http.client, the leanest honest client, each opened and used once just before its loop
(the server closes connections idle for 5 s); one-patch latency through `requests` is printed beside, not held to
the target: its own Python adds ~0.7 ms a call, the client's cost, not the server's. The server runs in its own
process with its default settings. The measurements alternate in `--rounds` rounds (in process, then each HTTP
variant), after a warm-up of each, so a busy spell of a shared machine hits every side; the ratio is taken per round
and its median reported.

Model: by default the network of params.yaml's `model` section, untrained (inference costs the same), logged with the
project's own logging function to a throwaway SQLite registry and served as `models:/...@champion`; `--model` serves
a registered version of the tracking server in MLFLOW_TRACKING_URI instead.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests

from tasks.lib import bigearthnet as ben
from tasks.lib.tiles import PATCH_SHAPE, RGB_CHANNELS

REPO = Path(__file__).resolve().parent.parent
NAME = "cloudscreen-bench-serve"
BATCH = 64


def _register(root: Path) -> str:
    """params.yaml's network, untrained, registered with a threshold as the gate leaves a champion; its URI."""
    import keras
    import mlflow

    from tasks.lib import serving
    from tasks.lib.config import load_section
    from tasks.lib.model import ModelParams, build_model
    from tasks.lib.tracking import CHAMPION, TAG_OPERATING_THRESHOLD
    from tasks.lib.training_runs import log_pyfunc_model

    keras.utils.set_random_seed(7)
    model = build_model(
        load_section("model", ModelParams),
        [ben.BAND_MEAN[band] for band in RGB_CHANNELS],
        [ben.BAND_STD[band] ** 2 for band in RGB_CHANNELS],
    )
    experiment = mlflow.create_experiment("bench-serve", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        saved = root / "classifier.keras"
        model.save(saved)
        info = log_pyfunc_model(
            serving.RawPatchClassifier(),
            artifacts={serving.KERAS_ARTIFACT: str(saved)},
            input_example=np.zeros((1, *PATCH_SHAPE), np.uint16),
            pip_requirements=["mlflow"],
            registered_model_name=NAME,
        )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(NAME, version, TAG_OPERATING_THRESHOLD, "0.5")
    client.set_registered_model_alias(NAME, CHAMPION, version)
    return f"models:/{NAME}@{CHAMPION}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "tasks.serve", "--model", model, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server was not healthy in 600 s: {log.read_text()[-2000:]}")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _bodies(patches: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    return {
        "JSON": (json.dumps({"inputs": patches.tolist()}).encode(), {"Content-Type": "application/json"}),
        ".npy": (_npy(patches), {"Content-Type": "application/x-npy"}),
    }


class _Client:
    """One keep-alive HTTP/1.1 connection (http.client, TCP_NODELAY), reading each answer in full."""

    def __init__(self, url: str, warm: tuple[bytes, dict[str, str]]) -> None:
        where = urlsplit(url)
        self.connection = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
        self.post(*warm)  # connection set-up is not what is measured

    def post(self, body: bytes, headers: dict[str, str]) -> None:
        self.connection.request("POST", "/invocations", body=body, headers=headers)
        response = self.connection.getresponse()
        content = response.read()
        if response.status != 200:
            raise SystemExit(f"the server answered {response.status}: {content[:300]!r}")

    def close(self) -> None:
        self.connection.close()


class _Requests:
    """The same through a `requests` session, as most Python clients would send it."""

    def __init__(self, url: str, warm: tuple[bytes, dict[str, str]]) -> None:
        self.url, self.session = url, requests.Session()
        self.post(*warm)

    def post(self, body: bytes, headers: dict[str, str]) -> None:
        response = self.session.post(f"{self.url}/invocations", data=body, headers=headers, timeout=300)
        if response.status_code != 200:
            raise SystemExit(f"the server answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self.session.close()


def _latencies(call: Callable[[], object], calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def _throughput(url: str, body: bytes, headers: dict[str, str], clients: int, batches: int) -> float:
    """Patches/s of `clients` threads each posting `batches` batches of BATCH patches."""
    connections = [_Client(url, (body, headers)) for _ in range(clients)]

    def client(connection: _Client) -> None:
        for _ in range(batches):
            connection.post(body, headers)

    threads = [threading.Thread(target=client, args=(c,)) for c in connections]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return clients * batches * BATCH / seconds


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def run(*, rounds: int, calls: int, batches: int, clients: int, model: str | None) -> None:
    from tasks.lib.scoring import load_scorer, resolve_version

    with tempfile.TemporaryDirectory(prefix="cloudscreen-bench-serve-") as tmp:
        root = Path(tmp)
        if model is None:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            model = _register(root)
        proc, url = _start_server(model, root / "serve.log")
        try:
            version = resolve_version(model)
            scorer = load_scorer(version)
            rng = np.random.default_rng(0)
            one = rng.integers(0, 5000, size=(1, *PATCH_SHAPE), dtype=np.uint16)
            batch = rng.integers(0, 5000, size=(BATCH, *PATCH_SHAPE), dtype=np.uint16)
            one_bodies, batch_bodies = _bodies(one), _bodies(batch)
            client = _Client(url, one_bodies["JSON"])
            for _ in range(3):  # warm-up: both shapes
                scorer(one), scorer(batch)
                for body, headers in [*one_bodies.values(), *batch_bodies.values()]:
                    client.post(body, headers)
            client.close()

            kinds = [*one_bodies, *(f"{kind} (requests)" for kind in one_bodies)]
            lat: dict[str, list[float]] = {"in process": [], **{kind: [] for kind in kinds}}
            lat_ratio: dict[str, list[float]] = {kind: [] for kind in kinds}
            rate: dict[str, list[float]] = {"in process": []}
            rate_ratio: dict[str, list[float]] = {}
            for _ in range(rounds):
                base = _latencies(lambda: scorer(one), calls)
                lat["in process"] += base
                for kind, (body, headers) in one_bodies.items():
                    for name, kind_of_client in ((kind, _Client), (f"{kind} (requests)", _Requests)):
                        client = kind_of_client(url, (body, headers))
                        got = _latencies(lambda client=client, body=body, headers=headers: client.post(body, headers),
                                         calls)  # fmt: skip
                        client.close()
                        lat[name] += got
                        lat_ratio[name].append(statistics.median(got) / statistics.median(base))
                start = time.perf_counter()
                for _ in range(batches):
                    scorer(batch)
                base_rate = batches * BATCH / (time.perf_counter() - start)
                rate["in process"].append(base_rate)
                for n in sorted({1, clients}):
                    for kind, (body, headers) in batch_bodies.items():
                        name = f"{kind}, {n} client{'s' if n > 1 else ''}"
                        got_rate = _throughput(url, body, headers, n, batches)
                        rate.setdefault(name, []).append(got_rate)
                        rate_ratio.setdefault(name, []).append(got_rate / base_rate)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"serve benchmark: {version.uri}, {rounds} rounds; one patch: {calls} calls per round; "
          f"batch {BATCH}: {batches} batches per client per round")  # fmt: skip
    print(f"  (a) one patch              {'p50 ms':>8} {'p99 ms':>8}   p50 over in-process (median of rounds)")
    for kind, values in lat.items():
        ratio = f"{statistics.median(lat_ratio[kind]):.2f}x" if kind in lat_ratio else ""
        print(f"      {kind:<22} {_p(values, 50):8.1f} {_p(values, 99):8.1f}   {ratio}")
    print(f"  (b) batch {BATCH}                {'patches/s':>9}   over in-process (median of rounds)")
    for name, values in rate.items():
        ratio = f"{statistics.median(rate_ratio[name]):.2f}x" if name in rate_ratio else ""
        print(f"      {name:<22} {statistics.median(values):9.1f}   {ratio}")
    print("  targets")
    for kind in one_bodies:
        ratio = statistics.median(lat_ratio[kind])
        print(f"      one patch p50, {kind:<20} {ratio:.2f}x <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'}")
    for name in rate_ratio:
        ratio = statistics.median(rate_ratio[name])
        print(f"      batch {BATCH} throughput, {name:<16} {ratio:.2f}x >= 0.8x: {'met' if ratio >= 0.8 else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=40, help="one-patch requests per kind per round")
    p.add_argument("--batches", type=int, default=3, help="batches of 64 per client per round")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients of the throughput measurement")
    p.add_argument("--model", help="a registered version in MLFLOW_TRACKING_URI (default: a throwaway registry)")
    args = p.parse_args()
    run(rounds=args.rounds, calls=args.calls, batches=args.batches, clients=args.clients, model=args.model)


if __name__ == "__main__":
    main()
