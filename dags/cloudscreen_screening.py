"""cloudscreen_screening: screen and monitor snapshots with the champion, on every new snapshot and champion.

Wiring only: each task calls one function of tasks.lib.pipeline (or, on Kubernetes, runs the screening entrypoint of
the trainer image in a GPU pod).
"""

from __future__ import annotations

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from ops import alerts
from tasks.lib import backends, pipeline, xcoms
from tasks.lib.config import load_section
from tasks.lib.errors import fail_fast
from tasks.lib.scoring import DEFAULT_MODEL

SETTINGS = pipeline.load_pipeline_params()
PLACEMENT = load_section("screen", backends.ScreeningPlacement)
KUBERNETES = load_section("backends", backends.BackendsParams).kubernetes
SCREEN_TASKS = {"local": "screen", "kubernetes": "screen_kubernetes"}
# What the branch follows: the local screens, or the pods' arguments (the pods follow them).
FIRST_TASKS = {"local": SCREEN_TASKS["local"], "kubernetes": "screening_pods"}
TRAINING_DATA = Asset(**pipeline.TRAINING_DATA_ASSET)
CHAMPION = Asset(**pipeline.CHAMPION_ASSET)
DRIFT = Asset(**pipeline.DRIFT_ASSET)
SCREEN = pipeline.task_defaults(SETTINGS, io=False, timeout="evaluate")
PERMANENT_FAILS = fail_fast(AirflowFailException)
SCREEN_DOC = """Score every patch of one snapshot with the pinned version (`python -m tasks.screen`; on the Dask cluster
when DASK_SCHEDULER_ADDRESS is set) into `<data root>/screened/<snapshot>/<version>/`. Output: counts, cloud fraction,
agreement with the official cloud list, throughput and the MLflow run."""
SCREEN_POD_DOC = """`python -m tasks.screen` of the trainer image in a pod on the GPU node pool, one per snapshot
(`backends.kubernetes`: `nvidia.com/gpu` in limits, node selector, tolerations, Workload Identity service account,
secrets from Kubernetes Secrets); deferrable; the pod is deleted when it finishes. It restores the snapshot's data
version into an emptyDir, screens it with the pinned version into `screen.store`/<snapshot>/<version>/ (summary.json
last) and writes its result to /airflow/xcom/return.json. Output: as the local screen's, `out` in the object store."""
MONITOR_DOC = """Compare the snapshot with the data the version was trained on (`tasks.monitor`: band features of a
sample, the scores, season, country and the labelled cloud share, by Evidently; the version's recall and precision on
the labelled patches against its test figures) into `<data root>/monitored/<snapshot>/<version>/`. Output: the decision
(ok, drift, decay), its reasons and the MLflow run."""


def _run() -> pipeline.Run:
    context = get_current_context()
    dag_run = context["dag_run"]
    return pipeline.run_for(
        run_type=getattr(dag_run.run_type, "value", dag_run.run_type),
        logical_date=dag_run.logical_date,
        run_id=dag_run.run_id,
    )


