"""Watch the data and the model: has a snapshot drifted from the reference, and has the champion got worse on it?

`python -m tasks.monitor --tiles NEW --reference REF --out DIR [--scores S] [--reference-scores RS] [--model URI]`
compares the snapshot NEW with REF (by default, without --reference: the data version the model was trained on,
read from its lineage tag and restored from the DVC remote) and writes `DIR/monitor.json` with a decision:
- `decay`: where labels exist (BigEarthNet's official cloud-and-shadow list labels every patch, the `cloud` column of
  metadata.parquet), the model's recall at its operating threshold on NEW fell below its own test recall, or its
  false-positive rate rose above its own test rate, by more than the tolerance (`monitor` section);
- `drift`: a column drifted (tasks.lib.drift, Evidently): a band feature of the patches (input drift), the model's
  score (prediction drift) or a context column (season, country, the labelled cloud prevalence);
- `ok`: neither.
Each reason names the column, the statistic, its value and the threshold. Beside it: the features of both samples
(`features.parquet`) and, on a drift or decay verdict, the most drifted columns plotted, reference against new
(`drift.png`), and Evidently's HTML report (`report.html`); `monitor.report: always` writes both every time. Each
monitoring is an MLflow run in the `monitor` section's experiment.

Input features come from a seeded sample of each snapshot (`sample_patches`), read a chunk at a time, so the cost
does not grow with the snapshot. Scores: NEW's from --scores (tasks.screen's scores.parquet: every patch, so decay
is measured on all of them), else the model scores NEW's sample; REF's from --reference-scores, else the model scores
REF's sample. Output is atomic and a re-run with the same inputs, model version and params does nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from tasks.lib import cli, drift, plots, tracking
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import InputError, MonitoringError
from tasks.lib.files import atomic_dir, jsonable, path_digest, write_json
from tasks.lib.metrics import binary_metrics, metric_name
from tasks.lib.outputs import completed, fingerprint
from tasks.lib.scoring import DEFAULT_MODEL, ModelVersion, Scorer, load_scorer, resolve_version
from tasks.lib.tiles import INDEX_FILE, METADATA_FILE, RGB_CHANNELS, PatchReader, channels

log = logging.getLogger(__name__)

MONITOR_FILE = "monitor.json"
REPORT_FILE = "report.html"
FEATURES_FILE = "features.parquet"
PLOT_FILE = "drift.png"
KIND_MONITORING = "monitoring"  # the cloudscreen.kind tag of a monitoring run
OK, DRIFT, DECAY = "ok", "drift", "decay"
SCORE_COLUMN = "cloud_probability"
LABEL_COLUMN = "cloud"
_CHUNK = 256  # patches read at a time for the features


class DriftRule(StepParams):
    method: Literal[drift.METHODS]  # type: ignore[valid-type]
    threshold: float = Field(gt=0)


class MonitorParams(StepParams):
    sample_patches: int = Field(gt=0)
    pixel_stride: int = Field(ge=1)
    seed: int
    numerical: DriftRule
    categorical: DriftRule
    score: DriftRule
    context_columns: list[str]
    recall_tolerance: float = Field(ge=0, lt=1)
    false_positive_tolerance: float = Field(ge=0, lt=1)
    decay_alpha: float = Field(gt=0, lt=1)
    min_labelled_clouds: int = Field(ge=1)
    plots: int = Field(ge=1)
    report: Literal["on_alarm", "always"] = "on_alarm"
    experiment: str = Field(min_length=1)


@dataclass(frozen=True)
class MonitorResult:
    out: Path
    verdict: dict[str, Any]
    skipped: bool


# --- one snapshot's sample ----------------------------------------------------------------------------------------


def _channels(tiles: Path) -> list[str]:
    try:
        return channels(tiles)
    except InputError as exc:
        raise MonitoringError(str(exc)) from exc


def _sample(tiles: Path, params: MonitorParams) -> pd.DataFrame:
    """The seeded sample's rows: patch_id, shard, offset and the context columns, in index order."""
    try:
        index = pd.read_parquet(tiles / INDEX_FILE, columns=["patch_id", "shard", "offset"])
        wanted = ["patch_id", LABEL_COLUMN, *params.context_columns]
        metadata = pd.read_parquet(tiles / METADATA_FILE)
    except (OSError, ValueError) as exc:
        raise MonitoringError(f"{tiles}: not a readable tiles directory ({exc})") from exc
    missing = [c for c in wanted if c not in metadata.columns]
    if missing:
        raise MonitoringError(f"{tiles / METADATA_FILE}: lacks the column(s) {', '.join(missing)}")
    if len(index) == 0:
        raise MonitoringError(f"{tiles / INDEX_FILE}: no patches to monitor")
    rng = np.random.default_rng(params.seed)
    rows = np.sort(rng.choice(len(index), size=min(params.sample_patches, len(index)), replace=False))
    return index.iloc[rows].merge(metadata[wanted], on="patch_id", how="left").reset_index(drop=True)


