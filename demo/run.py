"""`make demo`: the ingest stages on the embedded default data, end to end, on this machine.

Builds the BigEarthNet-format mirror described by params.yaml (`mirror`), serves it over HTTP on a random loopback
port the way the official archive is served, downloads it with tasks.download (checksum from the served .sha256),
validates it with tasks.validate, tiles it with tasks.tile on a Dask LocalCluster, draws the small and large sets
with tasks.sample, pushes the snapshot's data version to the DVC remote in the local GCS emulator's bucket
(persisted under .local/gcs), then starts the real MLflow tracking server (SQLite store .local/mlflow.db, artifacts
proxied to the emulator bucket), trains the CNN and the SGD baseline on the small set, evaluates both, runs the
promotion gate, and prints where everything went. Re-running is cheap: every stage skips work that is already
complete (the trainer finds its finished run in its checkpoint directory; the gate returns its recorded verdict).
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import threading
import time
from pathlib import Path

from tasks import tracking
from tasks.baseline import BaselineParams, baseline
from tasks.cli import configure_logging
from tasks.config import load_section
from tasks.download import DownloadParams, download, resolve_request
from tasks.evaluate import EvaluateParams, evaluate
from tasks.gate import GateParams, gate
from tasks.mirror import MirrorParams, build_mirror
from tasks.model import ModelParams
from tasks.sample import DATASETS, SampleParams, sample
from tasks.storage import local_gcs_emulator
from tasks.tile import TileParams, tile
from tasks.tracking_server import mlflow_server
from tasks.train import CostParams, TrainParams, train
from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate
from tasks.versioning import VersioningParams, push

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".local" / "data"
SNAPSHOT = "demo"
# A real run uses the params.yaml defaults (the whole train split, batch 128, up to 30 epochs: several minutes on 2
# CPU cores). The demo trains the same network on 400 patches per class for 4 epochs, in batches of 32 so that its
# ~100 steps settle the batch-norm statistics.
DEMO_TRAINING = ["train.max_train_patches=400", "train.epochs=4", "train.batch_size=32"]

log = logging.getLogger("demo")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        log.debug("http: " + format, *args)


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    configure_logging(verbose=False)
    started = time.monotonic()
    mirror = build_mirror(out=DATA / "mirror", params=load_section("mirror", MirrorParams))
    server, base = _serve(mirror.archive.parent)
    try:
        params = load_section("download", DownloadParams)
        url, checksum = resolve_request(
            url=f"{base}/{mirror.archive.name}",
            source=None,
            checksum_url=f"{base}/{mirror.archive.name}.sha256",
            params=params,
        )
        fetched = download(url=url, dest=DATA / "raw" / SNAPSHOT, checksum=checksum, params=params)
    finally:
        server.shutdown()
    validated = validate(
        patches=fetched.root, out=DATA / "validated" / SNAPSHOT, params=load_section("validate", ValidateParams)
    )
    report = validated.report
    if not validated.success:
        raise SystemExit(f"validation failed: see {validated.report_path} and its Data Docs")
    tiles = tile(
        patches=fetched.root,
        out=DATA / "tiles" / SNAPSHOT,
        params=load_section("tile", TileParams),
        report=validated.report_path,
    )
    sample_params = load_section("sample", SampleParams)
    sets = {name: sample(tiles=tiles.out, out=DATA / "samples" / SNAPSHOT, dataset=name, params=sample_params)
            for name in DATASETS}  # fmt: skip
    versioning = load_section("versioning", VersioningParams)
    with local_gcs_emulator(
        versioning.remote.removeprefix("gs://").split("/")[0], data_dir=REPO / ".local" / "gcs"
    ) as emulator:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator
        pushed = push(snapshot=SNAPSHOT, tiles=tiles.out, samples=DATA / "samples" / SNAPSHOT,
                      out=DATA / "versions" / SNAPSHOT, params=versioning)  # fmt: skip
        modelled = _train_and_gate(
            emulator, manifest=sets["small"].manifest_path, tiles=tiles.out, data_version=pushed.data.version
        )
        del os.environ["STORAGE_EMULATOR_HOST"]
    set_lines = "\n".join(
        f"  {name:<11} {s.summary['patches']} patches ({_splits(s.summary['counts'])}); natural set "
        f"{s.summary['natural']['patches']} at prevalence {s.summary['natural']['prevalence']:.4f}\n"
        f"              {s.manifest_path}"
        for name, s in sets.items()
    )
    print(
        f"""
