"""PNG charts for reports (matplotlib, Agg backend), each written to a temp file and renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmos_cli.core.writable import match_umask


def _figure(ncols: int = 1, figsize: tuple[float, float] = (6, 4.5)) -> tuple[Any, Any]:
    """A figure and its axes (an array of `ncols` of them when ncols > 1)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when a GUI backend was chosen earlier
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize, dpi=100, squeeze=ncols == 1)


def _save_atomically(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", bbox_inches="tight")
        match_umask(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return target


def save_confusion_matrix_png(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path
) -> Path:
    """Heatmap of counts, rows = reference, columns = prediction, each cell annotated."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float).reshape(len(labels), len(labels))
    fig, ax = _figure()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels=[str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(ticks, labels=[str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("confusion matrix")
    threshold = counts.max() / 2 if counts.size else 0
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")  # fmt: skip
    return _save_atomically(fig, path)


def save_histogram_png(
    values: Sequence[float], path: str | Path, title: str, xlabel: str, bins: int = 50
) -> Path:
    """Histogram of `values` (e.g. sequence lengths, per-example losses)."""
    fig, ax = _figure()
    ax.hist(list(values), bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save_atomically(fig, path)


def save_loss_curves_png(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "loss") -> Path:
    """Training and validation loss against the step, from metrics.jsonl rows (validation rows carry
    `"split": "validation"`)."""
    fig, ax = _figure()
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(r["step"], r["loss"]) for r in rows if r.get("split", "train") == split and "loss" in r]
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, style, label=split, markersize=4)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save_atomically(fig, path)


def save_comparison_png(
    runs: Sequence[str], metrics: dict[str, Sequence[float | None]], path: str | Path
) -> Path:
    """One bar chart per metric (its own scale), a bar per run in order; a run without it has no bar."""
    fig, axes = _figure(len(metrics), figsize=(max(3.2 * len(metrics), 4.5), 4))
    row = axes[0] if len(metrics) > 1 else [axes]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (name, values) in zip(row, metrics.items(), strict=True):
        shown = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.bar([i for i, _ in shown], [v for _, v in shown], color=[colours[i] for i, _ in shown])
        ax.set_xticks(range(len(runs)), labels=list(runs), rotation=30, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    return _save_atomically(fig, path)
