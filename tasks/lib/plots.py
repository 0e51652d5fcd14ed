"""The evaluation's figures. Pure: arrays in, matplotlib Figure out; no pyplot, so no global backend state. Also
the RGB rendering of patches and the choice of the worst errors the figures show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.lib.metrics import binary_metrics


def render_rgb(patches: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """uint16 reflectance (n, h, w, >=3; R, G, B first) → uint8 RGB, stretched linearly between the given
    percentiles of all the patches together: robust to a few saturated pixels, and patches rendered together keep
    their relative brightness (a bright false positive looks bright next to a dark one)."""
    rgb = np.asarray(patches)[..., :3].astype(np.float32)
    if rgb.size == 0:
        return rgb.astype(np.uint8)
    low, high = (float(v) for v in np.percentile(rgb, percentiles))
    scale = max(high - low, 1.0)  # a flat image must not divide by zero
    return (np.clip((rgb - low) / scale, 0.0, 1.0) * 255).round().astype(np.uint8)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas to this figure only; matplotlib's global backend is untouched
    return fig


def threshold_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, target_recall: float) -> Any:
    """Precision and recall against the threshold for each set (set → (labels, scores)), with the operating
    threshold and the target recall marked. A set without both classes has no curve."""
    from sklearn.metrics import precision_recall_curve

    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for (name, (labels, scores)), style in zip(curves.items(), ("-", "--", ":"), strict=False):
        if len(np.unique(labels)) < 2:
            continue
        precision, recall, cuts = precision_recall_curve(labels, scores)
        ax.plot(cuts, precision[:-1], style, color="tab:blue", label=f"precision ({name})")
        ax.plot(cuts, recall[:-1], style, color="tab:orange", label=f"recall ({name})")
    ax.axvline(threshold, color="black", linewidth=1, label=f"operating threshold {threshold:.4f}")
    ax.axhline(target_recall, color="grey", linewidth=0.8, linestyle=":", label=f"target recall {target_recall:g}")
    ax.set(xlabel="threshold (score >= threshold is cloud)", ylabel="precision, recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("Precision and recall against the threshold")
    ax.legend(fontsize="small", loc="lower left")
    return fig


def pr_curve_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float) -> Any:
    """Precision-recall curves (set → (labels, scores)), each set's operating point marked. A set without both
    classes has no curve."""
    from sklearn.metrics import precision_recall_curve

    fig = _figure(6, 5)
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        if len(np.unique(labels)) < 2:
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        at = binary_metrics(labels, scores, threshold)
        (line,) = ax.step(recall, precision, where="post", label=f"{name} (AP {at['average_precision']:.3f})")
        ax.plot(at["recall"], at["precision"], "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title(f"Precision-recall curve (dots: threshold {threshold:.4f})")
    ax.legend(fontsize="small", loc="lower left")
    return fig


def confusion_figure(matrices: dict[str, dict[str, float]], threshold: float) -> Any:
    """Confusion matrices (set → binary_metrics at the threshold), counts and row shares."""
    fig = _figure(4.2 * len(matrices), 4)
    for ax, (name, m) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items(), strict=True):
        cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]], dtype=np.float64)
        shares = cells / np.maximum(cells.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cells):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(count)}\n{shares[i, j]:.1%}", ha="center", va="center", color=colour)
        ax.set_xticks([0, 1], ["no_cloud", "cloud"])
        ax.set_yticks([0, 1], ["no_cloud", "cloud"])
        ax.set(xlabel="predicted", ylabel="true", title=name)
    fig.suptitle(f"Confusion matrix at threshold {threshold:.4f}")
    return fig


def worst_errors_figure(rows: dict[str, tuple[np.ndarray, list[str], np.ndarray]], columns: int) -> Any:
    """An image grid, one row per kind of error (row title → (uint8 RGB images, patch ids, scores)), each image
    titled with its patch id and score."""
    fig = _figure(1.7 * columns + 0.4, 2.0 * len(rows))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for axes_row, (title, (images, ids, scores)) in zip(axes, rows.items(), strict=True):
        for ax in axes_row:
            ax.set_axis_off()
        for ax, image, patch_id, score in zip(axes_row, images, ids, scores, strict=False):
            ax.imshow(image)
            ax.set_title(f"{patch_id}\nscore {score:.3f}", fontsize=5)
        label = title if len(ids) else f"{title}: none"
        axes_row[0].text(-0.08, 0.5, label, rotation=90, va="center", ha="right", transform=axes_row[0].transAxes)
    return fig


def worst_errors(predictions: pd.DataFrame, threshold: float, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The k no-cloud patches with the highest scores at or above `threshold` (false positives, worst first) and the
    k cloud patches with the lowest scores below it (false negatives), each patch_id once."""
    unique = predictions.drop_duplicates("patch_id")
    false_pos = unique[(unique["label"] == 0) & (unique["score"] >= threshold)]
    false_neg = unique[(unique["label"] == 1) & (unique["score"] < threshold)]
    return false_pos.nlargest(k, "score"), false_neg.nsmallest(k, "score")


def drift_figure(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str], labels: dict[str, str]) -> Any:
    """The distributions of the most drifted columns, reference against new, one panel each (histograms on shared
    bins for numbers, shares per value for categories); `labels` titles each panel (e.g. the test's value)."""
    fig = _figure(3.6 * max(len(columns), 1), 3.0)
    axes = fig.subplots(1, max(len(columns), 1), squeeze=False)[0]
    for ax, column in zip(axes, columns, strict=False):
        before, after = reference[column].dropna(), current[column].dropna()
        if pd.api.types.is_numeric_dtype(before) and not pd.api.types.is_bool_dtype(before):
            bins = np.histogram_bin_edges(np.concatenate([before, after]).astype(float), bins=30)
            for values, label in ((before, "reference"), (after, "new")):  # one artist per histogram, not 30 bars
                ax.stairs(np.histogram(values, bins=bins, density=True)[0], bins, fill=True, alpha=0.55, label=label)
        else:
            shares = pd.DataFrame(
                {
                    "reference": before.astype(str).value_counts(normalize=True),
                    "new": after.astype(str).value_counts(normalize=True),
                }
            ).fillna(0.0)
            x = np.arange(len(shares))
            ax.bar(x - 0.2, shares["reference"], width=0.4, label="reference")
            ax.bar(x + 0.2, shares["new"], width=0.4, label="new")
            ax.set_xticks(x, shares.index, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{column}\n{labels.get(column, '')}", fontsize=8)
        ax.legend(fontsize=7)
    if not columns:
        axes[0].text(0.5, 0.5, "no column drifted", ha="center", va="center")
        axes[0].set_axis_off()
    return fig


def save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=120)