def _features(tiles: Path, sample: pd.DataFrame, params: MonitorParams) -> pd.DataFrame:
    channels = _channels(tiles)
    reader = PatchReader(tiles)
    parts = []
    for start in range(0, len(sample), _CHUNK):
        chunk = sample.iloc[start : start + _CHUNK]
        try:
            patches = reader.frame_patches(chunk)
        except InputError as exc:
            raise MonitoringError(str(exc)) from exc
        parts.append(drift.band_features(patches, channels, stride=params.pixel_stride))
    return pd.concat(parts, ignore_index=True)


def _model_scores(tiles: Path, sample: pd.DataFrame, scorer: Scorer) -> np.ndarray:
    held = _channels(tiles)
    rgb = [held.index(band) for band in RGB_CHANNELS]
    reader = PatchReader(tiles)
    parts = [
        scorer(np.ascontiguousarray(reader.frame_patches(sample.iloc[i : i + _CHUNK])[..., rgb]))
        for i in range(0, len(sample), _CHUNK)
    ]
    return np.concatenate(parts).astype(np.float64)


def _read_scores(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, columns=["patch_id", SCORE_COLUMN])
    except (OSError, ValueError, KeyError) as exc:
        raise MonitoringError(f"{path}: not a screening's scores.parquet ({exc})") from exc


def _frame(
    tiles: Path, params: MonitorParams, scorer: Scorer | None, scores: Path | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the sample's features, context and score; every patch's score and label when --scores gave them). Without
    scores, `scorer` scores the sample."""
    sample = _sample(tiles, params)
    frame = pd.concat(
        [sample[["patch_id", LABEL_COLUMN, *params.context_columns]], _features(tiles, sample, params)], axis=1
    )
    everything = None
    if scores is not None:
        everything = _read_scores(scores)
        frame = frame.merge(everything, on="patch_id", how="left")
        if frame[SCORE_COLUMN].isna().any():
            raise MonitoringError(f"{scores}: has no score for some patches of {tiles}; is it this snapshot's?")
        labels = pd.read_parquet(tiles / METADATA_FILE, columns=["patch_id", LABEL_COLUMN])
        everything = everything.merge(labels, on="patch_id", how="inner")
    elif scorer is not None:
        frame[SCORE_COLUMN] = _model_scores(tiles, sample, scorer)
    return frame, everything


# --- the decision -------------------------------------------------------------------------------------------------


def _rate(hits: float | None, misses: float | None) -> float:
    return hits / (hits + misses) if hits is not None and misses is not None and hits + misses > 0 else float("nan")


def _worse(now: tuple[float, float], test: tuple[float, float], alternative: str) -> float:
    """Fisher's exact test p-value that the rate hits / (hits + misses) is now lower ("less") or higher ("greater")
    than on the test set."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[int(now[0]), int(now[1])], [int(test[0]), int(test[1])]], alternative=alternative)[1])


