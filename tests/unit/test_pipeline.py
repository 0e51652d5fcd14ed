"""tasks.lib.pipeline: snapshot keys, where a run's files go, which snapshot a training run is pinned to."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.lib.config import apply_overrides, read_params_file
from tasks.lib.errors import ConfigError
from tasks.lib.pipeline import (
    PipelineError,
    PipelineParams,
    Run,
    download_step,
    screening_pods,
    snapshot_key,
    task_defaults,
    training_data,
    training_overrides,
)

REPO = Path(__file__).resolve().parents[2]
UTC = dt.UTC


def write_params(path: Path, *overrides: str) -> Path:
    path.write_text(yaml.safe_dump(apply_overrides(read_params_file(REPO / "params.yaml"), list(overrides))))
    return path


@pytest.fixture
def run_in(tmp_path):
    """A Run on a data root of its own (the params file says where)."""

    def make(snapshot: str = "2026-11-16", *overrides: str) -> Run:
        params = write_params(tmp_path / "params.yaml", f"pipeline.data_root={tmp_path / 'data'}", *overrides)
        return Run(snapshot=snapshot, params_path=params)

    return make


# --- snapshot keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_type", ["scheduled", "backfill"])
def test_scheduled_and_backfill_runs_are_keyed_by_logical_date(run_type):
    logical = dt.datetime(2026, 11, 16, tzinfo=UTC)
    assert snapshot_key(run_type=run_type, logical_date=logical, run_id="backfill__x") == "2026-11-16"


def test_a_schedule_finer_than_a_day_keeps_the_time():
    logical = dt.datetime(2026, 11, 16, 6, 30, tzinfo=UTC)
    assert snapshot_key(run_type="scheduled", logical_date=logical, run_id="x") == "2026-11-16T06-30-00"


@pytest.mark.parametrize(
    ("run_type", "run_id", "expected"),
    [
        ("manual", "manual__2026-11-23T22:15:23.071676+00:00", "manual__2026-11-23T22:15:23.071676+00:00"),
        ("asset_triggered", "asset_triggered__2026-11-23T22:15:23+00:00", "asset_triggered__2026-11-23T22:15:23+00:00"),
        ("manual", "my run/with spaces", "my-run-with-spaces"),  # never a path separator
    ],
)
def test_manual_and_asset_triggered_runs_are_keyed_by_run_id(run_type, run_id, expected):
    logical = dt.datetime(2026, 11, 16, tzinfo=UTC)  # a manual run may have one; it is not its partition
    assert snapshot_key(run_type=run_type, logical_date=logical, run_id=run_id) == expected


def test_a_run_id_with_nothing_usable_is_an_error():
    with pytest.raises(PipelineError, match="no usable snapshot name"):
        snapshot_key(run_type="manual", logical_date=None, run_id="///")


# --- data root, overrides, task settings ----------------------------------------------------------------------------


def test_data_root_is_relative_to_the_params_file_and_the_environment_wins(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml", "pipeline.data_root=somewhere")
    monkeypatch.delenv("CLOUDSCREEN_DATA_ROOT", raising=False)
    run = Run(snapshot="s", params_path=params)
    assert run.data_root == tmp_path / "somewhere"
    assert run.dir("tiles") == tmp_path / "somewhere" / "tiles" / "s"
    assert run.record_path == tmp_path / "somewhere" / "snapshots" / "s.json"
    monkeypatch.setenv("CLOUDSCREEN_DATA_ROOT", str(tmp_path / "shared"))
    assert Run(snapshot="s", params_path=params).data_root == tmp_path / "shared"


def test_overrides_reach_every_section(run_in):
    from tasks.sample import SampleParams

    run = run_in("s")
    run = Run(snapshot="s", params_path=run.params_path, overrides=("sample.small_per_class=7",))
    assert run.load("sample", SampleParams).small_per_class == 7


def test_training_form_fields_become_overrides():
    assert training_overrides(epochs=3, learning_rate=0.001, extra=["train.batch_size=64"]) == (
        "train.epochs=3",
        "train.learning_rate=0.001",
        "train.batch_size=64",
    )
    assert training_overrides() == ()
    assert training_overrides(budget_minutes=4, budget_usd=0.5) == ("train.budget_minutes=4.0", "train.budget_usd=0.5")
    with pytest.raises(ConfigError, match=r"SECTION\.KEY=VALUE"):
        training_overrides(extra=["epochs=3"])


def test_io_tasks_retry_with_backoff_compute_tasks_once():
    params = PipelineParams.model_validate(read_params_file(REPO / "params.yaml")["pipeline"])
    io = task_defaults(params, io=True, timeout="io")
    assert io["retries"] == params.retries
    assert io["retry_exponential_backoff"] == params.retry_exponential_backoff
    assert io["max_retry_delay"] == dt.timedelta(seconds=params.max_retry_delay_seconds)
    compute = task_defaults(params, io=False, timeout="tile")
    assert compute["retries"] == 1
    assert compute["execution_timeout"] == dt.timedelta(minutes=params.timeout_minutes["tile"])


# --- which snapshot training uses ----------------------------------------------------------------------------------


def record(run: Run, snapshot: str, as_of: str, version: str) -> dict:
    """A refreshed snapshot as the version step leaves it (its files present)."""
    tiles = run.data_root / "tiles" / snapshot
    manifest = run.data_root / "samples" / snapshot / "small" / "manifest.parquet"
    tiles.mkdir(parents=True)
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"")
    data = {
        "snapshot": snapshot,
        "as_of": as_of,
        "data_version": version,
        "tiles": str(tiles),
        "manifests": {"small": str(manifest)},
    }
    path = run.data_root / "snapshots" / f"{snapshot}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def test_training_takes_the_newest_snapshot_by_its_interval_not_by_when_it_finished(run_in):
    run = run_in("manual__1")
    # A backfill of an old interval finishing last must not become "the newest data".
    record(run, "2026-11-16", "2026-11-16T00:00:00+00:00", "b" * 32 + ".dir")
    record(run, "2026-11-02", "2026-11-02T00:00:00+00:00", "a" * 32 + ".dir")
    picked = training_data(run, dataset="small")
    assert picked["snapshot"] == "2026-11-16"
    assert picked["data_version"] == "b" * 32 + ".dir"
    assert picked["manifest"].endswith("samples/2026-11-16/small/manifest.parquet")


def test_the_form_and_the_triggering_event_choose_the_snapshot(run_in):
    run = run_in("manual__1")
    record(run, "2026-11-02", "2026-11-02T00:00:00+00:00", "a" * 32 + ".dir")
    record(run, "2026-11-16", "2026-11-16T00:00:00+00:00", "b" * 32 + ".dir")
    assert training_data(run, snapshot="2026-11-02", dataset="small")["snapshot"] == "2026-11-02"
    events = [{"snapshot": "2026-11-02", "as_of": "2026-11-02T00:00:00+00:00"}]
    assert training_data(run, events=events, dataset="small")["snapshot"] == "2026-11-02"


def test_unknown_snapshot_missing_set_and_no_data_are_clear_errors(run_in):
    run = run_in("manual__1")
    with pytest.raises(PipelineError, match="run the cloudscreen_refresh DAG first"):
        training_data(run, dataset="small")
    record(run, "2026-11-16", "2026-11-16T00:00:00+00:00", "b" * 32 + ".dir")
    with pytest.raises(PipelineError, match=r"2026-11-09.*refreshed snapshots: 2026-11-16"):
        training_data(run, snapshot="2026-11-09", dataset="small")
    with pytest.raises(PipelineError, match="no 'large' set"):
        training_data(run, dataset="large")


def test_each_screening_pod_restores_its_snapshots_data_version_and_writes_to_the_store(run_in):
    run = run_in("manual__1", "screen.store=gs://bucket/screened/")
    record(run, "2026-11-02", "2026-11-02T00:00:00+00:00", "a" * 32 + ".dir")
    record(run, "2026-11-16", "2026-11-16T00:00:00+00:00", "b" * 32 + ".dir")
    plan = {"model": "models:/m/3", "snapshots": ["2026-11-16", "2026-11-02"]}
    pods = [dict(zip(args[::2], args[1::2], strict=True)) for args in screening_pods(run, plan=plan)]
    assert [(p["--snapshot"], p["--data-version"], p["--out"]) for p in pods] == [
        ("2026-11-16", "b" * 32 + ".dir", "gs://bucket/screened/2026-11-16"),
        ("2026-11-02", "a" * 32 + ".dir", "gs://bucket/screened/2026-11-02"),
    ]
    assert all(p["--model"] == "models:/m/3" and p["--restore-data"] == "/data" for p in pods)
    with pytest.raises(PipelineError, match="2026-11-09"):
        screening_pods(run, plan={**plan, "snapshots": ["2026-11-09"]})
    no_store = Run(snapshot="s", params_path=write_params(run.params_path, f"pipeline.data_root={run.data_root}",
                                                          "screen.store=null"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"screen\.store is null"):
        screening_pods(no_store, plan=plan)


# --- download: one archive per interval ----------------------------------------------------------------------------


def test_download_substitutes_the_snapshot_into_the_source_url(small_mirror, run_in, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "mirror-2026-11-16.tar.gz"
    shutil.copy(small_mirror.archive, archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (served / "mirror-2026-11-16.tar.gz.sha256").write_text(f"{digest}  {archive.name}\n")
    run = run_in(
        "2026-11-16",
        f"pipeline.source=file://{served}/mirror-{{snapshot}}.tar.gz",
        f"pipeline.checksum_url=file://{served}/mirror-{{snapshot}}.tar.gz.sha256",
    )
    fetched = download_step(run)
    assert fetched["url"].endswith("mirror-2026-11-16.tar.gz")
    assert Path(fetched["patches"]).is_relative_to(run.data_root / "raw" / "2026-11-16")
    assert fetched["skipped"] is False
    assert download_step(run)["skipped"] is True  # a re-run of the interval does nothing


def test_a_snapshot_named_in_the_form_replaces_the_runs_key(tmp_path, monkeypatch):
    from tasks.lib.pipeline import run_for

    monkeypatch.setenv("CLOUDSCREEN_PARAMS", str(write_params(tmp_path / "params.yaml")))
    logical = dt.datetime(2026, 11, 16, tzinfo=UTC)
    assert run_for(run_type="manual", logical_date=logical, run_id="manual__x", snapshot="demo").snapshot == "demo"
    assert run_for(run_type="backfill", logical_date=logical, run_id="backfill__x").snapshot == "2026-11-16"
    for bad in ("../etc", "a/b", "-x"):
        with pytest.raises(PipelineError, match="letters, digits"):
            run_for(run_type="manual", logical_date=None, run_id="manual__x", snapshot=bad)


def test_a_forced_promotion_needs_a_reason_before_anything_trains():
    from tasks.lib.pipeline import check_training_form

    check_training_form(force_promote=True, reason="the champion was trained on corrupt data")
    check_training_form(force_promote=False, reason=None)
    with pytest.raises(ConfigError, match="needs a reason"):
        check_training_form(force_promote=True, reason="  ")
    with pytest.raises(ConfigError, match="only for a forced promotion"):
        check_training_form(force_promote=False, reason="why not")
