"""Validate extracted BigEarthNet-S2 patches: raster checks per patch, metadata checks with Great Expectations.

Every patch folder under ROOT is checked; a bad patch is quarantined with every reason found, never dropped silently.
Writes `OUT/report.json` and Great Expectations Data Docs under `OUT/gx/`. The step fails only when the quarantined
fraction exceeds `max_bad_fraction` or a dataset-level expectation (such as the cloud fraction) fails.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
from pydantic import Field, model_validator
from tqdm import tqdm

from tasks.lib import bigearthnet as ben
from tasks.lib import cli
from tasks.lib.bands import BandReader
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ValidationFailedError
from tasks.lib.files import atomic_dir, folders_fingerprint, write_json
from tasks.lib.outputs import completed

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
DATA_DOCS_INDEX = "gx/uncommitted/data_docs/local_site/index.html"
_COORDINATE_KEYS = ("ulx", "uly", "lrx", "lry")


class ValidateParams(StepParams):
    max_bad_fraction: float = Field(ge=0, le=1)
    nodata_value: int
    max_nodata_fraction: float = Field(ge=0, le=1)
    saturated_value: int
    max_saturated_fraction: float = Field(ge=0, le=1)
    cloud_fraction_min: float = Field(ge=0, le=1)
    cloud_fraction_max: float = Field(ge=0, le=1)
    acquisition_date_format: str
    workers: int = Field(ge=1)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> ValidateParams:
        if self.cloud_fraction_min > self.cloud_fraction_max:
            raise ValueError("cloud_fraction_min is greater than cloud_fraction_max")
        return self


@dataclass(frozen=True)
class ValidationResult:
    report_path: Path
    report: dict[str, Any]
    skipped: bool  # an identical earlier run's report was reused

    @property
    def success(self) -> bool:
        return bool(self.report["success"])


@dataclass(slots=True)
class _PatchCheck:
    """Outcome of the raster and JSON checks of one patch folder."""

    patch_id: str
    reasons: list[str] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)  # metadata fields for the Great Expectations table
    content_hash: str | None = None  # of all band pixels, to find the same image under two names
    unexpected_files: list[str] = field(default_factory=list)


# --- per-patch checks (run in worker processes) -------------------------------------------------------------------


@functools.cache
def _band_reader() -> BandReader:
    return BandReader()  # one per process: a layout tifffile has read once is then sliced straight from the bytes


def _check_band(
    data: bytes | None, name: str, band: str, params: ValidateParams
) -> tuple[np.ndarray | None, list[str]]:
    """The pixels of one band file's bytes (None: the file is absent) and what is wrong with them."""
    if data is None:
        return None, [f"band {band} missing ({name})"]
    # A layout tifffile has already read here as one simple page gives the same pixels without a parse.
    array = _band_reader().known(data)
    if array is None:
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                if len(tif.pages) != 1:
                    return None, [f"band {band} has {len(tif.pages)} images, expected 1"]
                array = tif.pages[0].asarray()
        except Exception as exc:  # tifffile raises many types for damaged files; all mean "unreadable"
            return None, [f"band {band} unreadable ({name}): {exc}"]
        _band_reader().learn(data)
    size = ben.BAND_SIZES[band]
    reasons = []
    if array.shape != (size, size):
        shape = "×".join(str(n) for n in array.shape)
        reasons.append(f"band {band} has shape {shape}, expected {size}×{size}")
    if array.dtype != np.uint16:
        reasons.append(f"band {band} has dtype {array.dtype}, expected uint16")
    if reasons:
        return None, reasons
    nodata = float(np.mean(array == params.nodata_value))
    saturated = float(np.mean(array == params.saturated_value))
    if nodata == 1:
        reasons.append(f"band {band} is all nodata ({params.nodata_value})")
    elif nodata > params.max_nodata_fraction:
        reasons.append(f"band {band} is {nodata:.0%} nodata (more than {params.max_nodata_fraction:.0%})")
    if saturated > params.max_saturated_fraction:
        reasons.append(
            f"band {band} is {saturated:.0%} saturated ({params.saturated_value}; "
            f"more than {params.max_saturated_fraction:.0%})"
        )
    return array, reasons