def _decay(labelled: pd.DataFrame, version: ModelVersion, params: MonitorParams) -> tuple[dict[str, Any], list[str]]:
    """The model at its threshold on NEW's labelled patches against its own test figures.

    Recall (of the clouds) and the false-positive rate (of the clear patches) are compared, not precision: both are
    rates within one class, so they do not move with the cloud share, while precision does (a snapshot at the real
    prevalence shows a far lower precision than the balanced test set for the same model). A rate has decayed when it
    is worse by more than its tolerance and Fisher's exact test says so at `decay_alpha`: a test set of a few patches
    proves nothing either way.
    """
    import mlflow

    labels = labelled[LABEL_COLUMN].astype(int).to_numpy()
    now = binary_metrics(labels, labelled[SCORE_COLUMN].to_numpy(), version.threshold)
    now["false_positive_rate"] = _rate(now["fp"], now["tn"])
    recorded = mlflow.MlflowClient().get_run(version.run_id).data.metrics
    counts = {k: recorded.get(metric_name("test", k, "op")) for k in ("tp", "fn", "fp", "tn")}
    test = {
        "recall": _rate(counts["tp"], counts["fn"]),
        "false_positive_rate": _rate(counts["fp"], counts["tn"]),
        **counts,
    }
    clouds, clear = int(labels.sum()), int(len(labels) - labels.sum())
    figures: dict[str, Any] = {"patches": len(labels), "clouds": clouds, "now": now, "test": test}
    reasons: list[str] = []
    figures["checked"] = bool(clouds >= params.min_labelled_clouds)
    if not figures["checked"]:
        return figures, reasons
    where = f"at threshold {version.threshold:.4f}"
    if np.isfinite(test["recall"]) and now["recall"] < test["recall"] - params.recall_tolerance:
        p = _worse((now["tp"], now["fn"]), (counts["tp"], counts["fn"]), "less")
        figures["recall_p_value"] = p
        if p < params.decay_alpha:
            reasons.append(
                f"recall {where}: {now['recall']:.3f} on {clouds} labelled clouds, below the model's test recall "
                f"{test['recall']:.3f} by more than {params.recall_tolerance:g} (Fisher p = {p:.2g})"
            )
    tolerance = params.false_positive_tolerance
    if (
        np.isfinite(test["false_positive_rate"])
        and now["false_positive_rate"] > test["false_positive_rate"] + tolerance
    ):
        p = _worse((now["fp"], now["tn"]), (counts["fp"], counts["tn"]), "greater")
        figures["false_positive_p_value"] = p
        if p < params.decay_alpha:
            reasons.append(
                f"false-positive rate {where}: {now['false_positive_rate']:.3f} on {clear} labelled clear patches, "
                f"above the model's test false-positive rate {test['false_positive_rate']:.3f} by more than "
                f"{tolerance:g} (Fisher p = {p:.2g})"
            )
    return figures, reasons


def _versioned_reference(version: ModelVersion, out: Path) -> Path:
    """The tiles the model was trained on, restored from the DVC remote by its lineage tag (cached under OUT)."""
    from tasks.versioning import TILES_DIR, VersioningParams, restore

    if not version.data_version:
        raise MonitoringError(f"{version.uri}: its training run has no data version tag; pass --reference")
    dest = out.parent / f".reference-{version.data_version}"
    if not (dest / TILES_DIR).is_dir():
        restore(version=version.data_version, dest=dest, params=load_section("versioning", VersioningParams))
    return dest / TILES_DIR