cloudscreen demo — snapshot {SNAPSHOT!r}, {time.monotonic() - started:.0f} s
  mirror      {mirror.archive}
              {len(mirror.patch_ids)} patches ({len(mirror.cloud_patch_ids)} in the official cloud-and-shadow list)
  served at   {url}
  downloaded  {fetched.root}{"  (already there)" if fetched.skipped else ""}
  validated   {report["checked"]} checked, {report["valid"]} valid, {len(report["quarantined"])} quarantined; \
suite {"passed" if report["suite_success"] else "FAILED"}
  report      {validated.report_path}
  Data Docs   file://{validated.report_path.parent / DATA_DOCS_INDEX}
  tiles       {tiles.out}  ({tiles.patches} patches in {tiles.shards} shards, R G B)
{set_lines}
  data version {pushed.data.version}  (in {pushed.remote}, local GCS emulator under .local/gcs)
              restore: python -m tasks.versioning restore --version {pushed.data.version} --dest DIR
              (with STORAGE_EMULATOR_HOST pointing at an emulator serving .local/gcs)
{modelled}
  look        make tracking  → MLflow UI at http://127.0.0.1:5000 (runs, plots, registry)
"""
    )


def _train_and_gate(emulator: str, *, manifest: Path, tiles: Path, data_version: str) -> str:
    """Train, baseline, evaluate and gate through a real tracking server; return the summary lines."""
    store = REPO / ".local" / "mlflow.db"
    lineage = tracking.Lineage.from_environment(snapshot=SNAPSHOT, data_version=data_version)
    with mlflow_server(
        backend_uri=f"sqlite:///{store}",
        artifacts_destination="gs://cloudscreen/mlflow",
        env={"STORAGE_EMULATOR_HOST": emulator},
    ) as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        train_params = load_section("train", TrainParams, overrides=DEMO_TRAINING)
        cost = load_section("cost", CostParams)
        trained = train(
            manifest=manifest,
            tiles=tiles,
            params=train_params,
            model_params=load_section("model", ModelParams, overrides=DEMO_TRAINING),
            cost=cost,
            lineage=lineage,
            checkpoint_dir=DATA / "checkpoints" / SNAPSHOT / "cnn",
        )
        floor = baseline(
            manifest=manifest,
            tiles=tiles,
            params=load_section("baseline", BaselineParams),
            train_params=train_params,
            cost=cost,
            lineage=lineage,
        )
        evaluate_params = load_section("evaluate", EvaluateParams)
        scores = {
            name: evaluate(
                model_uri=tracking.run_model_uri(run_id),
                manifest=manifest,
                tiles=tiles,
                params=evaluate_params,
                log_to_run=run_id,
            ).metrics
            for name, run_id in (("cnn", trained.run_id), ("baseline", floor.run_id))
        }
        verdict = gate(
            run_id=trained.run_id,
            params=load_section("gate", GateParams),
            registered_model=train_params.registered_model,
        )
        del os.environ["MLFLOW_TRACKING_URI"]
    lines = [
        f"  trained     CNN run {trained.run_id}, {trained.epochs} epochs"
        f"{'  (already there)' if trained.reused else ''}; "
        f"{train_params.registered_model} version {trained.model_version}, alias challenger",
        f"  baseline    SGD run {floor.run_id}",
    ]
    for name, metrics in scores.items():
        lines.append(
            f"  {name:<11} test: recall {metrics['test_op_recall']:.3f} at precision {metrics['test_op_precision']:.3f}"
            f" (threshold {metrics['operating_threshold']:.3f}), ROC-AUC {metrics['test_roc_auc']:.3f}; "
            f"natural set: precision {metrics['natural_op_precision']:.3f}"
        )
    lines.append(f"  gate        {verdict.decision}: " + " ".join(verdict.reasons))
    lines.append(f"  tracking    {store} (artifacts in gs://cloudscreen/mlflow, local GCS emulator under .local/gcs)")
    return "\n".join(lines)


def _splits(counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{split} {sum(by_class.values())}" for split, by_class in counts.items())


if __name__ == "__main__":
    main()