def _metadata_row(raw: bytes | None, name: str) -> tuple[dict[str, Any], list[str]]:
    """Fields of `<patch>_labels_metadata.json` (its bytes; None: absent) for the metadata table, and what is wrong
    with the file."""
    if raw is None:
        return {}, [f"metadata missing ({name})"]
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, [f"metadata is not valid JSON ({name}): {exc}"]
    if not isinstance(data, dict):
        return {}, [f"metadata is not a JSON object ({name})"]
    reasons = []
    missing = sorted(ben.JSON_KEYS - data.keys())
    if missing:
        reasons.append(f"metadata lacks {', '.join(missing)} ({name})")
    row: dict[str, Any] = {}
    labels = data.get("labels")
    if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
        row["labels"] = labels
    elif "labels" in data:
        reasons.append(f"metadata labels is not a list of names ({name})")
    coords = data.get("coordinates")
    if isinstance(coords, dict) and all(isinstance(coords.get(k), int | float) for k in _COORDINATE_KEYS):
        row.update({k: float(coords[k]) for k in _COORDINATE_KEYS})
    elif "coordinates" in data:
        reasons.append(f"metadata coordinates lack numeric {'/'.join(_COORDINATE_KEYS)} ({name})")
    for key in ("acquisition_date", "tile_source"):
        if isinstance(data.get(key), str):
            row[key] = data[key]
        elif key in data:
            reasons.append(f"metadata {key} is not a string ({name})")
    return row, reasons


def expected_files(patch_id: str) -> list[str]:
    """The names a patch folder must hold: its 12 bands (ben.BANDS order), then its metadata JSON."""
    return [*(ben.band_file(patch_id, b) for b in ben.BANDS), ben.metadata_file(patch_id)]


def check_patch_files(
    patch_id: str, files: Mapping[str, bytes], entries: Iterable[str], params: ValidateParams
) -> _PatchCheck:
    """The raster and JSON checks of one patch from its files' bytes, wherever they come from (a folder on disk,
    an archive stream).

    Args:
        patch_id: the folder's name.
        files: name → bytes of the expected files that are present (absent ones are reported missing).
        entries: the names of everything in the folder (files and sub-folders), for the unexpected-file list.
    """
    check = _PatchCheck(patch_id=patch_id)
    digest = hashlib.blake2b(digest_size=16)
    complete = True
    for band in ben.BANDS:
        name = ben.band_file(patch_id, band)
        array, reasons = _check_band(files.get(name), name, band, params)
        check.reasons += reasons
        if array is None:
            complete = False
        else:
            digest.update(array.tobytes())
    if complete:
        check.content_hash = digest.hexdigest()
    name = ben.metadata_file(patch_id)
    check.row, reasons = _metadata_row(files.get(name), name)
    check.reasons += reasons
    expected = set(expected_files(patch_id))
    check.unexpected_files = sorted(e for e in entries if e not in expected)
    return check


def _check_patch(folder: Path, params: ValidateParams) -> _PatchCheck:
    files = {name: (folder / name).read_bytes() for name in expected_files(folder.name) if (folder / name).is_file()}
    return check_patch_files(folder.name, files, [p.name for p in folder.iterdir()], params)


# --- dataset checks -----------------------------------------------------------------------------------------------


def _metadata_table(checks: list[_PatchCheck]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per patch (fields missing where the JSON was unusable), and one row per (patch, label).

    Built a column at a time: a dict per row cost about 1 KB a patch at the peak of a 50,000-patch ingest."""
    cloud, snow = ben.cloud_and_shadow_patches(), ben.seasonal_snow_patches()
    columns: dict[str, list[Any]] = {name: [] for name in _METADATA_COLUMNS}
    label_patches, label_names = [], []
    for c in checks:
        r = c.row
        have_coords = all(k in r for k in _COORDINATE_KEYS)
        columns["patch_id"].append(c.patch_id)
        columns["n_labels"].append(len(r["labels"]) if "labels" in r else None)
        columns["width_m"].append(r["lrx"] - r["ulx"] if have_coords else None)
        columns["height_m"].append(r["uly"] - r["lry"] if have_coords else None)
        columns["acquisition_date"].append(r.get("acquisition_date"))
        columns["tile_source"].append(r.get("tile_source"))
        columns["cloud"].append(int(c.patch_id in cloud))
        columns["snow"].append(int(c.patch_id in snow))
        for label in r.get("labels", []):
            label_patches.append(c.patch_id)
            label_names.append(label)
    # The types a frame of no row dicts has: no columns; object columns.
    metadata = pd.DataFrame(columns) if checks else pd.DataFrame()
    if not label_names:
        return metadata, pd.DataFrame(columns=["patch_id", "label"])
    return metadata, pd.DataFrame({"patch_id": label_patches, "label": label_names})


_METADATA_COLUMNS = ("patch_id", "n_labels", "width_m", "height_m", "acquisition_date", "tile_source", "cloud", "snow")


def _duplicates(checks: list[_PatchCheck]) -> dict[str, str]:
    """patch_id → the first patch (by name) with identical band pixels, for every later copy."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for c in checks:
        if c.content_hash:
            by_hash[c.content_hash].append(c.patch_id)
    copies: dict[str, str] = {}
    for ids in by_hash.values():
        first, *rest = sorted(ids)
        copies.update(dict.fromkeys(rest, first))
    return copies


def _row_reason(expectation: str, column: str, value: Any, params: ValidateParams) -> str:
    """A sentence for one patch that fails one row-level expectation."""
    match expectation:
        case "expect_column_values_to_be_unique":
            return "patch id occurs more than once under the root"
        case "expect_column_values_to_match_regex":
            return f"patch id does not match the official name pattern {ben.PATCH_NAME_PATTERN}"
        case "expect_column_values_to_be_in_set":
            return f"label {value!r} is not one of the 43 BigEarthNet CORINE labels"
        case "expect_column_values_to_be_between" if column in ("width_m", "height_m"):
            side = "wide" if column == "width_m" else "high"
            return f"coordinates are {value:g} m {side}, expected a {ben.PATCH_SIZE_M} m square"
        case "expect_column_values_to_be_between" if column == "n_labels":
            return "metadata lists no labels"
        case "expect_column_values_to_match_strftime_format":
            return f"acquisition_date {value!r} does not parse as {params.acquisition_date_format}"
    return f"fails {expectation} on {column} (value {value!r})"


def _expectations(params: ValidateParams) -> tuple[list, list]:
    import great_expectations.expectations as gxe

    # Row-level expectations tolerate up to max_bad_fraction of bad rows (those rows are quarantined);
    # dataset-level ones (row count, cloud fraction) must hold outright.
    mostly = 1 - params.max_bad_fraction
    side = {"min_value": ben.PATCH_SIZE_M, "max_value": ben.PATCH_SIZE_M, "mostly": mostly}
    metadata = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="patch_id", mostly=mostly),
        gxe.ExpectColumnValuesToMatchRegex(column="patch_id", regex=f"^{ben.PATCH_NAME_PATTERN}$", mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="n_labels", min_value=1, mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="width_m", **side),
        gxe.ExpectColumnValuesToBeBetween(column="height_m", **side),
        gxe.ExpectColumnValuesToMatchStrftimeFormat(
            column="acquisition_date", strftime_format=params.acquisition_date_format, mostly=mostly
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="cloud", min_value=params.cloud_fraction_min, max_value=params.cloud_fraction_max
        ),
    ]
    labels = [gxe.ExpectColumnValuesToBeInSet(column="label", value_set=sorted(ben.LABELS), mostly=mostly)]
    return metadata, labels


