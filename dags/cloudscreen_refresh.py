"""cloudscreen_refresh: one snapshot of training data per interval — download → validate → tile (or ingest, the
archive streamed through the same checks into the same tiles) → sample → version.

Wiring only: each task calls one function of tasks.lib.pipeline, which calls the step's module in tasks/.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from ops import alerts
from tasks.lib import pipeline, xcoms
from tasks.lib.errors import fail_fast

SETTINGS = pipeline.load_pipeline_params()
TRAINING_DATA = Asset(**pipeline.TRAINING_DATA_ASSET)
IO = pipeline.task_defaults(SETTINGS, io=True, timeout="io")
# A permanent error (bad data, bad params, a rejected archive) fails the task at once; transient ones are retried.
PERMANENT_FAILS = fail_fast(AirflowFailException)
# The first task of each ingest path (what choose_ingest follows), and the task leaving the extract path's tiles.
INGEST_TASKS = {"extract": "download", "stream": "ingest", "extract_tiles": "tile"}


def _run() -> pipeline.Run:
    context = get_current_context()
    dag_run = context["dag_run"]
    return pipeline.run_for(
        run_type=getattr(dag_run.run_type, "value", dag_run.run_type),
        logical_date=dag_run.logical_date,
        run_id=dag_run.run_id,
        overrides=context["params"]["overrides"],
        snapshot=context["params"]["snapshot"],
    )


@dag(
    dag_id="cloudscreen_refresh",
    schedule=SETTINGS.refresh_schedule,
    start_date=pipeline.start_datetime(SETTINGS),
    catchup=False,  # past intervals are backfilled on purpose (UI, REST API, `airflow backfill create`)
    max_active_runs=SETTINGS.max_active_runs,
    default_args={
        **pipeline.task_defaults(SETTINGS, io=False, timeout="io"),
        "on_failure_callback": alerts.on_failure(),
    },
    tags=["cloudscreen", "data"],
    params={
        "snapshot": Param(
            None,
            type=["null", "string"],
            description="Name the snapshot (e.g. 2026-q4-reprocess); empty: the logical date, or the run id of a "
            "manual run.",
        ),
        "source": Param(
            SETTINGS.source,
            type="string",
            description="A download.sources name (embedded, production) or an archive URL; {snapshot} in a URL "
            "becomes this run's snapshot key.",
        ),
        "ingest": Param(
            SETTINGS.ingest,
            enum=list(pipeline.INGEST_PATHS),
            description="extract: download and unpack the archive, then validate and tile the extracted patches "
            "(kept for inspection) · stream: read the archive once straight into the same validated/ and tiles/, "
            "no extracted tree (the full 66 GB archive).",
        ),
        "checksum_url": Param(
            SETTINGS.checksum_url,
            type=["null", "string"],
            description="The archive's .sha256/.md5 file, for a URL source ({snapshot} allowed).",
        ),
        "overrides": Param(
            [],
            type="array",
            items={"type": "string"},
            description="params.yaml overrides for this run, SECTION.KEY=VALUE, e.g. sample.small_per_class=600.",
        ),
    },
    doc_md=__doc__
    + """
Each run works on its own **snapshot**: the logical date (YYYY-MM-DD) for scheduled and backfilled runs, the run id
for manual ones. Every step writes under `<data root>/<step>/<snapshot>/` (data root: params.yaml `pipeline.data_root`
or `$CLOUDSCREEN_DATA_ROOT`), so backfills of many intervals never touch each other's files, and re-running an
interval skips the steps whose output is already complete.

