"""`llmos data label IN OUT`: model-assisted labelling with the Python API's own scoring.

Every row gets `label` and `label_score` from `Model.scores` (what `Model.predict` ranks): zero-shot
scores for the given labels (an encoder's cosine similarity, a causal or seq2seq LM's mean label
log-likelihood), or a fine-tuned classifier's probabilities over its own labels. Rows scoring under
`min_score` (on that model's scale) go to a review file instead of OUT. A recipe's `data.label`
step labels its rows the same way before they are encoded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.console import out
from llmos_cli.core.data.convert import check_writable_format, write_records
from llmos_cli.core.data.read import BadRows, Row, field_text, list_files, read_rows
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection

LABEL, SCORE = "label", "label_score"


@dataclass
class Labelled:
    rows: int
    kept: int
    review: int
    labels: dict[str, int]  # label -> rows in OUT
    review_labels: dict[str, int]  # label -> rows sent to review
    score: dict[str, float]  # quantiles of every row's best score
    out: str
    review_file: str | None


def review_path(out_path: Path) -> Path:
    """Where rows under --min-score go by default: OUT's name with `.review` before the suffix."""
    return out_path.with_name(f"{out_path.stem}.review{out_path.suffix}")


def label_file(
    model: Any,
    in_path: str | Path,
    out_path: Path,
    *,
    labels: list[str] | None,
    text_field: str = "text",
    min_score: float | None = None,
    review: Path | None = None,
    template: str | None = None,
    batch_size: int = 16,
) -> Labelled:
    """Label every row of IN with `model` (an `llmos_cli.api.Model`); write OUT and the review file."""
    check_writable_format(out_path, "label")
    review = review or review_path(out_path)
    if min_score is not None:
        check_writable_format(review, "label")
    rows = list(read_rows(list_files(str(in_path)), "line", bad=BadRows("fail")))
    if not rows:
        raise UserError(f"label: {in_path} holds no rows")
    kept, low, scores = [], [], []
    texts = [field_text(row, text_field) for row in rows]
    for row, (best, score) in zip(rows, best_labels(model, texts, labels, template, batch_size), strict=True):
        record = {**row.data, LABEL: best, SCORE: round(score, 6)}
        (low if min_score is not None and score < min_score else kept).append(record)
        scores.append(score)
    write_records(kept, out_path, text_field)
    review.unlink(missing_ok=True)  # a stale review file would hold another run's rows
    if low:
        write_records(low, review, text_field)
    return Labelled(
        rows=len(rows),
        kept=len(kept),
        review=len(low),
        labels=dict(Counter(r[LABEL] for r in kept).most_common()),
        review_labels=dict(Counter(r[LABEL] for r in low).most_common()),
        score=_quantiles(scores),
        out=str(out_path),
        review_file=str(review) if low else None,
    )


def best_labels(
    model: Any, texts: list[str], labels: list[str] | None, template: str | None = None, batch_size: int = 16
) -> list[tuple[str, float]]:
    """The label `Model.predict` gives each text, with its score: `batch_size` texts per forward pass
    (the scores of one text at a time), a progress bar on a TTY."""
    found = []
    with out.progress("label", total=len(texts)) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            try:
                batch = model.scores(chunk, labels, template=template, batch_size=batch_size)
            except ValueError as err:  # no head and no labels, a bad template, duplicate labels
                hint = "pass labels for zero-shot labelling: --labels a,b,c (data.label.labels in a recipe)"
                raise UserError(f"label: {err}", hint=hint) from None
            for scores in batch:
                label = max(scores, key=scores.__getitem__)  # the label `Model.predict` returns
                found.append((label, float(scores[label])))
            bar.update(len(chunk))
    return found


def _quantiles(scores: list[float]) -> dict[str, float]:
    q = np.quantile(np.array(scores), [0.0, 0.1, 0.5, 0.9, 1.0])
    return {name: round(float(v), 4) for name, v in zip(("min", "p10", "p50", "p90", "max"), q, strict=True)}


def show(result: Labelled) -> None:
    rows = [(f"label: {k}", v) for k, v in result.labels.items()]
    rows += [(f"review: {k}", v) for k, v in result.review_labels.items()]
    rows += [(f"score {k}", v) for k, v in result.score.items()]
    out.table(f"data label: {result.rows} rows -> {result.out}", ["what", "value"], rows)


def label_step(rows: list[Row], d: DataSection, source: str | None) -> tuple[list[Row], int]:
    """The recipe's labelling step (`data.label`): each row's `data.label_field` set to the model's
    label; rows scoring under `min_score` are left out. Returns the rows kept and how many were not."""
    from llmos_cli.api import Model
    from llmos_cli.core.models import recipe_model_dir

    step = d.label
    model = Model(recipe_model_dir(step.model, source, "data.label.model"))
    texts = [field_text(row, d.text_field) for row in rows]
    kept = []
    for row, (best, score) in zip(
        rows, best_labels(model, texts, step.labels, step.template, step.batch_size), strict=True
    ):
        if step.min_score is None or score >= step.min_score:
            row.data = {**row.data, d.label_field: best, SCORE: round(score, 6)}
            kept.append(row)
    return kept, len(rows) - len(kept)
