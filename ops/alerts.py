"""The e-mails the DAGs send, through Airflow's SMTP notifier: the DAG files' callbacks (Airflow-side, so not in
tasks/, which never imports Airflow).

Addresses and the SMTP connection come from params.yaml's `pipeline.alerts`; with `to: []` every list below is empty
and nothing is sent. What a message says is composed by tasks.lib.pipeline and returned in the task's XCom under
`alert` (subject, body), so the notifier only reads it.
"""

from __future__ import annotations

from airflow.providers.smtp.notifications.smtp import SmtpNotifier

from tasks.lib import pipeline

RECIPIENTS = pipeline.alert_recipients(pipeline.load_pipeline_params())


def on_result(task_id: str) -> list[SmtpNotifier]:
    """Callbacks for a task whose XCom carries an `alert`: the message it composed, sent when it succeeds."""
    if RECIPIENTS is None:
        return []
    pull = f"ti.xcom_pull(task_ids='{task_id}')['alert']"
    return [
        SmtpNotifier(
            **RECIPIENTS,
            subject=f"{{{{ {pull}['subject'] }}}}",
            html_content=f"<pre>{{{{ {pull}['body'] | e }}}}</pre>",
        )
    ]


def on_failure() -> list[SmtpNotifier]:
    """Callbacks for every task of a DAG: a failure (after its retries) says which DAG run and task, the error and
    where its log is."""
    if RECIPIENTS is None:
        return []
    return [
        SmtpNotifier(
            **RECIPIENTS,
            subject="cloudscreen: {{ dag.dag_id }} failed in {{ ti.task_id }} (run {{ run_id }})",
            html_content=(
                "<p>{{ dag.dag_id }} run {{ run_id }}: task {{ ti.task_id }} failed after {{ ti.try_number }} "
                "attempt(s).</p><pre>{{ exception | e }}</pre><p>Log: {{ ti.log_url }}</p>"
            ),
        )
    ]