The last task pushes the snapshot's tiles and samples to the DVC remote, writes `<data root>/snapshots/<snapshot>.json`
(the data version training is pinned to) and updates the `cloudscreen_training_data` Asset, which schedules
`cloudscreen_training`.
""",
)
def cloudscreen_refresh():
    @task.branch
    def choose_ingest() -> str:
        """Follow the form's ingest path: extract (download → validate → tile) or stream (ingest)."""
        return INGEST_TASKS[get_current_context()["params"]["ingest"]]

    @task(**IO)
    @PERMANENT_FAILS
    def download() -> xcoms.Fetched:
        """Download the snapshot's archive (checksum verified, resumable) and extract it safely.

        Output: `<data root>/raw/<snapshot>/` (archive, extracted patches, download manifest).
        """
        params = get_current_context()["params"]
        return pipeline.download_step(_run(), source=params["source"], checksum_url=params["checksum_url"])

    @task(**IO)
    @PERMANENT_FAILS
    def validate(fetched: xcoms.Fetched) -> xcoms.Validated:
        """Check every patch (bands, sizes, nodata, saturation, metadata) and the dataset with Great Expectations;
        bad patches are quarantined with their reasons. Fails past `validate.max_bad_fraction`.

        Output: `<data root>/validated/<snapshot>/report.json` and the Data Docs beside it.
        """
        return pipeline.validate_step(_run(), patches=fetched["patches"])

    @task(**pipeline.task_defaults(SETTINGS, io=False, timeout="tile"))
    @PERMANENT_FAILS
    def tile(fetched: xcoms.Fetched, validated: xcoms.Validated) -> xcoms.Tiled:
        """Tile the valid patches into memory-mapped band shards with per-band statistics (Dask).

        Output: `<data root>/tiles/<snapshot>/` (metadata.parquet, shards, index, stats).
        """
        return pipeline.tile_step(_run(), patches=fetched["patches"], report=validated["report"])

    @task(**pipeline.task_defaults(SETTINGS, io=True, timeout="tile"))
    @PERMANENT_FAILS
    def ingest() -> xcoms.Ingested:
        """Stream the snapshot's archive once (checksum verified as it streams) through validate's checks into
        tile's shards: the same outputs as download → validate → tile, with no extracted tree. Fails past
        `validate.max_bad_fraction` with the report and Data Docs written.

        Output: `<data root>/ingested/<snapshot>/` (validated/: report.json and Data Docs; tiles/; ingest.json).
        """
        params = get_current_context()["params"]
        return pipeline.ingest_step(_run(), source=params["source"], checksum_url=params["checksum_url"])

    @task(trigger_rule="none_failed_min_one_success")
    @PERMANENT_FAILS
    def tiles() -> xcoms.Tiled:
        """The snapshot's tiles, from whichever path ran."""
        ti = get_current_context()["ti"]
        return pipeline.tiles_result(
            extracted=ti.xcom_pull(task_ids=INGEST_TASKS["extract_tiles"]),
            streamed=ti.xcom_pull(task_ids=INGEST_TASKS["stream"]),
        )

    @task
    @PERMANENT_FAILS
    def sample(tiled: xcoms.Tiled) -> xcoms.Sampled:
        """Draw the balanced small and large sets (train/val/test) and the natural-prevalence evaluation set.

        Output: `<data root>/samples/<snapshot>/<set>/manifest.parquet` and natural.parquet.
        """
        return pipeline.sample_step(_run(), tiles=tiled["tiles"])

    @task(outlets=[TRAINING_DATA], **IO)
    @PERMANENT_FAILS
    def version(tiled: xcoms.Tiled, sampled: xcoms.Sampled) -> xcoms.SnapshotRecord:
        """Push tiles and samples to the DVC remote; record the snapshot's data version; update the Asset.

        Output: `<data root>/versions/<snapshot>/` (version.json, data.dvc), `<data root>/snapshots/<snapshot>.json`
        and an event on the `cloudscreen_training_data` Asset carrying the snapshot and its data version.
        """
        context = get_current_context()
        dag_run = context["dag_run"]
        as_of = context.get("data_interval_end") or dag_run.run_after
        record = pipeline.version_step(_run(), tiles=tiled["tiles"], samples=sampled, as_of=as_of)
        context["outlet_events"][TRAINING_DATA].extra = {
            key: record[key] for key in ("snapshot", "data_version", "as_of")
        }
        return record

    fetched = download()
    extracted = tile(fetched, validate(fetched))
    streamed = ingest()
    choose_ingest() >> [fetched, streamed]
    tiled = tiles()
    [extracted, streamed] >> tiled
    version(tiled, sample(tiled))


cloudscreen_refresh()
