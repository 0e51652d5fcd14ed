"""bench.quality: members' recorded scores averaged patch by patch (ensembles); the demo's data found by its record."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench import quality
from bench.quality import averaged_scores
from tasks.lib.pipeline import SNAPSHOTS_DIR
from tasks.lib.tiles import MANIFEST_FILE as TILES_MANIFEST
from tasks.sample import MANIFEST_FILE, NATURAL_FILE


def _predictions(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["patch_id", "set", "label", "score"]).assign(season="Summer")


def test_scores_are_averaged_by_set_and_patch_whatever_the_row_order():
    first = _predictions([("a", "val", 1, 0.9), ("b", "val", 0, 0.2), ("a", "test", 1, 0.6)])
    second = _predictions([("a", "test", 1, 0.2), ("b", "val", 0, 0.4), ("a", "val", 1, 0.7)])

    averaged = averaged_scores([first, second])

    assert averaged[["patch_id", "set", "label", "season"]].equals(first[["patch_id", "set", "label", "season"]])
    assert averaged["score"].tolist() == pytest.approx([0.8, 0.3, 0.4])


def test_members_scored_on_other_patches_are_refused():
    first = _predictions([("a", "val", 1, 0.9), ("b", "val", 0, 0.2)])
    other = _predictions([("a", "val", 1, 0.9), ("c", "val", 0, 0.2)])

    with pytest.raises(ValueError, match="different patches"):
        averaged_scores([first, other])


@pytest.mark.parametrize("tiles_dir", ["tiles/demo", "ingested/demo/tiles"])  # the extract path's, the stream path's
def test_the_demos_data_is_found_where_its_refresh_record_says_whichever_ingest_path(tmp_path, monkeypatch, tiles_dir):
    monkeypatch.setattr(quality, "DATA", tmp_path)
    assert quality._recorded_demo() is None  # no data root yet
    tiles, small = tmp_path / tiles_dir, tmp_path / "samples" / "demo" / "small"
    for path in (tiles / TILES_MANIFEST, small / MANIFEST_FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    record = {
        "snapshot": "demo",
        "as_of": "2026-12-02",
        "tiles": str(tiles),
        "manifests": {"small": str(small / MANIFEST_FILE)},
    }
    (tmp_path / SNAPSHOTS_DIR).mkdir()
    (tmp_path / SNAPSHOTS_DIR / "demo.json").write_text(json.dumps(record))
    assert quality._recorded_demo() is None  # the natural set is missing: not complete
    (small / NATURAL_FILE).write_text("{}")
    assert quality._recorded_demo() == (tiles, small / MANIFEST_FILE)
