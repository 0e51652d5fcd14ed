"""cloudscreen_training: train → evaluate → gate on the newest snapshot, on new data and on a periodic schedule.

Wiring only: each task calls one function of tasks.lib.pipeline (or, on Kubernetes, runs the trainer image's
entrypoint).
"""

from __future__ import annotations

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from ops import alerts
from tasks.lib import backends, pipeline, xcoms
from tasks.lib.config import load_section
from tasks.lib.errors import fail_fast

SETTINGS = pipeline.load_pipeline_params()
KUBERNETES = load_section("backends", backends.BackendsParams).kubernetes
TRAINING_DATA = Asset(**pipeline.TRAINING_DATA_ASSET)
CHAMPION = Asset(**pipeline.CHAMPION_ASSET)
DRIFT = Asset(**pipeline.DRIFT_ASSET)
# What retrains besides the schedule: every refreshed snapshot, or only a drift or decay verdict of the monitoring.
RETRAIN_ASSETS = {"every_snapshot": [TRAINING_DATA], "drift": [DRIFT]}[SETTINGS.retrain_on]
TRAIN_TASKS = {backend: f"train_{backend}" for backend in pipeline.BACKENDS}
TRAIN = {**pipeline.task_defaults(SETTINGS, io=False, timeout="train"), "pool": SETTINGS.gpu_pool}
EVALUATE = pipeline.task_defaults(SETTINGS, io=True, timeout="evaluate")
# A permanent error (bad params, a missing snapshot, a run never evaluated) fails the task at once; transient ones
# (a trainer whose machine went away, a busy server) are retried.
PERMANENT_FAILS = fail_fast(AirflowFailException)


def _run() -> pipeline.Run:
    context = get_current_context()
    dag_run, params = context["dag_run"], context["params"]
    return pipeline.run_for(
        run_type=getattr(dag_run.run_type, "value", dag_run.run_type),
        logical_date=dag_run.logical_date,
        run_id=dag_run.run_id,
        overrides=pipeline.training_overrides(
            epochs=params["epochs"],
            learning_rate=params["learning_rate"],
            budget_minutes=params["budget_minutes"],
            budget_usd=params["budget_usd"],
            extra=params["overrides"],
        ),
    )


