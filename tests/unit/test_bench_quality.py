"""bench.quality's ensembles: members' recorded scores averaged patch by patch."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.quality import averaged_scores


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
