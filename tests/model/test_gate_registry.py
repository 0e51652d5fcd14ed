"""tasks.gate against a real MLflow registry (SQLite in a temporary directory, no mocks): bootstrap, promotion,
rejection, a forced promotion, rollback, a model that fails one large slice, the CLI, and what a verdict leaves on
the run and in the registry.

The models are lookup tables from a patch's pixels to a score (0.9 cloud, 0.1 clear), evaluated by tasks.evaluate:
each test chooses patch by patch what a model gets wrong, so every verdict is known in advance. The data is a small
mirror sampled with a large test split (150 patches), enough for McNemar's test and for slices of 20 patches or more.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModel

from tasks.evaluate import EvaluateParams, evaluate
from tasks.gate import gate, rollback
from tasks.lib.config import load_section
from tasks.lib.errors import GateError
from tasks.lib.gate_rules import BOOTSTRAP, FORCED, PROMOTE, REJECT, GateParams
from tasks.lib.metrics import OPERATING_THRESHOLD
from tasks.lib.registry import TAG_GATE_BY, TAG_GATE_OVERRIDE, TAG_GATE_REPLACED, TAG_GATE_ROLLED_BACK
from tasks.lib.tiles import load_patches
from tasks.lib.tracking import (
    CHALLENGER,
    CHAMPION,
    GATE_FILE,
    MODEL_ARTIFACT,
    PREVIOUS_CHAMPION,
    TAG_GATE_DECISION,
    TAG_GATE_REASONS,
    TAG_OPERATING_THRESHOLD,
    run_model_uri,
)
from tasks.mirror import build_mirror
from tasks.sample import NATURAL_FILE, SampleParams, sample
from tasks.tile import TileParams, tile
from tasks.train import TrainParams
from tests.conftest import REPO, extract, mirror_params

pytestmark = pytest.mark.slow

NAME = load_section("train", TrainParams).registered_model  # the configured name, as the CLI reads it
CLOUD, CLEAR = 0.9, 0.1
SLICE_RULES = [
    "gate.slice_floors={recall: 0.85, precision: 0.8}",
    "gate.min_slice_patches=10",
    "gate.floors={test_op_recall: 0.92, test_op_precision: 0.85, test_roc_auc: 0.9}",
]


def rules(*overrides: str) -> GateParams:
    return load_section("gate", GateParams, overrides=overrides)


def digest(patch: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(patch, dtype=np.uint16).tobytes(), digest_size=16).hexdigest()


def draw(patch_id: str, salt: str) -> float:
    """A fixed pseudo-random number in [0, 1) per patch and salt."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{patch_id}".encode(), digest_size=8).digest(), "big") / 2**64


class LookupModel(PythonModel):
    """Scores a patch by looking its pixels up: a stand-in classifier whose every mistake the test chose."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def predict(self, context, model_input, params=None):
        return np.array([self.table.get(digest(p), 0.5) for p in np.asarray(model_input)], dtype=np.float32)


@dataclass(frozen=True)
class GateData:
    tiles: Path
    manifest: Path
    patches: pd.DataFrame  # the val, test and natural patches: patch_id, label, split, country, digest

    def table(self, *, false_alarms: float = 0.0, misses: float = 0.0, flag: str | None = None, seed: int = 0):
        """Scores of a model that flags a share of clear patches (and every clear patch of country `flag`) and
        misses a share of cloud patches; right on all others."""
        table = {}
        for row in self.patches.itertuples():
            cloud = row.label == 1
            if cloud and draw(row.patch_id, f"miss{seed}") < misses:
                cloud = False
            elif not cloud and (draw(row.patch_id, f"alarm{seed}") < false_alarms or row.country == flag):
                cloud = True
            table[row.digest] = CLOUD if cloud else CLEAR
        return table


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory) -> GateData:
    out = tmp_path_factory.mktemp("gate_data")
    mirror = build_mirror(out=out / "mirror", params=mirror_params(patches=600, seed=23), workers=1)
    tiles = tile(
        patches=extract(mirror.archive, out / "extracted"),
        out=out / "tiles",
        params=load_section("tile", TileParams, overrides=["tile.workers=1", "tile.shard_patches=256"]),
    ).out
    # No training here: most of the set goes to val and test, where the gate looks.
    fractions = ["sample.train_fraction=0.2", "sample.val_fraction=0.3", "sample.test_fraction=0.5"]
    params = load_section("sample", SampleParams, overrides=["sample.small_per_class=150", *fractions])
    manifest = sample(tiles=tiles, out=out / "samples", dataset="small", params=params).manifest_path
    frame = pd.read_parquet(manifest)
    frame = pd.concat([frame[frame["split"] != "train"], pd.read_parquet(manifest.parent / NATURAL_FILE)])
    frame = frame.drop_duplicates("patch_id").reset_index(drop=True)
    frame["digest"] = [digest(p) for p in load_patches(tiles, frame["patch_id"].tolist())]
    assert frame["digest"].is_unique
    return GateData(tiles=tiles, manifest=manifest, patches=frame)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    import cloudpickle

    root = tmp_path_factory.mktemp("gate_mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    # The models' class lives in this test module, which a CLI subprocess cannot import: pickle it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)  # the SQLite store keeps artifacts under ./mlruns
        yield root
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def register(gate_data, tracking):
    """register(table, name=..., evaluated=True, cost=0.5) → run id: log a lookup model like the trainer does
    (registered with alias challenger, cost_usd logged) and evaluate it with tasks.evaluate."""
    import mlflow

    evaluate_params = load_section("evaluate", EvaluateParams)

    def make(table: dict[str, float], *, name: str = NAME, evaluated: bool = True, cost: float = 0.5) -> str:
        with mlflow.start_run() as run:
            mlflow.log_metric("cost_usd", cost)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=LookupModel(table),
                registered_model_name=name,
                pip_requirements=["mlflow", "numpy"],  # explicit: inferring them reloads the model
            )
        mlflow.MlflowClient().set_registered_model_alias(name, CHALLENGER, str(info.registered_model_version))
        if evaluated:
            run_id = run.info.run_id
            evaluate(
                model_uri=run_model_uri(run_id),
                manifest=gate_data.manifest,
                tiles=gate_data.tiles,
                params=evaluate_params,
                log_to_run=run_id,
            )
        return run.info.run_id

    return make


def registry(name: str = NAME) -> dict:
    """What a gate may change: the aliases and every version's tags."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    return {
        "aliases": dict(client.get_registered_model(name).aliases),
        "tags": {str(v.version): v.tags for v in versions},
    }