@dag(
    dag_id="cloudscreen_screening",
    # A new snapshot (the refresh's Asset) or a new champion (the gate's or a rollback's), whichever comes.
    schedule=(TRAINING_DATA | CHAMPION),
    start_date=pipeline.start_datetime(SETTINGS),
    catchup=False,
    max_active_runs=SETTINGS.max_active_runs,
    default_args={
        **pipeline.task_defaults(SETTINGS, io=False, timeout="evaluate"),
        "on_failure_callback": alerts.on_failure(),
    },
    tags=["cloudscreen", "model"],
    params={
        "snapshot": Param(
            None,
            type=["null", "string"],
            description="Screen this refreshed snapshot (e.g. 2026-11-16); empty: the one that triggered the run, "
            "else the newest.",
        ),
        "every_snapshot": Param(
            False,
            type="boolean",
            description="Screen every refreshed snapshot (a backfill); those the version already screened are skipped.",
        ),
        "model": Param(
            DEFAULT_MODEL,
            type="string",
            description="The registered version to screen with: models:/NAME@ALIAS or models:/NAME/VERSION. It "
            "must carry an operating threshold (the gate sets it when it promotes).",
        ),
        "backend": Param(
            PLACEMENT.backend,
            enum=list(SCREEN_TASKS),
            description="local: on the Airflow worker (on its Dask cluster when DASK_SCHEDULER_ADDRESS is set) · "
            "kubernetes: one pod per snapshot on the GPU node pool, writing to screen.store.",
        ),
    },
    doc_md=__doc__
    + """
Every patch of a snapshot is scored by the model at the operating threshold its registry version records, and
`<data root>/screened/<snapshot>/<version>/` receives `scores.parquet`, the cloud-free list `clear.parquet`, the
agreement with BigEarthNet's official cloud-and-shadow list and `summary.json`; each screening is an MLflow run in
the `cloudscreen-screening` experiment. A snapshot already screened by the version is not screened again; a new
champion writes its own directory beside the earlier ones. Each screened snapshot is then monitored against the data
the version was trained on (input drift, prediction drift, context, decay); a `drift` or `decay` verdict emits the
`cloudscreen_drift` Asset, which `cloudscreen_training` follows when `pipeline.retrain_on` is `drift`. The form names
a snapshot (or every snapshot, a backfill), a version and the backend: `local` screens on the Airflow worker,
`kubernetes` in a GPU pod per snapshot (the trainer image, `backends.kubernetes`), which writes to the object store
(`screen.store`/<snapshot>/<version>/); `screening_result` then fetches each pod's screening into the data root.
""",
)
def cloudscreen_screening():
    @task
    @PERMANENT_FAILS
    def plan() -> xcoms.ScreeningPlan:
        """Pin the model version (and its operating threshold) and choose the snapshots: the form's, every one, the
        ones whose refresh triggered the run, else the newest. A new snapshot before the first champion skips the
        run. Output: the version, threshold and snapshots."""
        context = get_current_context()
        events = pipeline.event_extras(context.get("triggering_asset_events"))
        params = context["params"]
        if events and not pipeline.model_exists(params["model"]):
            raise AirflowSkipException(f"{params['model']} does not exist yet: nothing to screen with")
        return pipeline.screening_plan(
            _run(),
            model=params["model"],
            snapshot=params["snapshot"],
            every_snapshot=params["every_snapshot"],
            events=events,
        )

    @task
    @PERMANENT_FAILS
    def snapshots(chosen: xcoms.ScreeningPlan) -> list[str]:
        """The snapshots, one screening task each."""
        return chosen["snapshots"]

    @task.branch
    def choose_backend() -> str:
        """Follow the form's screening backend."""
        return FIRST_TASKS[get_current_context()["params"]["backend"]]

    @task(task_id=FIRST_TASKS["kubernetes"])
    @PERMANENT_FAILS
    def screening_pods(chosen: xcoms.ScreeningPlan) -> list[list[str]]:
        """The screening pods' arguments, one list per snapshot: its data version, the pinned version, the output
        under `screen.store`."""
        return pipeline.screening_pods(_run(), plan=chosen)

    # A mapped task shows the doc_md it is given, not its docstring.
    @task(task_id=SCREEN_TASKS["local"], **SCREEN, map_index_template="{{ task.op_kwargs['snapshot'] }}",
          doc_md=SCREEN_DOC)  # fmt: skip
    @PERMANENT_FAILS
    def screen(snapshot: str, chosen: xcoms.ScreeningPlan) -> xcoms.Screened:
        return pipeline.screen_step(_run(), snapshot=snapshot, model=chosen["model"])

    @task(trigger_rule="none_failed_min_one_success")
    @PERMANENT_FAILS
    def screening_result() -> list[xcoms.Screened]:
        """The screenings of whichever backend ran, one per snapshot; a pod's is fetched from the object store into
        `<data root>/screened/<snapshot>/<version>/`, where the monitoring reads it."""
        results = get_current_context()["ti"].xcom_pull(task_ids=list(SCREEN_TASKS.values()))
        return pipeline.screening_results(_run(), results=results)

    @task(**SCREEN, doc_md=MONITOR_DOC, map_index_template="{{ task.op_kwargs['screened']['snapshot'] }}")
    @PERMANENT_FAILS
    def monitor(screened: xcoms.Screened, chosen: xcoms.ScreeningPlan) -> xcoms.Monitored:
        return pipeline.monitor_step(_run(), screened=screened, model=chosen["model"])

    @task(outlets=[DRIFT], on_success_callback=alerts.on_result("request_retraining"))
    @PERMANENT_FAILS
    def request_retraining(monitored: list[xcoms.Monitored]) -> dict:
        """On a drift or decay verdict, an event on the `cloudscreen_drift` Asset carrying the snapshot, the decision
        and its reasons (cloudscreen_training follows it when `pipeline.retrain_on` is `drift`); skipped, so no event,
        when every snapshot is ok."""
        request = pipeline.retrain_request_step(_run(), monitored=list(monitored))
        if request is None:
            raise AirflowSkipException("every snapshot is ok: no retraining requested")
        get_current_context()["outlet_events"][DRIFT].extra = {k: v for k, v in request.items() if k != "alert"}
        return request

    @task(trigger_rule="none_failed")
    @PERMANENT_FAILS
    def summary(
        chosen: xcoms.ScreeningPlan, screened: list[xcoms.Screened], monitored: list[xcoms.Monitored]
    ) -> xcoms.ScreeningSummary:
        """The run in a few lines: version and threshold, per snapshot the clear patches, the monitoring's decision
        and reasons, and the MLflow runs."""
        return pipeline.summarize_screening(_run(), plan=chosen, screened=list(screened), monitored=list(monitored))

    chosen = plan()
    screened_here = screen.partial(chosen=chosen).expand(snapshot=snapshots(chosen))
    pods = screening_pods(chosen)
    screened_in_pods = KubernetesPodOperator.partial(
        task_id=SCREEN_TASKS["kubernetes"],
        name="cloudscreen-screener",
        doc_md=SCREEN_POD_DOC,
        **backends.kubernetes_spec(
            None,
            KUBERNETES,
            env={"CLOUDSCREEN_DAG_ID": "{{ dag.dag_id }}", "CLOUDSCREEN_DAG_RUN_ID": "{{ run_id }}"},
            module=backends.SCREENER_MODULE,
        ),
        **SCREEN,
        pool=SETTINGS.gpu_pool,
        map_index_template="{{ task.arguments[1] }}",  # the pod's --snapshot (tasks.lib.backends.screening_arguments)
    ).expand(arguments=pods)
    choose_backend() >> [screened_here, pods]
    screened = screening_result()
    [screened_here, screened_in_pods] >> screened
    monitored = monitor.partial(chosen=chosen).expand(screened=screened)
    request = request_retraining(monitored)
    request >> summary(chosen, screened, monitored)


cloudscreen_screening()
