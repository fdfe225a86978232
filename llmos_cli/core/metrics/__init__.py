"""Task metrics: plain functions (scores.py) for the names llmos ships, a hub fallback for other names.

`compute_metrics` calls each function once even when several requested names share it (precision,
recall and f1 come from `classification`; bleu and chrf from `translation`). Each folder here wraps
one of them as an `evaluate` metric script, for users who load a metric by name
(`evaluate.load(".../metrics/classification")`); the numbers are the same functions'.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from llmos_cli.core.metrics.scores import SCORES
from llmos_cli.errors import UserError

METRICS_DIR = Path(__file__).parent

# Computed by the caller from the evaluation loss, never by a module here.
LOSS_METRICS = ("loss", "perplexity")

# Requested name -> the local module that computes it.
_MODULE_OF = {
    "accuracy": "accuracy",
    "precision": "classification",
    "recall": "classification",
    "f1": "classification",
    "confusion_matrix": "confusion_matrix",
    "exact_match": "exact_match",
    "bleu": "translation",
    "chrf": "translation",
    "rouge": "rouge",
}

KNOWN_METRICS = (*LOSS_METRICS, *_MODULE_OF)

# Modules that take the class list (order of per-class scores and of the matrix rows/columns).
_TAKES_LABELS = {"classification", "confusion_matrix"}
# Modules behind several names take `scores=` and compute only the requested ones.
_SHARED = {"classification", "translation"}


@functools.cache
def load_local_metric(module: str) -> Any:
    """The packaged evaluate module `module` (a folder name here), loaded once per process."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / module), keep_in_memory=True)


@functools.cache
def _load_hub_metric(name: str) -> Any:
    import evaluate

    try:
        return evaluate.load(name, keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 - any failure to fetch means "not a metric we can use"
        raise UserError(
            f"unknown metric {name!r}: it is not shipped with llmos and could not be loaded from the "
            f"Hugging Face hub ({type(err).__name__})",
            hint=f"use one of {', '.join(KNOWN_METRICS)}, or a hub metric name while online",
        ) from err


def check_metrics(names: list[str]) -> None:
    """Load every hub metric named now, so a bad name fails before a long evaluation rather than after it."""
    for name in names:
        if name not in _MODULE_OF and name not in LOSS_METRICS:
            _load_hub_metric(name)


def compute_metrics(
    names: list[str],
    predictions: list,
    references: list,
    labels: list[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float | dict]:
    """Compute the named metrics on predictions vs references; `loss`/`perplexity` are skipped here.

    `labels` fixes the classes (and their order) for precision/recall/f1/confusion_matrix; a prediction
    outside them counts as wrong and has no column in the matrix.
    `options` passes keyword arguments per metric name, e.g. `{"exact_match": {"lowercase": True}}`,
    `{"rouge": {"use_stemmer": True}}`.
    """
    options = options or {}
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    wanted: dict[str, set[str]] = {}
    hub_names: list[str] = []
    for name in names:
        if name in LOSS_METRICS:
            continue
        if name in _MODULE_OF:
            wanted.setdefault(_MODULE_OF[name], set()).add(name)
        else:
            hub_names.append(name)

    results: dict[str, float | dict] = {}
    for module, requested in wanted.items():
        kwargs: dict[str, Any] = {}
        for name in requested:
            kwargs.update(options.get(name, {}))
        if module in _TAKES_LABELS and labels is not None:
            kwargs["labels"] = list(labels)
        if module in _SHARED:
            kwargs["scores"] = sorted(requested)
        results.update(SCORES[module](list(predictions), list(references), **kwargs))
    for name in hub_names:
        metric = _load_hub_metric(name)
        results.update(
            metric.compute(predictions=predictions, references=references, **options.get(name, {}))
        )
    return results