def run_record(run_id: str) -> tuple[dict, dict]:
    """gate.json and the tags of a run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    verdict = json.loads(Path(client.download_artifacts(run_id, GATE_FILE)).read_text())
    return verdict, client.get_run(run_id).data.tags


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tasks.gate", "--params", str(REPO / "params.yaml"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), timeout=300)


@dataclass(frozen=True)
class Chain:
    """One registry's history: mediocre v1 rejected then forced in, perfect v2 promoted, bad v3 rejected (by the
    CLI), then one rollback (by the CLI) and a second one that has nowhere to go."""

    runs: dict[str, str]
    verdicts: dict[str, object]
    states: dict[str, dict]
    cli_reject: subprocess.CompletedProcess
    cli_rollback: subprocess.CompletedProcess
    second_rollback: GateError


@pytest.fixture(scope="module")
def chain(gate_data, register, tracking) -> Chain:
    params = rules()
    runs, verdicts, states = {}, {}, {}
    runs["mediocre"] = register(gate_data.table(false_alarms=0.25, seed=1))
    states["before"] = registry()
    verdicts["bootstrap_rejected"] = gate(run_id=runs["mediocre"], params=params, registered_model=NAME)
    states["after_reject"] = registry()
    verdicts["forced"] = gate(
        run_id=runs["mediocre"], params=params, registered_model=NAME, force=True, reason="seed the demo", by="alice"
    )
    states["after_forced"] = registry()
    runs["perfect"] = register(gate_data.table())
    verdicts["promoted"] = gate(run_id=runs["perfect"], params=params, registered_model=NAME)
    states["after_promote"] = registry()
    runs["worse"] = register(gate_data.table(false_alarms=0.45, misses=0.45, seed=2))
    states["before_cli"] = registry()
    cli_reject = cli("--run-id", runs["worse"], cwd=tracking)
    states["after_cli"] = registry()
    cli_rollback = cli("rollback", "--reason", "v2 misbehaves in production", "--by", "bob", cwd=tracking)
    states["after_rollback"] = registry()
    with pytest.raises(GateError) as second:
        rollback(registered_model=NAME)
    return Chain(runs, verdicts, states, cli_reject, cli_rollback, second.value)


def test_a_first_model_below_the_floors_is_rejected_and_the_registry_is_untouched(chain):
    verdict = chain.verdicts["bootstrap_rejected"]
    assert verdict.decision == REJECT and verdict.champion is None
    assert any(
        r.startswith("test_roc_auc 0.8") and "below the floor 0.9500 (no champion)" in r for r in verdict.reasons
    )
    assert chain.states["after_reject"] == chain.states["before"]
    assert CHAMPION not in chain.states["after_reject"]["aliases"]


def test_a_forced_promotion_records_who_why_and_what_it_overrode(chain):
    verdict = chain.verdicts["forced"]
    assert verdict.decision == FORCED
    assert verdict.forced == {"by": "alice", "reason": "seed the demo"}
    assert verdict.reasons[0] == "Promotion forced by alice: seed the demo"
    assert any(r.startswith("Overridden: test_roc_auc") for r in verdict.reasons[1:])
    state = chain.states["after_forced"]
    assert state["aliases"] == {CHALLENGER: 1, CHAMPION: 1}
    tags = state["tags"]["1"]
    assert tags[TAG_GATE_DECISION] == FORCED and tags[TAG_GATE_BY] == "alice"
    assert tags[TAG_GATE_OVERRIDE] == "seed the demo" and tags[TAG_GATE_REPLACED] == ""


def test_a_better_challenger_is_promoted_and_the_old_champion_kept_as_previous(chain):
    verdict = chain.verdicts["promoted"]
    assert verdict.decision == PROMOTE, verdict.reasons
    assert verdict.champion["version"] == "1" and verdict.challenger["version"] == "2"
    assert verdict.challenger["test_op_precision"] > verdict.champion["test_op_precision"]
    assert verdict.paired["champion_only"] == 0 and verdict.paired["p_value"] < 0.05
    assert verdict.registry == {"champion": "2", "previous_champion": "1", "changed": True}
    state = chain.states["after_promote"]
    assert state["aliases"] == {CHALLENGER: 2, CHAMPION: 2, PREVIOUS_CHAMPION: 1}
    assert state["tags"]["2"][TAG_GATE_DECISION] == PROMOTE and state["tags"]["2"][TAG_GATE_REPLACED] == "1"
    # The threshold the challenger was judged at travels with the version: screening and serving decide at it.
    from mlflow import MlflowClient

    evaluated = MlflowClient().get_run(chain.runs["perfect"]).data.metrics[OPERATING_THRESHOLD]
    assert float(state["tags"]["2"][TAG_OPERATING_THRESHOLD]) == pytest.approx(evaluated)
    assert TAG_OPERATING_THRESHOLD not in chain.states["after_cli"]["tags"]["3"]  # a rejected challenger gets none


def test_the_verdict_is_recorded_on_the_challengers_run(chain):
    recorded, tags = run_record(chain.runs["perfect"])
    assert recorded == chain.verdicts["promoted"].to_json()
    assert set(recorded) >= {"decision", "reasons", "challenger", "champion", "rules", "checks", "paired", "data"}
    assert recorded["rules"] == rules().model_dump(mode="json")
    assert recorded["data"]["manifest"].endswith("manifest.parquet") and not recorded["data"]["challenger_reevaluated"]
    assert tags[TAG_GATE_DECISION] == PROMOTE and tags[TAG_GATE_REASONS] == "\n".join(recorded["reasons"])
    # The first run's gate.json is the last verdict on it: the forced one.
    assert run_record(chain.runs["mediocre"])[0]["decision"] == FORCED


def test_the_cli_exits_0_on_reject_prints_the_verdict_and_changes_nothing(chain):
    done = chain.cli_reject
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["decision"] == REJECT
    assert printed["challenger"]["version"] == "3" and printed["champion"]["version"] == "2"
    failed = {c["metric"] for c in printed["checks"] if not c["passed"]}
    assert {"test_op_precision", "test_roc_auc", "natural_op_precision", "mcnemar_p"} <= failed
    assert any(
        r.startswith("test_op_precision 0.5000 is below the floor 0.8500 (champion 1.0000)") for r in printed["reasons"]
    )
    assert any("regressed beyond the tolerance 0.0100 from the champion's 1.0000" in r for r in printed["reasons"])
    assert chain.states["after_cli"] == chain.states["before_cli"]
    recorded, tags = run_record(chain.runs["worse"])
    assert recorded == printed and tags[TAG_GATE_DECISION] == REJECT


def test_rollback_restores_the_previous_champion_and_walks_the_chain(chain):
    done = chain.cli_rollback
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {
        "registered_model": NAME,
        "rolled_back": "2",
        "champion": "1",
        "previous_champion": None,  # version 1 was the first champion
        "by": "bob",
        "reason": "v2 misbehaves in production",
    }
    state = chain.states["after_rollback"]
    assert state["aliases"] == {CHALLENGER: 3, CHAMPION: 1}
    assert state["tags"]["2"][TAG_GATE_ROLLED_BACK] == "by bob: v2 misbehaves in production"
    assert "first champion" in str(chain.second_rollback)


def test_a_rerun_after_a_promotion_returns_the_recorded_verdict(chain):
    # Registry state after the chain: version 1 is champion again, and its run's last verdict is the forced one.
    again = gate(run_id=chain.runs["mediocre"], params=rules(), registered_model=NAME)
    assert again.to_json() == chain.verdicts["forced"].to_json()


def test_the_first_run_bootstraps(gate_data, register):
    run_id = register(gate_data.table(), name="gate-first")
    verdict = gate(run_id=run_id, params=rules(), registered_model="gate-first")
    assert verdict.decision == BOOTSTRAP, verdict.reasons
    assert verdict.champion is None and verdict.paired is None
    assert all(c["passed"] for c in verdict.checks)
    assert any("test_op_recall 1.0000 meets the floor 0.9000 (no champion)" in r for r in verdict.reasons)
    state = registry("gate-first")
    assert state["aliases"] == {CHALLENGER: 1, CHAMPION: 1}
    assert state["tags"]["1"][TAG_GATE_DECISION] == BOOTSTRAP and state["tags"]["1"][TAG_GATE_REPLACED] == ""


@pytest.fixture(scope="module")
def slice_case(gate_data, register):
    """A champion with false alarms everywhere, and a challenger right everywhere but on the clear patches of one
    large country slice, enough of them that the slice is significantly below its precision floor: overall it
    wins."""
    from mlflow import MlflowClient

    manifest = pd.read_parquet(gate_data.manifest)
    test = manifest[manifest["split"] == "test"]
    sizes = test.groupby("country")["label"].agg(patches="size", cloud="sum")
    clear = sizes["patches"] - sizes["cloud"]
    # Slices the rules judge whose clear patches, all flagged, keep the challenger above the global precision floor
    # (and below the champion's 40 % of every clear patch, so it wins overall); of those, the one whose precision
    # falls furthest, so the slice is significantly below its floor.
    fits = (sizes["patches"] >= 10) & (clear > 0) & (clear <= 0.15 * sizes["cloud"].sum())
    country = (sizes["cloud"] / sizes["patches"])[fits].idxmin()
    name = "gate-slices"
    register(gate_data.table(false_alarms=0.4, seed=4), name=name, evaluated=False)
    MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    run_id = register(gate_data.table(flag=country), name=name)
    return name, run_id, country


def test_a_model_that_wins_overall_but_fails_a_large_slice_is_rejected(slice_case):
    name, run_id, country = slice_case
    before = registry(name)
    verdict = gate(run_id=run_id, params=rules(*SLICE_RULES), registered_model=name)
    assert verdict.decision == REJECT
    failed = [c for c in verdict.checks if not c["passed"]]
    assert {c["rule"] for c in failed} == {"slice_floor"}  # every other rule passed: it wins overall
    assert verdict.challenger["test_op_precision"] > verdict.champion["test_op_precision"]
    assert verdict.paired["challenger_only"] > verdict.paired["champion_only"] and verdict.paired["p_value"] < 0.05
    assert f"test_op_precision[country={country}]" in {c["metric"] for c in failed}
    assert any(
        r.startswith(f"slice country={country} (") and "precision" in r and "one-sided binomial p" in r
        for r in verdict.reasons
    )
    assert registry(name) == before


def test_a_new_manifest_re_evaluates_both_models_on_it(slice_case, gate_data, tmp_path):
    name, run_id, _ = slice_case
    # Fresh data: the same patches minus every other test patch (and natural patch).
    frame = pd.read_parquet(gate_data.manifest)
    natural = pd.read_parquet(gate_data.manifest.parent / NATURAL_FILE)
    keep = frame[(frame["split"] != "test") | (frame.index % 2 == 0)]
    keep.to_parquet(tmp_path / "manifest.parquet", index=False)
    natural[natural["patch_id"].isin(keep["patch_id"]) | (natural["label"] == 0)].to_parquet(
        tmp_path / NATURAL_FILE, index=False
    )
    verdict = gate(
        run_id=run_id,
        params=rules(*SLICE_RULES),
        registered_model=name,
        manifest=tmp_path / "manifest.parquet",
        tiles=gate_data.tiles,
    )
    assert verdict.data["challenger_reevaluated"] is True
    assert verdict.paired["patches"] == int((keep["split"] == "test").sum())


def test_a_run_never_evaluated_is_an_error_not_a_verdict(gate_data, register, tracking):
    run_id = register(gate_data.table(), name="gate-unevaluated", evaluated=False)
    with pytest.raises(GateError, match=f"run {run_id} was never evaluated"):
        gate(run_id=run_id, params=rules(), registered_model="gate-unevaluated")
    done = cli("--run-id", run_id, "--set", "train.registered_model=gate-unevaluated", cwd=tracking)
    assert done.returncode == 2 and "never evaluated" in done.stderr and done.stdout == ""


def test_force_without_a_reason_is_an_error(tmp_path):
    done = cli("--run-id", "0" * 32, "--force", cwd=tmp_path)
    assert done.returncode == 2 and "--force needs --reason" in done.stderr


def test_an_unknown_run_is_an_error(tracking):
    with pytest.raises(GateError, match="run 'nope'"):
        gate(run_id="nope", params=rules(), registered_model=NAME)