def monitor(
    *,
    tiles: Path,
    out: Path,
    params: MonitorParams,
    reference: Path | None = None,
    model: str | None = DEFAULT_MODEL,
    scores: Path | None = None,
    reference_scores: Path | None = None,
    lineage: tracking.Lineage | None = None,
) -> MonitorResult:
    """Compare `tiles` with `reference` and write OUT (see the module docstring); `model=None` checks input and
    context drift only.

    Raises:
        ModelVersionError: the model names no registered version with an operating threshold.
        MonitoringError: a tiles directory or a scores file is missing or unreadable, or no reference can be found.
    """
    import mlflow

    lineage = lineage or tracking.Lineage.from_environment()
    version = resolve_version(model) if model else None
    if reference is None:
        if version is None:
            raise MonitoringError("no --reference and no model whose training data could be the reference")
        reference = _versioned_reference(version, out)
    inputs = [tiles, reference, *(p for p in (scores, reference_scores) if p)]
    try:
        digests = [path_digest(t / name, "sha256") for t in (tiles, reference) for name in (INDEX_FILE, METADATA_FILE)]
        digests += [path_digest(p, "sha256") for p in (scores, reference_scores) if p]
    except OSError as exc:
        raise MonitoringError(f"{', '.join(map(str, inputs))}: an input is missing ({exc})") from exc
    key = fingerprint(
        *digests, version.uri if version else "", repr(version and version.threshold), params.model_dump_json()
    )
    done = completed(out / MONITOR_FILE, key, what="monitoring")
    if done and all((out / done[name]).is_file() for name in ("report", "plot") if done.get(name)):
        return MonitorResult(out, done, skipped=True)

    # One scorer for both sides, loaded only when a side has no screening scores.
    scorer = load_scorer(version) if version is not None and not (scores and reference_scores) else None
    new_frame, labelled = _frame(tiles, params, scorer, scores)
    ref_frame, _ = _frame(reference, params, scorer, reference_scores)
    features = [c for c in new_frame.columns if c.endswith(tuple(f"_{s}" for s in drift.FEATURE_STATS))]
    numerical = features + ([SCORE_COLUMN] if SCORE_COLUMN in new_frame and SCORE_COLUMN in ref_frame else [])
    categorical = [*params.context_columns, LABEL_COLUMN]
    if labelled is None and SCORE_COLUMN in new_frame:
        labelled = new_frame[[LABEL_COLUMN, SCORE_COLUMN]].copy()  # the sample's: no --scores for every patch
    for frame in (new_frame, ref_frame):
        frame[LABEL_COLUMN] = frame[LABEL_COLUMN].astype(str)  # a category to the drift tests
    rules = {
        "numerical": (params.numerical.method, params.numerical.threshold),
        "categorical": (params.categorical.method, params.categorical.threshold),
        SCORE_COLUMN: (params.score.method, params.score.threshold),
    }
    with atomic_dir(out) as tmp:
        columns = drift.column_drift(ref_frame, new_frame, numerical=numerical, categorical=categorical, methods=rules)
        drifted = sorted((c for c in columns if c.drifted), key=lambda c: _severity(c), reverse=True)
        drift_reasons = [c.reason(ref_frame[c.column], new_frame[c.column]) for c in drifted]
        decay: dict[str, Any] | None = None
        decay_reasons: list[str] = []
        if version is not None and labelled is not None:
            decay, decay_reasons = _decay(labelled, version, params)
        decision = DECAY if decay_reasons else DRIFT if drifted else OK
        # What takes most of an ok monitoring's time, the figures, is drawn when someone will look: on an alarm.
        report, plot = (REPORT_FILE, PLOT_FILE) if decision != OK or params.report == "always" else (None, None)
        if report:
            _html_report(ref_frame, new_frame, columns, tmp / report)
        context = {
            name: {
                "reference": _shares(ref_frame, name),
                "new": _shares(new_frame, name),
            }
            for name in [*params.context_columns, LABEL_COLUMN]
        }
        verdict = {
            "decision": decision,
            "reasons": decay_reasons + drift_reasons,
            "columns": [c.__dict__ for c in columns],
            "drifted": [c.column for c in drifted],
            "drift_share": len(drifted) / len(columns) if columns else 0.0,
            "decay": decay,
            "context": context,
            "report": report,
            "plot": plot,
            "tiles": str(tiles),
            "reference": str(reference),
            "model": version.to_json() if version else None,
            "patches": {"new": len(new_frame), "reference": len(ref_frame)},
            "snapshot": lineage.snapshot,
            "data_version": lineage.data_version,
            "params": params.model_dump(mode="json"),
            "input": {"fingerprint": key},
        }
        if plot:
            shown = [c.column for c in drifted[: params.plots]] or [
                c.column for c in sorted(columns, key=_severity)[-params.plots :]
            ]
            labels = {c.column: f"{c.method} {c.value:.3g} (threshold {c.threshold:g})" for c in columns}
            plots.save(plots.drift_figure(ref_frame, new_frame, shown, labels), tmp / plot)
        pd.concat([ref_frame.assign(snapshot="reference"), new_frame.assign(snapshot="new")]).to_parquet(
            tmp / FEATURES_FILE, index=False
        )
        with mlflow.start_run(
            experiment_id=tracking.experiment_id(params.experiment),
            run_name=f"monitor {lineage.snapshot or tiles.name}",
            tags={
                **lineage.tags(),
                tracking.TAG_KIND: KIND_MONITORING,
                f"{tracking.TAG_PREFIX}monitor.decision": decision,
            },
        ) as run:
            verdict["mlflow_run_id"] = run.info.run_id
            mlflow.log_params(
                {"tiles": str(tiles), "reference": str(reference), "model": version.uri if version else ""}
            )
            metrics = {"drift_share": verdict["drift_share"], "drifted_columns": len(drifted)}
            metrics |= {f"drift_{c.column}": c.value for c in columns if np.isfinite(c.value)}
            if decay and decay.get("checked"):
                metrics |= {
                    f"new_{k}": v
                    for k, v in decay["now"].items()
                    if k in ("recall", "false_positive_rate") and np.isfinite(v)
                }
            mlflow.log_metrics(metrics)
            write_json(tmp / MONITOR_FILE, jsonable(verdict))
            for name in (MONITOR_FILE, report, plot):
                if name:
                    mlflow.log_artifact(str(tmp / name))
    log.info(
        "monitoring %s against %s: %s%s", tiles, reference, decision, "".join(f"\n  {r}" for r in verdict["reasons"])
    )
    return MonitorResult(out, jsonable(verdict), skipped=False)


