"""Draw the balanced small and large cloud / no_cloud sets and their natural-prevalence evaluation sets.

Reads the tile step's `metadata.parquet` and `index.parquet` under TILES and writes, for one dataset (small or
large), `OUT/<dataset>/`:
- `manifest.parquet`: patch_id, label (1 = cloud, 0 = no_cloud), split (train/val/test), shard, offset, season,
  country;
- `natural.parquet`: the same columns for the natural-prevalence evaluation set (split is always test): the dataset's
  test cloud patches plus no_cloud patches at the real-world cloud share, none of them in a train or val split;
- `summary.json`: counts per split and class, the natural set's achieved prevalence, params, seed, input fingerprint.

How patches are drawn: every patch gets a pseudo-random key, blake2b(seed, patch_id), so the draw depends neither on
the row order of the input nor on anything else drawn before. Each class is put in key order (interleaved by season
and country when those columns exist, so that every prefix of the order mirrors the class's season/country mix) and a
set takes a prefix of it: small the first `small_per_class` of each class, large every cloud patch and as many
no_cloud ones. The split of a patch is a function of its position in that order alone (a fixed train/val/test
sequence whose every prefix holds each split's share within one patch), so small ⊂ large and a patch in both has the
same split in both.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset
from pydantic import Field, model_validator

from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ConfigError, SampleError
from tasks.lib.files import atomic_dir, path_digest, write_json
from tasks.lib.outputs import completed
from tasks.lib.tiles import INDEX_FILE, METADATA_FILE

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
NATURAL_FILE = "natural.parquet"
SUMMARY_FILE = "summary.json"
DATASETS = ("small", "large")
SPLITS = ("train", "val", "test")
CLASSES = {"cloud": 1, "no_cloud": 0}  # class name → label
STRATA = ("season", "country")  # interleave the draw order by these columns when the metadata has them
COLUMNS = ("patch_id", "label", "split", "shard", "offset", "season", "country")
_FRACTION_DENOMINATOR = 10**6  # split fractions are taken as exact ratios with at most this denominator


class SampleParams(StepParams):
    seed: int
    small_per_class: int = Field(ge=1)
    train_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    natural_prevalence: float = Field(gt=0, lt=1)
    exclude_snow: bool
    min_class_fraction: float = Field(ge=0, le=0.5)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SampleParams:
        if sum(_split_weights(self)) != 1:
            total = self.train_fraction + self.val_fraction + self.test_fraction
            raise ValueError(f"train_fraction + val_fraction + test_fraction is {total:g}, expected 1")
        return self


@dataclass(frozen=True)
class SampleResult:
    manifest_path: Path
    natural_path: Path
    summary_path: Path
    summary: dict[str, Any]
    skipped: bool  # an identical earlier run's output was reused


# --- the draw (pure) ----------------------------------------------------------------------------------------------


def _split_weights(params: SampleParams) -> tuple[Fraction, ...]:
    """The split fractions as exact ratios, in SPLITS order."""
    fractions = (params.train_fraction, params.val_fraction, params.test_fraction)
    return tuple(Fraction(f).limit_denominator(_FRACTION_DENOMINATOR) for f in fractions)


def _split_sequence(n: int, params: SampleParams) -> np.ndarray:
    """Split names for positions 0 … n-1 of a class's draw order.

    Position i goes to the split furthest below its share of the first i+1 positions (ties: train, val, test), in
    exact arithmetic. Every prefix therefore holds each split's share within one patch, and since the answer for a
    position never depends on n, a prefix of a set (small) gets the same splits as the whole (large).
    """
    weights = _split_weights(params)
    denominator = int(np.lcm.reduce([w.denominator for w in weights]))
    quota = [int(w * denominator) for w in weights]
    counts = [0] * len(SPLITS)
    out = np.empty(n, dtype=object)
    for i in range(n):
        behind = [q * (i + 1) - denominator * c for q, c in zip(quota, counts, strict=True)]
        s = behind.index(max(behind))
        counts[s] += 1
        out[i] = SPLITS[s]
    return out


def _keys(patch_ids: pd.Series, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per patch from (seed, patch_id) alone."""
    salt = str(seed).encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8, key=salt).digest(), "big")
            for p in patch_ids.tolist()
        ),
        dtype=np.uint64,
        count=len(patch_ids),
    )


