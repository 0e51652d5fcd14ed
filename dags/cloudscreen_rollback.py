"""cloudscreen_rollback: undo the last promotion from the Airflow UI, and tell the screening DAG.

Wiring only: the task calls tasks.lib.pipeline.rollback_step (tasks.gate's rollback, as `python -m tasks.gate
rollback` does) and announces the champion it restored on the `cloudscreen_champion` Asset.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from ops import alerts
from tasks.lib import pipeline
from tasks.lib.errors import fail_fast

SETTINGS = pipeline.load_pipeline_params()
CHAMPION = Asset(**pipeline.CHAMPION_ASSET)
PERMANENT_FAILS = fail_fast(AirflowFailException)


@dag(
    dag_id="cloudscreen_rollback",
    schedule=None,  # a person decides
    start_date=pipeline.start_datetime(SETTINGS),
    catchup=False,
    max_active_runs=1,
    default_args={"on_failure_callback": alerts.on_failure()},
    tags=["cloudscreen", "model"],
    params={
        "reason": Param("", type="string", minLength=1, description="Why the champion goes back (recorded)."),
        "by": Param(None, type=["null", "string"], description="Who decides; empty: the DAG run."),
    },
    doc_md=__doc__
    + """
`champion` returns to the version the current champion replaced (the `cloudscreen.gate.replaced` chain) and
`previous-champion` one step further back; the version rolled back from is tagged with who and why. Each run undoes
one more promotion. `cloudscreen_screening` then screens the newest snapshot with the restored champion.
""",
)
def cloudscreen_rollback():
    @task(outlets=[CHAMPION], on_success_callback=alerts.on_result("rollback"))
    @PERMANENT_FAILS
    def rollback() -> dict:
        """Point `champion` back at the version it replaced. Output: the versions before and after, who and why."""
        context = get_current_context()
        run = pipeline.run_for(run_type="manual", logical_date=None, run_id=context["dag_run"].run_id)
        done = pipeline.rollback_step(run, reason=context["params"]["reason"], by=context["params"]["by"])
        context["outlet_events"][CHAMPION].extra = {"version": done["champion"], "decision": "rollback"}
        return done

    rollback()


cloudscreen_rollback()
