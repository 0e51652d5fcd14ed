"""Hyperparameter search: optuna over the learning rate (log-uniform) and the optimizer, each trial a nested MLflow run.

`python -m tasks.search --manifest M --tiles DIR` opens a parent run (`cloudscreen.kind=search`, the lineage tags)
and runs `search.trials` trials of optuna's TPE sampler, seeded, so the same params and data give the same trials.
Each trial is a whole tasks.train run for `search.epochs` epochs with the trial's learning rate and optimizer,
nested under the parent (`mlflow.parentRunId`), tagged `cloudscreen.kind=trial` and named `trial-<n>`; every other
setting, the weight initialisation seed included, is the train section's, so trials differ only in what is searched.
The objective is a trial's `search.metric`: one of the `best_val_*` metrics tasks.train logs, taken at the epoch
whose weights EarlyStopping keeps (the lowest val_loss); loss is minimised, the others are maximised.

The parent records the search space, the best trial's params as `best_learning_rate`, `best_optimizer`,
`best_trial` and `best_run_id`, the best trial's `best_val_*` metrics under their own names, the trials' summed
`cost_usd`, and `search/trials.parquet` (optuna's trials table, with each trial's run id) and
`search/objective_vs_learning_rate.png` (the objective against the learning rate, one series per optimizer).

The search registers nothing. A trial trains for a few epochs only, and the `challenger` alias is the gate's input:
every registered version should be a full training run recorded under the train section's params, so the
challenger always comes from one path, tasks.train. Retrain with the best params
(`python -m tasks.train --set train.learning_rate=<best_learning_rate> --set train.optimizer=<best_optimizer>`); the
best trial's model is logged in its run (`runs:/<best_run_id>/model`) for a look, not registered.

No pruner: pruning needs each epoch's value while the trial trains, which tasks.train does not expose to callers,
and with a few epochs per trial it would save little.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
from pydantic import Field, model_validator

from tasks.lib import cli, inputs, tracking
from tasks.lib.config import StepParams, load_section
from tasks.lib.files import write_json
from tasks.lib.model import ModelParams
from tasks.lib.training_runs import CostParams, read_splits
from tasks.train import TrainParams, train

log = logging.getLogger(__name__)

SEARCH_DIR = "search"  # the parent run's artifact directory
TRIALS_FILE = "trials.parquet"
PLOT_FILE = "objective_vs_learning_rate.png"
KIND_SEARCH = "search"
KIND_TRIAL = "trial"
OPTIMIZERS = get_args(TrainParams.model_fields["optimizer"].annotation)  # what tasks.train can build
Objective = Literal["best_val_loss", "best_val_accuracy", "best_val_precision", "best_val_recall", "best_val_auc"]


class SearchParams(StepParams):
    trials: int = Field(gt=0)
    epochs: int = Field(gt=0)
    learning_rate_min: float = Field(gt=0)
    learning_rate_max: float = Field(gt=0)
    optimizers: list[str] = Field(min_length=1)
    metric: Objective
    seed: int

    @model_validator(mode="after")
    def _consistent(self) -> SearchParams:
        if self.learning_rate_min >= self.learning_rate_max:
            raise ValueError(
                f"learning_rate_min {self.learning_rate_min} must be below learning_rate_max {self.learning_rate_max}"
            )
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"optimizers {unknown} unknown; tasks.train builds {', '.join(OPTIMIZERS)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers {self.optimizers} lists one twice")
        return self

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "minimize" if self.metric == "best_val_loss" else "maximize"


@dataclass(frozen=True)
class SearchResult:
    run_id: str  # the parent run
    trials: int  # completed trials (a diverged trial, whose metric is NaN, counts as failed)
    best_run_id: str | None  # None when no trial completed
    best_params: dict[str, Any] = field(default_factory=dict)  # learning_rate, optimizer
    best_value: float | None = None


def search(
    *,
    manifest: Path,
    tiles: Path,
    params: SearchParams,
    train_params: TrainParams,
    model_params: ModelParams,
    cost: CostParams,
    lineage: tracking.Lineage,
) -> SearchResult:
    """Run the search and record it as one MLflow parent run with a nested run per trial.

    Args:
        manifest: a tasks.sample manifest; trials train on its train split and are scored on its val split.
        tiles: the tile step's output the manifest points into.
        params: the `search` section: trials, search space, epochs per trial, objective, sampler seed.
        train_params: the `train` section; each trial overrides its learning_rate, optimizer and epochs.

    Raises:
        InputError: the manifest or tiles cannot feed training.
        ConfigError: the cost table has no price for the configured machine (or the environment's).
    """
    import mlflow
    import optuna

    read_splits(manifest, train_params.max_train_patches)  # bad input or config fails before any run opens
    inputs.open_tiles(tiles)
    cost.from_environment()
    log.info(
        "searching %d trials of %d epoch(s) on %s: learning rate %g..%g (log), optimizers %s, %s %s",
        params.trials,
        params.epochs,
        manifest,
        params.learning_rate_min,
        params.learning_rate_max,
        params.optimizers,
        params.direction,
        params.metric,
    )
    tags = lineage.tags() | {tracking.TAG_KIND: KIND_SEARCH}
    started = time.monotonic()
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(train_params.experiment),  # the one tasks.train puts the trials in
        run_name="search",
        tags=tags,
        nested=mlflow.active_run() is not None,
    ) as parent:
        mlflow.log_params(
            {f"search_{k}": v for k, v in params.model_dump().items()}
            | {"search_direction": params.direction, "search_sampler": "TPESampler"}
            | {"manifest": str(manifest), "tiles": str(tiles), "dataset": manifest.parent.name}
        )

        def objective(trial: optuna.Trial) -> float:
            overrides = {
                "learning_rate": trial.suggest_float(
                    "learning_rate", params.learning_rate_min, params.learning_rate_max, log=True
                ),
                "optimizer": trial.suggest_categorical("optimizer", params.optimizers),
                "epochs": params.epochs,
            }
            result = train(
                manifest=manifest,
                tiles=tiles,
                params=train_params.model_copy(update=overrides),
                model_params=model_params,
                cost=cost,
                lineage=lineage,
                register=False,
                run_name=f"trial-{trial.number}",
                kind=KIND_TRIAL,
            )
            trial.set_user_attr("run_id", result.run_id)
            trial.set_user_attr("cost_usd", result.metrics.get("cost_usd", 0.0))
            return result.metrics[params.metric]

        study = optuna.create_study(
            study_name=parent.info.run_id,
            direction=params.direction,
            sampler=optuna.samplers.TPESampler(seed=params.seed),
        )
        study.optimize(objective, n_trials=params.trials)
        result = _record(study, params, parent.info.run_id, time.monotonic() - started)
    log.info(
        "search run %s: %d of %d trials completed; best %s = %s with %s (run %s)",
        result.run_id,
        result.trials,
        params.trials,
        params.metric,
        result.best_value,
        result.best_params,
        result.best_run_id,
    )
    return result


def _record(study: Any, params: SearchParams, run_id: str, seconds: float) -> SearchResult:
    """Log the outcome on the active (parent) run: best params and metrics, cost, the trials table and plot."""
    import mlflow
    import optuna

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trials = study.trials_dataframe()
    mlflow.log_metrics(
        {
            "trials_completed": len(completed),
            "trials_failed": len(study.trials) - len(completed),
            "search_seconds": seconds,
            "cost_usd": sum(t.user_attrs.get("cost_usd", 0.0) for t in study.trials),
        }
    )
    best = study.best_trial if completed else None
    with tempfile.TemporaryDirectory() as tmp:
        trials.to_parquet(Path(tmp) / TRIALS_FILE, index=False)
        objective_figure(trials, params.metric, best.number if best else None).savefig(Path(tmp) / PLOT_FILE, dpi=120)
        mlflow.log_artifacts(tmp, artifact_path=SEARCH_DIR)
    if best is None:
        log.warning("no trial of search run %s completed: nothing to recommend", run_id)
        return SearchResult(run_id, 0, None)
    best_run_id = best.user_attrs["run_id"]
    mlflow.log_params(
        {f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number, "best_run_id": best_run_id}
    )
    best_metrics = mlflow.get_run(best_run_id).data.metrics
    mlflow.log_metrics({k: v for k, v in best_metrics.items() if k.startswith("best_val_")})
    return SearchResult(run_id, len(completed), best_run_id, dict(best.params), float(best.value))


def objective_figure(trials: pd.DataFrame, metric: str, best: int | None) -> Any:
    """The objective against the learning rate (log scale), one series per optimizer, the best trial ringed.

    Args:
        trials: optuna's trials_dataframe() (number, value, params_learning_rate, params_optimizer, state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # this figure's own canvas: matplotlib's global backend is untouched
    ax = fig.add_subplot()
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials.iloc[0:0]
    for optimizer, group in done.groupby("params_optimizer"):
        ax.scatter(group["params_learning_rate"], group["value"], label=str(optimizer), alpha=0.8)
    top = done[done["number"] == best]
    if len(top):
        ax.scatter(top["params_learning_rate"], top["value"], s=200, facecolors="none", edgecolors="black",
                   label=f"best (trial {best})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(done)} completed trials of {len(trials)}")
    if len(done):
        ax.legend()
    return fig


def main() -> None:
    p = cli.parser("Search the learning rate and optimizer with optuna; each trial a nested MLflow run of tasks.train.")
    cli.add_training_inputs(p)
    p.add_argument(
        "--xcom-out",
        type=Path,
        help='write {"run_id", "trials", "best_run_id", "best_params"} as JSON here (the training DAG\'s search mode)',
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides our log

    def body() -> None:
        with cli.stdout_to_stderr():
            result = search(
                manifest=args.manifest,
                tiles=args.tiles,
                params=load_section("search", SearchParams, args.params, args.overrides),
                train_params=load_section("train", TrainParams, args.params, args.overrides),
                model_params=load_section("model", ModelParams, args.params, args.overrides),
                cost=load_section("cost", CostParams, args.params, args.overrides),
                lineage=tracking.Lineage.from_environment(snapshot=args.snapshot, data_version=args.data_version),
            )
        if args.xcom_out:
            write_json(
                args.xcom_out,
                {"run_id": result.run_id, "trials": result.trials, "best_run_id": result.best_run_id}
                | {"best_params": result.best_params},
            )
        print(result.run_id)

    cli.run(body)


if __name__ == "__main__":
    main()