def _run_great_expectations(
    project_dir: Path, tables: dict[str, pd.DataFrame], params: ValidateParams
) -> tuple[bool, list[dict[str, Any]], dict[str, list[str]]]:
    """Run one Checkpoint per table and render Data Docs under `project_dir/gx`.

    Returns:
        overall success, a summary per expectation, and patch_id → reasons for rows that failed.
    """
    # GX would otherwise phone home for analytics on every context; these machines and many clusters are offline.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=project_dir)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.variables.save()
    source = context.data_sources.add_pandas("bigearthnet")
    suites = dict(zip(tables, _expectations(params), strict=True))
    success, summary, reasons = True, [], defaultdict(list)
    for name, frame in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("snapshot")
        suite = context.suites.add(gx.ExpectationSuite(name=f"bigearthnet_{name}", expectations=suites[name]))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"validate_{name}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["patch_id"]},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        success &= bool(result.success)
        for run in result.run_results.values():
            for outcome in run.results:
                config = outcome.expectation_config
                column = config.kwargs.get("column")
                unexpected = outcome.result.get("unexpected_index_list") or []
                summary.append(
                    {
                        "table": name,
                        "expectation": config.type,
                        "column": column,
                        "success": bool(outcome.success),
                        "observed_value": _jsonable(outcome.result.get("observed_value")),
                        "unexpected_count": len(unexpected),
                    }
                )
                for item in unexpected:
                    reason = _row_reason(config.type, column, item.get(column, item.get("patch_id")), params)
                    if reason not in reasons[item["patch_id"]]:
                        reasons[item["patch_id"]].append(reason)
    return success, summary, dict(reasons)


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --- the step -----------------------------------------------------------------------------------------------------


def _patch_folders(root: Path) -> tuple[list[Path], list[str]]:
    if not root.is_dir():
        raise ValidationFailedError(f"{root}: not a directory of patch folders")
    folders, others = [], []
    for entry in sorted(root.iterdir()):
        (folders if entry.is_dir() else others).append(entry)
    if not folders:
        raise ValidationFailedError(f"{root}: no patch folders found")
    return folders, [p.name for p in others]


def failure_summary(report: dict[str, Any]) -> str:
    problems = []
    if report["quarantined_fraction"] > report["max_bad_fraction"]:
        problems.append(
            f"{len(report['quarantined'])} of {report['checked']} patches quarantined "
            f"({report['quarantined_fraction']:.1%}, more than {report['max_bad_fraction']:.1%})"
        )
    problems += [
        f"{e['table']} expectation {e['expectation']}"
        + (f" on {e['column']}" if e["column"] else "")
        + f" failed (observed {e['observed_value']})"
        for e in report["expectations"]
        if not e["success"]
    ]
    return "; ".join(problems)