@dag(
    dag_id="cloudscreen_training",
    # New data (every refresh) or the periodic retrain, whichever comes first.
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.retrain_schedule, timezone="UTC"), assets=RETRAIN_ASSETS
    ),
    start_date=pipeline.start_datetime(SETTINGS),
    catchup=False,
    max_active_runs=1,  # one challenger at a time: the gate compares against the champion of the moment
    default_args={
        **pipeline.task_defaults(SETTINGS, io=False, timeout="evaluate"),
        "on_failure_callback": alerts.on_failure(),
    },
    tags=["cloudscreen", "model"],
    params={
        "dataset": Param(SETTINGS.dataset, enum=["small", "large"], description="The sample set to train on."),
        "snapshot": Param(
            None,
            type=["null", "string"],
            description="Train on this refreshed snapshot (e.g. 2026-11-16); empty: the newest one.",
        ),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="Empty: params.yaml train.epochs."),
        "learning_rate": Param(
            None, type=["null", "number"], exclusiveMinimum=0, description="Empty: params.yaml train.learning_rate."
        ),
        "budget_minutes": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            description="Stop training after this much wall time (the epoch in progress finishes; the best weights "
            "are kept). Empty: params.yaml train.budget_minutes.",
        ),
        "budget_usd": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            description="Stop training once it has cost this much at the cost table's price of its machine. Empty: "
            "params.yaml train.budget_usd.",
        ),
        "search": Param(
            False,
            type="boolean",
            description="Search first: tasks.search's trials over the learning rate and optimizer (params.yaml's "
            "search section; e.g. the override search.trials=10), nested MLflow runs under one search run, on the "
            "worker; then the full training uses the best trial's learning rate and optimizer, and its model is "
            "gated like any challenger.",
        ),
        "backend": Param(
            SETTINGS.training_backend,
            enum=list(pipeline.BACKENDS),
            description="local: a subprocess of the worker · docker: the trainer image on a Docker engine · "
            "kubernetes: a pod on the GPU node pool.",
        ),
        "force_promote": Param(
            False, type="boolean", description="Promote whatever the gate's rules say (an audited override)."
        ),
        "reason": Param(
            None, type=["null", "string"], description="Why the promotion is forced: required with force_promote."
        ),
        "overrides": Param(
            [],
            type="array",
            items={"type": "string"},
            description="More params.yaml overrides, SECTION.KEY=VALUE (e.g. train.batch_size=64, model.architecture"
            "=mobilenet_v2).",
        ),
    },
    doc_md=__doc__
    + """
Runs when `cloudscreen_refresh` records a new snapshot (the `cloudscreen_training_data` Asset) or, with
`pipeline.retrain_on: drift`, only when the monitoring reports drift or decay (the `cloudscreen_drift` Asset); and on
`pipeline.retrain_schedule` (monthly by default) either way. The MLflow run records why it trained
(`cloudscreen.trigger`: new_data, drift with the monitoring's reasons, schedule or manual). The trigger form picks the
snapshot, the set, epochs, learning rate, a training budget (minutes or dollars), a hyperparameter search first (its
best trial's learning rate and optimizer are then trained and gated), the training backend and a forced promotion.

The model is trained on the snapshot's pinned data version (recorded as the MLflow run's lineage tags), registered as
`challenger`, evaluated on test and the natural-prevalence set (metrics and plots in its MLflow run), and the gate
promotes it to `champion` or keeps the champion, with its reasons in `gate.json`. A promotion is announced on the
`cloudscreen_champion` Asset, which `cloudscreen_screening` follows. The last task's output (and log) is a summary with
the MLflow run link and the verdict.
""",
)
def cloudscreen_training():
    @task
    @PERMANENT_FAILS
    def training_data() -> xcoms.TrainingData:
        """Check the form, pick the snapshot to train on (the form's, the one that triggered this run, else the
        newest) and pin its data version; restore it from the DVC remote if its files are gone.

        Output: snapshot, data version, manifest and tiles paths.
        """
        context = get_current_context()
        events = pipeline.event_extras(context.get("triggering_asset_events"))
        params = context["params"]
        pipeline.check_training_form(force_promote=params["force_promote"], reason=params["reason"])
        data = pipeline.training_data(_run(), snapshot=params["snapshot"], events=events, dataset=params["dataset"])
        run_type = context["dag_run"].run_type
        trigger, reasons = pipeline.training_trigger(run_type=getattr(run_type, "value", run_type), events=events)
        return {**data, "trigger": trigger, "trigger_reasons": reasons}

    @task
    @PERMANENT_FAILS
    def plan_training(data: xcoms.TrainingData) -> xcoms.TrainingPlan:
        """The trainer's inputs for every backend: data, overrides, checkpoint directory, lineage."""
        context = get_current_context()
        return pipeline.plan_training(
            _run(), data=data, dag_id=context["dag"].dag_id, dag_run_id=context["dag_run"].run_id
        )

    @task(**TRAIN)
    @PERMANENT_FAILS
    def search_hyperparameters(plan: xcoms.TrainingPlan) -> xcoms.TrainingPlan:
        """With the form's `search`: tasks.search on the worker (its trials are nested MLflow runs under one search
        run), then the plan with the best trial's learning rate and optimizer for whichever backend trains. Without
        it: the plan as planned. Output: the trainer's inputs."""
        if not get_current_context()["params"]["search"]:
            return plan
        return pipeline.search_step(_run(), plan=plan)

    @task.branch
    def choose_backend() -> str:
        """Follow the form's training backend."""
        return TRAIN_TASKS[get_current_context()["params"]["backend"]]

    @task(task_id=TRAIN_TASKS["local"], **TRAIN)
    @PERMANENT_FAILS
    def train_local(plan: xcoms.TrainingPlan) -> xcoms.Trained:
        """`python -m tasks.train` as a subprocess of the worker, its log streamed here; resumes from its checkpoint
        when retried. Output: the MLflow run id and registered model version (alias `challenger`)."""
        return pipeline.train_step(_run(), plan=plan, backend="local")

    @task(task_id=TRAIN_TASKS["docker"], **TRAIN)
    @PERMANENT_FAILS
    def train_docker(plan: xcoms.TrainingPlan) -> xcoms.Trained:
        """The trainer image on a Docker engine (`backends.docker`; DOCKER_HOST), GPUs requested; it restores the
        data version from the DVC remote first. Output: the MLflow run id and registered model version."""
        return pipeline.train_step(_run(), plan=plan, backend="docker")

    data = training_data()
    plan = search_hyperparameters(plan_training(data))
    train_kubernetes = KubernetesPodOperator(
        task_id=TRAIN_TASKS["kubernetes"],
        name="cloudscreen-trainer",
        doc_md="The trainer image in a pod on the GPU node pool (`backends.kubernetes`: `nvidia.com/gpu` in limits, "
        "node selector, tolerations, Workload Identity service account, secrets from Kubernetes Secrets); deferrable; "
        "the pod is deleted when it finishes. It restores the data version into an emptyDir and writes its result to "
        "/airflow/xcom/return.json. Output: the MLflow run id and registered model version.",
        **backends.kubernetes_spec(
            plan["kubernetes_arguments"],
            KUBERNETES,
            env={"CLOUDSCREEN_DAG_ID": "{{ dag.dag_id }}", "CLOUDSCREEN_DAG_RUN_ID": "{{ run_id }}"},
        ),
        **TRAIN,
    )
    trained_by = [train_local(plan), train_docker(plan), train_kubernetes]
    choose_backend() >> trained_by

    @task(trigger_rule="none_failed_min_one_success")
    @PERMANENT_FAILS
    def training_result(data: xcoms.TrainingData, plan: xcoms.TrainingPlan) -> xcoms.Trained:
        """The result of whichever backend trained; its MLflow run is tagged with why it trained
        (`cloudscreen.trigger`: new_data, drift, schedule or manual, and the reasons) and, after a search, with the
        search run (`cloudscreen.search_run_id`)."""
        results = [r for r in get_current_context()["ti"].xcom_pull(task_ids=list(TRAIN_TASKS.values())) if r]
        pipeline.record_trigger(results[0]["run_id"], data, plan)
        return {**results[0], "backend": get_current_context()["params"]["backend"]}

    @task(**EVALUATE)
    @PERMANENT_FAILS
    def evaluate(trained: xcoms.Trained, data: xcoms.TrainingData) -> xcoms.Evaluated:
        """Evaluate the challenger on val, test and the natural-prevalence set: metrics, per-slice metrics, plots and
        predictions, all logged to its MLflow run. Output: the operating threshold and the metrics."""
        return pipeline.evaluate_step(_run(), run_id=trained["run_id"], data=data)

    @task(**EVALUATE, on_success_callback=alerts.on_result("gate"))
    @PERMANENT_FAILS
    def gate(trained: xcoms.Trained, evaluated: xcoms.Evaluated) -> xcoms.GateDecision:
        """Promote the challenger to `champion` or keep the champion (floors, non-regression, slices, McNemar, cost);
        the verdict and its reasons go to the run's gate.json and tags. Output: the verdict."""
        params = get_current_context()["params"]
        return pipeline.gate_step(
            _run(), run_id=trained["run_id"], force=params["force_promote"], reason=params["reason"]
        )

    @task
    @PERMANENT_FAILS
    def summary(
        data: xcoms.TrainingData, trained: xcoms.Trained, evaluated: xcoms.Evaluated, verdict: xcoms.GateDecision
    ) -> xcoms.TrainingSummary:
        """The run in a few lines: data version, MLflow run link, test metrics, the gate's decision and reasons."""
        return pipeline.summarize(
            _run(), data=data, trained=trained, evaluation=evaluated, verdict=verdict, backend=trained["backend"]
        )

    @task(outlets=[CHAMPION])
    @PERMANENT_FAILS
    def new_champion(verdict: xcoms.GateDecision) -> None:
        """Announce a promotion on the `cloudscreen_champion` Asset (cloudscreen_screening screens with the new
        champion); skipped, so no event, when the champion stayed."""
        if not verdict["promoted"]:
            raise AirflowSkipException(f"the gate decided {verdict['decision']}: the champion did not change")
        get_current_context()["outlet_events"][CHAMPION].extra = {
            "version": verdict["registry"]["champion"],
            "decision": verdict["decision"],
        }

    trained = training_result(data, plan)
    trained_by >> trained
    evaluated = evaluate(trained, data)
    verdict = gate(trained, evaluated)
    new_champion(verdict)
    summary(data, trained, evaluated, verdict)


cloudscreen_training()
