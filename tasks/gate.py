"""Decide whether a challenger replaces the champion in the model registry, say why, and roll a promotion back.

`python -m tasks.gate --run-id ID` judges the model version registered from run ID (the challenger) against the
version under the registry alias `champion`, and writes the verdict, `gate.json`, to the challenger's run (artifact,
plus the tags `cloudscreen.gate.decision` and `cloudscreen.gate.reasons`) and to stdout. Every decision exits 0;
only an error (unknown run, a run never evaluated, unreadable data) exits non-zero (2).

Decisions:
- `promote`: a champion exists and every rule passes; the challenger becomes the champion.
- `bootstrap`: there is no champion yet and the absolute rules (floors, slice floors, cost ceiling) pass; the
  challenger becomes the first champion. Relative rules (non-regression, the paired test) need a champion.
- `reject`: some rule failed, or no rule is configured: a gate without quality rules never promotes, and a first
  model is not promoted without an absolute rule. The registry is not touched at all (no alias, no tag).
- `forced`: `--force --reason TEXT` promotes whatever the rules say; the verdict names who (--by, else the Airflow
  task context, else $USER) and why, and lists the rule failures the override overrode.

Fair comparison: the challenger's numbers come from its run (what tasks.evaluate logged); the champion is
re-evaluated now, with the challenger's evaluation settings, on the data the challenger was evaluated on (or on
--manifest/--tiles), so a data refresh never compares two models on different patches. When that data is not the
data the challenger's logged evaluation saw (another manifest, or the file changed since), the challenger is
re-evaluated too. Neither re-evaluation is logged anywhere but in gate.json.

Rules (the `gate` section of params.yaml, applied by tasks.lib.gate_rules; metric names as tasks.evaluate logs them,
e.g. `test_op_recall`):
- floors: the challenger's metric must be at least the bound;
- non_regression: the challenger may trail the champion by at most the tolerance (log_loss: exceed it by at most);
- slice_floors: on every test slice (tasks.evaluate's slice columns, e.g. country=Finland) with at least
  `min_slice_patches` patches, each named metric at the operating threshold must be at least the bound; a metric
  undefined on a slice (recall of a slice without cloud) is not checked. With `slice_test: binomial`, a recall,
  precision or accuracy under its bound fails only when it is significantly under (one-sided exact binomial test
  at `alpha` on the patches it counts), since a slice's few cloud patches make its value coarse;
- paired_test: McNemar's test on the test patches, each model classifying at its own operating threshold (the
  method: tasks.lib.gate_rules.mcnemar). The challenger is significantly better when p < alpha and it alone is
  right on more patches than the champion alone, significantly worse when p < alpha and the reverse holds. `better`
  (the default, for unattended scheduled retraining) promotes only a significantly better challenger: a retrain that
  merely ties within noise keeps the champion, so a schedule cannot drift the registry by luck. `not_worse` promotes
  any challenger that is not significantly worse (for when a newer model is preferred when equal, e.g. trained on
  fresher data). `off` skips it;
- max_cost_usd: the challenger run's `cost_usd` metric (logged by tasks.train) may not exceed it; a run without
  `cost_usd` fails the rule with a reason saying so.
Each failing rule adds a reason naming the metric, the challenger's value, the bound and the champion's value.

Registry (tasks.lib.registry): a promotion of version V over champion C tags V with the decision, its reasons, who
and why when forced, its operating threshold `cloudscreen.operating_threshold` (what tasks.screen and tasks.serve
decide at), and the tag `cloudscreen.gate.replaced` = C ("" when V is the first champion); then it points
`previous-champion` at C (removes it when there is no C) and `champion` at V. A rejection leaves its verdict on the
run only.

Rollback: the `replaced` tags chain each champion to the one before it. `python -m tasks.gate rollback` points
`champion` back at C (V's `replaced`) and `previous-champion` at C's own `replaced` (removes it when C has none), and
tags V `cloudscreen.gate.rolled_back` with who and why. Each rollback therefore undoes one more promotion, walking the
chain back; rolling back the first champion is an error. A version made champion outside the gate (no `replaced`
tag) rolls back to whatever `previous-champion` names. Running the gate again on a run whose version is already
champion returns the verdict recorded on the run and changes nothing (an Airflow retry after a promotion).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from tasks.evaluate import SUMMARY_METRICS, EvaluateParams, evaluate
from tasks.lib import cli, registry
from tasks.lib.config import load_section
from tasks.lib.errors import EvaluationError, GateError
from tasks.lib.files import file_digest
from tasks.lib.gate_rules import (
    COST_METRIC,
    FORCED,
    PROMOTING,
    Candidate,
    GateParams,
    Rollback,
    Verdict,
    candidate,
    decide,
    pair,
    reasons_for,
    who,
)
from tasks.lib.metrics import OPERATING_THRESHOLD
from tasks.lib.registry import TAG_GATE_REPLACED, TAG_GATE_ROLLED_BACK
from tasks.lib.tracking import CHAMPION, GATE_FILE, PREVIOUS_CHAMPION
from tasks.sample import NATURAL_FILE

log = logging.getLogger(__name__)


def _evaluate(
    model_uri: str, what: str, manifest: Path, tiles: Path, params: EvaluateParams
) -> tuple[dict[str, float], pd.DataFrame]:
    try:
        result = evaluate(model_uri=model_uri, manifest=manifest, tiles=tiles, params=params, log_to_run=None)
    except EvaluationError as exc:
        raise GateError(f"re-evaluating the {what} ({model_uri}) on {manifest}: {exc}") from exc
    return result.metrics, result.predictions


def _same_data(summary: dict[str, Any], manifest: Path) -> bool:
    """Whether `manifest` (and the natural set beside it) are byte for byte what the recorded evaluation read."""
    natural = manifest.parent / NATURAL_FILE
    recorded = summary["data"]
    return (
        natural.is_file()
        and file_digest(manifest, "sha256") == recorded.get("manifest_sha256")
        and file_digest(natural, "sha256") == recorded.get("natural_sha256")
    )


def _report(model: Candidate, rules: GateParams) -> dict[str, Any]:
    names = dict.fromkeys([*SUMMARY_METRICS, *rules.floors, *rules.non_regression, COST_METRIC])
    metrics = {name: model.metrics[name] for name in names if name in model.metrics}
    return {"version": model.version, "run_id": model.run_id, **metrics}


def _already_champion(client: Any, name: str, run_id: str, version: str) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="cloudscreen-gate-") as tmp:
        recorded = registry.download(client, run_id, GATE_FILE, Path(tmp))
        data = json.loads(recorded.read_text()) if recorded else None
    if data and data.get("decision") in PROMOTING:
        log.info(
            "version %s of %s is already the champion: returning the verdict recorded on run %s", version, name, run_id
        )
        return Verdict.from_json(data)
    raise GateError(
        f"version {version} of {name!r} (run {run_id}) is already the champion and the run records no promoting "
        "verdict: there is nothing to decide"
    )


def gate(
    *,
    run_id: str,
    params: GateParams,
    registered_model: str,
    manifest: Path | None = None,
    tiles: Path | None = None,
    force: bool = False,
    reason: str | None = None,
    by: str | None = None,
) -> Verdict:
    """Judge the version of `registered_model` registered from `run_id` against the champion, record the verdict on
    the run and, when it promotes, move the registry aliases.

    Args:
        run_id: the training run; its model must have been evaluated by tasks.evaluate.
        params: the `gate` section.
        registered_model: the registry name (train.registered_model).
        manifest, tiles: the data to compare on (both or neither); default: what the challenger was evaluated on.
        force: promote whatever the rules say; needs `reason`.
        reason: why a promotion is forced (recorded).
        by: who forces it (default: see `who`).

    Returns:
        The verdict; every decision, `reject` included, is a result.

    Raises:
        GateError: --force without a reason, --reason without --force, half of --manifest/--tiles, an unknown run
            or model, a run never evaluated, data that is gone, or a champion that cannot be evaluated.
    """
    if force and not (reason and reason.strip()):
        raise GateError("--force needs --reason: a forced promotion is an audited override")
    if reason and not force:
        raise GateError("--reason is recorded only with --force")
    if (manifest is None) != (tiles is None):
        raise GateError("--manifest and --tiles go together: give both or neither")
    client = registry.client()
    version = registry.run_version(client, registered_model, run_id)
    aliases = registry.aliases(client, registered_model)
    champion_version = aliases.get(CHAMPION)
    log.info(
        "gate: run %s, %s version %s against champion %s; paired test %s, %d floors, %d non-regression, %d slice "
        "floors, cost ceiling %s%s",
        run_id,
        registered_model,
        version,
        champion_version or "(none)",
        params.paired_test,
        len(params.floors),
        len(params.non_regression),
        len(params.slice_floors),
        params.max_cost_usd,
        "; forced" if force else "",
    )
    if champion_version == version:
        return _already_champion(client, registered_model, run_id, version)

    summary, predictions = registry.recorded_evaluation(client, run_id)
    try:
        # Re-evaluations use the challenger's own evaluation settings: the same target recall and slices.
        eval_params = EvaluateParams.model_validate(summary["params"])
    except ValidationError as exc:
        raise GateError(f"run {run_id}: the evaluation settings it recorded are no longer valid: {exc}") from exc
    columns = eval_params.slice_columns
    metrics = summary["metrics"]
    data_manifest = manifest or Path(summary["data"].get("manifest", ""))
    data_tiles = tiles or Path(summary["data"].get("tiles", ""))
    reevaluated = False
    champion = paired = None
    if champion_version is not None or manifest is not None:
        if not data_manifest.is_file():
            raise GateError(
                f"{data_manifest}: the manifest to compare on is not here (the challenger was evaluated on it); pass "
                "--manifest and --tiles"
            )
        if not _same_data(summary, data_manifest):
            log.warning(
                "%s is not the data run %s was evaluated on: re-evaluating the challenger", data_manifest, run_id
            )
            uri = f"models:/{registered_model}/{version}"
            metrics, predictions = _evaluate(uri, "challenger", data_manifest, data_tiles, eval_params)
            reevaluated = True
        if champion_version is not None:
            uri = f"models:/{registered_model}/{champion_version}"
            theirs, their_predictions = _evaluate(uri, "champion", data_manifest, data_tiles, eval_params)
            champion_run = client.get_model_version(registered_model, champion_version).run_id
            champion = candidate(
                champion_version,
                champion_run,
                theirs | registry.run_cost(client, champion_run),
                their_predictions,
                columns,
            )
            paired = pair(predictions, their_predictions, metrics[OPERATING_THRESHOLD], theirs[OPERATING_THRESHOLD])
    challenger = candidate(version, run_id, metrics | registry.run_cost(client, run_id), predictions, columns)

    digest = file_digest(data_manifest, "sha256") if reevaluated else summary["data"].get("manifest_sha256")

    decision, checks = decide(challenger, champion, paired, params)
    forced = None
    if force:
        decision, forced = FORCED, {"by": who(by), "reason": (reason or "").strip()}
    promoted = decision in PROMOTING
    verdict = Verdict(
        decision=decision,
        reasons=reasons_for(checks, forced),
        registered_model=registered_model,
        run_id=run_id,
        challenger=_report(challenger, params),
        champion=_report(champion, params) if champion else None,
        rules=params.model_dump(mode="json"),
        checks=tuple(asdict(c) for c in checks),
        paired=(
            {"patches": paired.patches, **asdict(paired.test), "mode": params.paired_test, "alpha": params.alpha}
            if paired
            else None
        ),
        data={
            "manifest": str(data_manifest),
            "tiles": str(data_tiles),
            "manifest_sha256": digest,
            "challenger_reevaluated": reevaluated,
        },
        forced=forced,
        registry={
            "champion": version if promoted else champion_version,
            "previous_champion": champion_version if promoted else aliases.get(PREVIOUS_CHAMPION),
            "changed": promoted,
        },
    )
    # The verdict first, the aliases last: a crash in between leaves a verdict whose promotion a retry completes.
    registry.record(client, verdict)
    if promoted:
        registry.promote(client, verdict, version, champion_version, challenger.metrics[OPERATING_THRESHOLD])
    log.info(
        "gate: %s for %s version %s (champion now %s): %s",
        decision,
        registered_model,
        version,
        verdict.registry["champion"] or "(none)",
        " ".join(verdict.reasons),
    )
    return verdict


def rollback(*, registered_model: str, reason: str | None = None, by: str | None = None) -> Rollback:
    """Undo the last promotion: `champion` returns to the version the current champion replaced, and
    `previous-champion` to the one that version replaced (see the module docstring).

    Raises:
        GateError: no champion, or nothing to return to (the champion was the first), or that version is gone.
    """
    client = registry.client()
    aliases = registry.aliases(client, registered_model)
    current = aliases.get(CHAMPION)
    if current is None:
        raise GateError(f"registered model {registered_model!r} has no champion: there is nothing to roll back")
    tags = client.get_model_version(registered_model, current).tags
    # The chain tag is the record; the alias is its mirror, and the fallback for a champion set outside the gate.
    target = (tags[TAG_GATE_REPLACED] or None) if TAG_GATE_REPLACED in tags else aliases.get(PREVIOUS_CHAMPION)
    if target is None:
        raise GateError(
            f"version {current} of {registered_model!r} was the first champion: there is no previous champion to "
            "return to"
        )
    if aliases.get(PREVIOUS_CHAMPION) not in (None, target):
        log.warning(
            "previous-champion names version %s but version %s replaced version %s: following the chain",
            aliases[PREVIOUS_CHAMPION],
            current,
            target,
        )
    try:
        target_tags = client.get_model_version(registered_model, target).tags
    except registry.mlflow_errors() as exc:
        raise GateError(f"version {target} of {registered_model!r}, the previous champion: {exc.message}") from exc
    before = target_tags.get(TAG_GATE_REPLACED) or None
    actor = who(by)
    log.info("rollback of %s: champion %s -> %s (previous-champion %s)", registered_model, current, target, before)
    client.set_model_version_tag(
        registered_model, current, TAG_GATE_ROLLED_BACK, f"by {actor}" + (f": {reason}" if reason else "")
    )
    client.set_registered_model_alias(registered_model, CHAMPION, target)
    if before:
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, before)
    else:
        client.delete_registered_model_alias(registered_model, PREVIOUS_CHAMPION)
    return Rollback(registered_model, current, target, before, actor, reason)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "action",
        nargs="?",
        choices=("decide", "rollback"),
        default="decide",
        help="decide (default): judge --run-id's model; rollback: undo the last promotion",
    )
    p.add_argument("--run-id", help="decide: the training run whose registered model is the challenger")
    p.add_argument("--manifest", type=Path, help="compare on this sample manifest (default: the challenger's data)")
    p.add_argument("--tiles", type=Path, help="the tile step's output holding the manifest's patches")
    p.add_argument("--force", action="store_true", help="promote whatever the rules say (needs --reason)")
    p.add_argument("--reason", help="why a promotion is forced, or why a rollback is done; recorded in the registry")
    p.add_argument("--by", help="who forces or rolls back (default: the Airflow task, else $USER)")
    args = p.parse_args()
    if args.action == "decide" and not args.run_id:
        p.error("--run-id is required (or use: rollback)")
    if args.action == "rollback" and (args.run_id or args.manifest or args.tiles or args.force):
        p.error("rollback takes no --run-id, --manifest, --tiles or --force")
    cli.configure_logging(args.verbose)
    from tasks.train import TrainParams  # the registered model's name is the trainer's

    name = load_section("train", TrainParams, args.params, args.overrides).registered_model
    if args.action == "rollback":
        result = rollback(registered_model=name, reason=args.reason, by=args.by).to_json()
    else:
        result = gate(
            run_id=args.run_id,
            params=load_section("gate", GateParams, args.params, args.overrides),
            registered_model=name,
            manifest=args.manifest,
            tiles=args.tiles,
            force=args.force,
            reason=args.reason,
            by=args.by,
        ).to_json()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