def _draw_order(pool: pd.DataFrame, strata: list[str]) -> pd.DataFrame:
    """`pool` (sorted by patch_id) in draw order: by key, or, with strata, interleaved so that every prefix mirrors
    the strata mix.

    Within a stratum of size N, the patch of key rank r is placed at (r + jitter) / N, the jitter coming from the
    key's low bits (independent of its rank, which the high bits decide). Equal keys keep patch_id order.
    """
    pool = pool.iloc[np.argsort(pool["key"].to_numpy(), kind="stable")].reset_index(drop=True)
    if not strata or pool.empty:
        return pool
    groups = pool.groupby(strata, dropna=False, sort=False)
    rank = groups.cumcount().to_numpy()
    size = groups["patch_id"].transform("size").to_numpy()
    jitter = (pool["key"].to_numpy() & np.uint64(0xFFFFFFFF)) / 2.0**32
    position = (rank + jitter) / size
    return pool.iloc[np.lexsort((pool.index.to_numpy(), position))].reset_index(drop=True)


def _labelled(pool: pd.DataFrame, label: int, splits: np.ndarray | str) -> pd.DataFrame:
    return pd.DataFrame({"patch_id": pool["patch_id"].to_numpy(), "label": np.int8(label), "split": splits})


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by split (train, val, test), then patch_id: one canonical order for every output."""
    split_rank = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    order = np.lexsort((frame["patch_id"].to_numpy(), split_rank.to_numpy()))
    out = frame.iloc[order].reset_index(drop=True)
    return out.astype({"patch_id": "str", "label": "int8", "split": "str"})


def _check_metadata(metadata: pd.DataFrame, params: SampleParams) -> None:
    missing = [c for c in ("patch_id", "cloud") + (("snow",) if params.exclude_snow else ()) if c not in metadata]
    if missing:
        why = " (exclude_snow is set)" if missing == ["snow"] else ""
        raise SampleError(f"metadata lacks column(s) {', '.join(missing)}{why}")
    duplicated = metadata["patch_id"][metadata["patch_id"].duplicated()]
    if len(duplicated):
        raise SampleError(f"metadata lists {len(duplicated)} patch_id(s) more than once, e.g. {duplicated.iloc[0]}")
    for column in ("cloud", "snow") if params.exclude_snow else ("cloud",):
        values = metadata[column]
        if values.isna().any():
            raise SampleError(f"metadata column {column} has {int(values.isna().sum())} missing values")
        if not pd.api.types.is_bool_dtype(values) and not values.isin([0, 1]).all():
            bad = values[~values.isin([0, 1])].iloc[0]
            raise SampleError(f"metadata column {column} holds {bad!r}; expected booleans (or 0/1)")


def _check_class_shares(sets: dict[str, pd.DataFrame], params: SampleParams) -> None:
    for name, frame in sets.items():
        table = pd.crosstab(frame["split"], frame["label"]).reindex(index=SPLITS, columns=[1, 0], fill_value=0)
        for split in SPLITS:
            total = int(table.loc[split].sum())
            for cls, label in CLASSES.items():
                n = int(table.loc[split, label])
                if total == 0 or n < params.min_class_fraction * total:
                    raise SampleError(
                        f"the {name} set's {split} split holds {n} {cls} patches of {total}; every class must be "
                        f"at least min_class_fraction ({params.min_class_fraction:.0%}) of a non-empty split: ask "
                        f"for more patches (small_per_class) or a larger {split}_fraction"
                    )


def build_sets(metadata: pd.DataFrame, params: SampleParams) -> dict[str, pd.DataFrame]:
    """Draw the balanced sets and their natural-prevalence evaluation sets from a table of patches.

    Args:
        metadata: one row per patch with `patch_id` and `cloud` (bool or 0/1); `snow` is needed when `exclude_snow`
            is set; `season` and `country`, when present, interleave the draw (see the module docstring). Row order
            does not matter.
        params: the `sample` section.

    Returns:
        Four frames with columns patch_id, label (int8: 1 = cloud, 0 = no_cloud) and split, rows ordered by split
        (train, val, test) then patch_id:
        - "small": `small_per_class` cloud and as many no_cloud patches, split per class by the split fractions;
        - "large": every cloud patch and as many no_cloud ones, split the same way; small ⊂ large, same splits;
        - "small_natural", "large_natural": the set's test cloud patches plus no_cloud patches at
          `natural_prevalence`, split "test". Their no_cloud patches are in no train or val split of either set, and
          are drawn from all no_cloud patches, snow included even with `exclude_snow` (the default prevalence is the
          share over the whole archive, snow included). If too few such patches remain, all of them are used, a
          warning is logged and the achieved prevalence is what the frame shows. small_natural ⊂ large_natural.

    Raises:
        ConfigError: `small_per_class` is more than the number of cloud patches.
        SampleError: a needed column is missing or has missing values, a patch_id repeats, there are fewer usable
            no_cloud than cloud patches, or a class is below `min_class_fraction` of a split of small or large.
    """
    _check_metadata(metadata, params)
    strata = [c for c in STRATA if c in metadata]
    pool = pd.DataFrame({"patch_id": metadata["patch_id"].astype(str).to_numpy()})
    for column in strata:
        pool[column] = metadata[column].to_numpy()
    pool["cloud"] = metadata["cloud"].astype(bool).to_numpy()
    pool["snow"] = metadata["snow"].astype(bool).to_numpy() if params.exclude_snow else False
    pool = pool.sort_values("patch_id", ignore_index=True)  # one order whatever the input's, for equal keys
    pool["key"] = _keys(pool["patch_id"], params.seed)
    is_cloud, is_snow = pool["cloud"].to_numpy(), pool["snow"].to_numpy()

    cloud = _draw_order(pool[is_cloud], strata)
    no_cloud = _draw_order(pool[~is_cloud & ~is_snow], strata)
    n_cloud, n_small = len(cloud), params.small_per_class
    if n_small > n_cloud:
        raise ConfigError(f"sample.small_per_class is {n_small} but the metadata holds only {n_cloud} cloud patches")
    if len(no_cloud) < n_cloud:
        snow_note = f" after excluding {int((~is_cloud & is_snow).sum())} snow patches" if params.exclude_snow else ""
        raise SampleError(
            f"the large set needs {n_cloud} no_cloud patches (one per cloud patch) but the metadata holds only "
            f"{len(no_cloud)}{snow_note}"
        )

    splits = _split_sequence(n_cloud, params)
    large = pd.concat([_labelled(cloud, 1, splits), _labelled(no_cloud.head(n_cloud), 0, splits)])
    small = pd.concat(
        [_labelled(cloud.head(n_small), 1, splits[:n_small]), _labelled(no_cloud.head(n_small), 0, splits[:n_small])]
    )
    sets = {"small": _ordered(small), "large": _ordered(large)}
    _check_class_shares(sets, params)

    trained = large.loc[large["split"] != "test", "patch_id"]
    eligible = _draw_order(pool[~is_cloud & ~pool["patch_id"].isin(trained).to_numpy()], strata)
    prevalence = params.natural_prevalence
    for name in DATASETS:
        test_cloud = sets[name][(sets[name]["label"] == 1) & (sets[name]["split"] == "test")]
        wanted = round(len(test_cloud) * (1 - prevalence) / prevalence)
        chosen = eligible.head(wanted)
        if len(chosen) < wanted:
            log.warning(
                "%s_natural: %d no_cloud patches outside every train/val split, %d wanted for prevalence %.4f; "
                "using all of them (prevalence %.4f)",
                name,
                len(chosen),
                wanted,
                prevalence,
                len(test_cloud) / (len(test_cloud) + len(chosen)),
            )
        sets[f"{name}_natural"] = _ordered(pd.concat([test_cloud, _labelled(chosen, 0, "test")]))
    return sets


# --- files --------------------------------------------------------------------------------------------------------


def _read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    names = pyarrow.dataset.dataset(path, format="parquet").schema.names  # a file or a partitioned directory
    missing = [c for c in required if c not in names]
    if missing:
        raise SampleError(f"{path}: lacks column(s) {', '.join(missing)}")
    return pd.read_parquet(path, columns=[*required, *(c for c in optional if c in names)])


def _fingerprint(metadata: Path, index: Path, dataset: str, params: SampleParams) -> dict[str, str]:
    digests = {"metadata_sha256": path_digest(metadata, "sha256"), "index_sha256": path_digest(index, "sha256")}
    h = hashlib.sha256(f"{dataset}\n{params.model_dump_json()}\n".encode())
    h.update(json.dumps(digests, sort_keys=True).encode())
    return {"fingerprint": h.hexdigest(), **digests}


def _joined(frame: pd.DataFrame, index: pd.DataFrame, metadata: pd.DataFrame, what: str) -> pd.DataFrame:
    """Add shard and offset from the index and season and country from the metadata."""
    out = frame.merge(index, on="patch_id", how="left", validate="one_to_one")
    absent = out.loc[out["shard"].isna(), "patch_id"]
    if len(absent):
        raise SampleError(f"{len(absent)} patches of the {what} are not in {INDEX_FILE}, e.g. {absent.iloc[0]}")
    out = out.merge(metadata[["patch_id", "season", "country"]], on="patch_id", how="left", validate="one_to_one")
    types = {"shard": "str", "offset": "int64", "season": "str", "country": "str"}
    return out[list(COLUMNS)].astype(types)


def _counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {
        split: {
            cls: int(((frame["split"] == split) & (frame["label"] == label)).sum()) for cls, label in CLASSES.items()
        }
        for split in SPLITS
    }


def sample(*, tiles: Path, out: Path, dataset: str, params: SampleParams) -> SampleResult:
    """Draw one balanced set from the tiles' metadata and write it with its natural set under `out/dataset`.

    The directory is replaced as a whole; re-running with the same input files and params reuses it.

    Args:
        tiles: the tile step's output directory (metadata.parquet, index.parquet).
        out: the samples directory of this snapshot.
        dataset: "small" or "large".
        params: the `sample` section.

    Raises:
        ConfigError: an unknown dataset, or more patches asked for than exist.
        SampleError: an input file or column is missing, or the tiles cannot yield the sets (see `build_sets`).
    """
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    metadata_path, index_path = tiles / METADATA_FILE, tiles / INDEX_FILE
    for path in (metadata_path, index_path):
        if not path.exists():  # a file, or (metadata) a directory of parquet parts
            raise SampleError(f"{path}: not found (expected the tile step's output)")
    target = out / dataset
    result_paths = (target / MANIFEST_FILE, target / NATURAL_FILE, target / SUMMARY_FILE)
    fingerprint = _fingerprint(metadata_path, index_path, dataset, params)
    previous = completed(
        result_paths[2], fingerprint["fingerprint"], requires=result_paths[:2], what=f"the {dataset} set of {tiles}"
    )
    if previous is not None:
        return SampleResult(*result_paths, summary=previous, skipped=True)

    metadata = _read_table(metadata_path, ("patch_id", "cloud", "season", "country"), ("snow",))
    index = _read_table(index_path, ("patch_id", "shard", "offset"))
    log.info(
        "sampling the %s set from %d patches in %s (seed %d, %d per class in small, exclude_snow %s) into %s",
        dataset,
        len(metadata),
        tiles,
        params.seed,
        params.small_per_class,
        params.exclude_snow,
        target,
    )
    sets = build_sets(metadata, params)
    manifest = _joined(sets[dataset], index, metadata, f"{dataset} set")
    natural = _joined(sets[f"{dataset}_natural"], index, metadata, f"{dataset} natural set")
    n_natural_cloud = int((natural["label"] == 1).sum())
    summary = {
        "dataset": dataset,
        "patches": len(manifest),
        "counts": _counts(manifest),
        "natural": {
            "patches": len(natural),
            "cloud": n_natural_cloud,
            "no_cloud": len(natural) - n_natural_cloud,
            "prevalence": n_natural_cloud / len(natural),
            "requested_prevalence": params.natural_prevalence,
        },
        "seed": params.seed,
        "params": params.model_dump(),
        "input": fingerprint,  # content hashes only: the same tiles give the same bytes here, wherever they are
        "outputs": {"manifest": MANIFEST_FILE, "natural": NATURAL_FILE},
    }
    with atomic_dir(target) as tmp:
        manifest.to_parquet(tmp / MANIFEST_FILE, index=False)
        natural.to_parquet(tmp / NATURAL_FILE, index=False)
        write_json(tmp / SUMMARY_FILE, summary)
    counts = summary["counts"]
    log.info(
        "wrote %s: %d patches (train %d, val %d, test %d; half cloud); natural set %d patches at prevalence %.4f",
        result_paths[0],
        len(manifest),
        *(sum(counts[s].values()) for s in SPLITS),
        len(natural),
        summary["natural"]["prevalence"],
    )
    return SampleResult(*result_paths, summary=summary, skipped=False)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--tiles", type=Path, required=True, help="the tile step's output: metadata.parquet, index.parquet")
    p.add_argument("--out", type=Path, required=True, help="samples directory; each set goes to OUT/DATASET/")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        action="append",
        help="balanced set to write; repeatable (default: both). The issue called this option --set, which here "
        "overrides params as in every step",
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    params = load_section("sample", SampleParams, args.params, args.overrides)
    for dataset in args.dataset or DATASETS:
        print(sample(tiles=args.tiles, out=args.out, dataset=dataset, params=params).manifest_path)


if __name__ == "__main__":
    cli.run(main)