def validate(*, patches: Path, out: Path, params: ValidateParams) -> ValidationResult:
    """Check every patch folder under `patches` and write `out/report.json` and Data Docs.

    Returns the result even when the data fails (the report is written either way); callers decide whether to
    raise. Re-running with unchanged inputs and params reuses the earlier report.

    Raises:
        ValidationFailedError: `patches` is not a directory or holds no patch folders.
    """
    folders, ignored = _patch_folders(patches)
    fingerprint = folders_fingerprint(folders, params.model_dump_json().encode())
    report_path = out / REPORT_FILE
    previous = completed(report_path, fingerprint, what=f"the validation of {patches}")
    if previous is not None:
        return ValidationResult(report_path, previous, skipped=True)

    log.info("validating %d patch folders under %s with %d workers", len(folders), patches, params.workers)
    check = partial(_check_patch, params=params)
    progress = partial(tqdm, total=len(folders), unit="patch", desc="validate", disable=None)
    if params.workers > 1 and len(folders) > 64:
        with ProcessPoolExecutor(max_workers=params.workers) as pool:
            checks = list(progress(pool.map(check, folders, chunksize=32)))
    else:
        checks = list(progress(map(check, folders)))

    with atomic_dir(out) as tmp:
        report = write_report(
            checks,
            ignored=ignored,
            source={"root": str(patches.resolve()), "fingerprint": fingerprint},
            out=tmp,
            params=params,
        )
    log.info(
        "validated %d patches: %d valid, %d quarantined (%.1f%%), suite %s; report %s",
        report["checked"],
        report["valid"],
        len(report["quarantined"]),
        100 * report["quarantined_fraction"],
        "passed" if report["suite_success"] else "failed",
        report_path,
    )
    return ValidationResult(report_path, report, skipped=False)


def write_report(
    checks: list[_PatchCheck], *, ignored: list[str], source: dict[str, str], out: Path, params: ValidateParams
) -> dict[str, Any]:
    """From the per-patch checks (sorted by patch id) to the report: duplicates, the Great Expectations Checkpoints
    and Data Docs under `out/gx`, and `out/report.json`. `out` is a directory being built (it is not replaced here).

    Args:
        ignored: names of files beside the patch folders.
        source: what was checked ({"root": ..., "fingerprint": ...}), recorded as the report's `input`.
    """
    for copy, original in _duplicates(checks).items():
        next(c for c in checks if c.patch_id == copy).reasons.append(
            f"band data identical to {original} (duplicate patch)"
        )
    metadata, labels = _metadata_table(checks)
    suite_success, expectations, gx_reasons = _run_great_expectations(
        out, {"metadata": metadata, "labels": labels}, params
    )
    quarantined = []
    for c in checks:
        reasons = c.reasons + [r for r in gx_reasons.get(c.patch_id, []) if r not in c.reasons]
        if reasons:
            quarantined.append({"patch_id": c.patch_id, "reasons": reasons})
    fraction = len(quarantined) / len(checks)
    report = {
        "checked": len(checks),
        "valid": len(checks) - len(quarantined),
        "quarantined": quarantined,
        "suite_success": suite_success,
        "data_docs": DATA_DOCS_INDEX,
        "success": suite_success and fraction <= params.max_bad_fraction,
        "quarantined_fraction": fraction,
        "max_bad_fraction": params.max_bad_fraction,
        "cloud_fraction": float(metadata["cloud"].mean()),
        "expectations": expectations,
        "unexpected_files": {c.patch_id: c.unexpected_files for c in checks if c.unexpected_files},
        "ignored_files": ignored,
        "input": source,
        "params": params.model_dump(),
    }
    write_json(out / REPORT_FILE, report)
    return report


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--patches", type=Path, required=True, help="dataset root: one folder per patch")
    p.add_argument("--out", type=Path, required=True, help="directory for report.json and Data Docs")
    p.add_argument("--max-bad-fraction", type=float, help="fail above this quarantined share (default: params)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    overrides = list(args.overrides)
    if args.max_bad_fraction is not None:
        overrides.append(f"validate.max_bad_fraction={args.max_bad_fraction}")
    params = load_section("validate", ValidateParams, args.params, overrides)
    result = validate(patches=args.patches, out=args.out, params=params)
    for item in result.report["quarantined"]:
        log.warning("quarantined %s: %s", item["patch_id"], "; ".join(item["reasons"]))
    if not result.success:
        raise ValidationFailedError(
            f"validation of {args.patches} failed: {failure_summary(result.report)}; "
            f"see {result.report_path} and {args.out / DATA_DOCS_INDEX}"
        )
    print(result.report_path)


if __name__ == "__main__":
    cli.run(main)