def _html_report(reference: pd.DataFrame, current: pd.DataFrame, columns: list[drift.ColumnDrift], path: Path) -> None:
    """Evidently's report; it computes every value again, which must be the verdict's (same tests, same data)."""
    values = drift.html_report(reference, current, columns, path)
    for column in columns:
        if not np.isclose(values.get(column.column, np.nan), column.value, rtol=1e-9, equal_nan=True):
            log.warning(
                "%s: the report says %s, the verdict %s", column.column, values.get(column.column), column.value
            )


def _severity(column: drift.ColumnDrift) -> float:
    """How far past its threshold a column is, comparable across methods (distance / threshold, threshold / p)."""
    if column.method in drift.DISTANCE_METHODS:
        return column.value / column.threshold
    return column.threshold / max(column.value, 1e-300)


def _shares(frame: pd.DataFrame, column: str) -> dict[str, float]:
    return {str(k): float(v) for k, v in frame[column].astype(str).value_counts(normalize=True).sort_index().items()}


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--tiles", type=Path, required=True, help="the new snapshot's tiles directory")
    p.add_argument(
        "--reference",
        type=Path,
        help="the reference snapshot's tiles (default: the model's training data version, from the DVC remote)",
    )
    p.add_argument("--out", type=Path, required=True, help="where monitor.json, report.html and the plots go")
    p.add_argument("--scores", type=Path, help="tasks.screen's scores.parquet of the new snapshot")
    p.add_argument("--reference-scores", type=Path, help="... and of the reference, by the same model version")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered version (default: {DEFAULT_MODEL})")
    p.add_argument("--no-model", action="store_true", help="input and context drift only: no scores, no decay")
    p.add_argument("--snapshot", help="lineage: the new snapshot (default: $CLOUDSCREEN_SNAPSHOT)")
    p.add_argument("--data-version", help="lineage: its data version (default: $CLOUDSCREEN_DATA_VERSION)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    params = load_section("monitor", MonitorParams, args.params, args.overrides)
    with cli.stdout_to_stderr():
        result = monitor(
            tiles=args.tiles,
            out=args.out,
            params=params,
            reference=args.reference,
            model=None if args.no_model else args.model,
            scores=args.scores,
            reference_scores=args.reference_scores,
            lineage=tracking.Lineage.from_environment(snapshot=args.snapshot, data_version=args.data_version),
        )
    print(json.dumps({k: result.verdict[k] for k in ("decision", "reasons", "drifted", "mlflow_run_id")}, indent=2))


if __name__ == "__main__":
    cli.run(main)
