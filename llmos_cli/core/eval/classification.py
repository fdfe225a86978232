"""Classification quality on a labelled set: accuracy and macro-F1 of the model's argmax predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmos_cli.core.runtime import Precision


def predict_labels(
    model: Any,
    rows: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) label ids for every encoded row (`input_ids`, `label`), under `precision`."""
    from llmos_cli.core.serve.runners import class_logits

    was_training = model.training
    model.eval()
    try:
        with precision.autocast(device):
            logits = class_logits(model, [r["input_ids"] for r in rows], pad_id, batch_size)
    finally:
        model.train(was_training)
    return logits.argmax(-1), torch.as_tensor([int(r["label"]) for r in rows])


def accuracy_and_f1(pred: torch.Tensor, true: torch.Tensor, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over label ids 0..n_labels-1 (a label absent from both counts 0), by the
    same functions `llmos eval` reports."""
    from llmos_cli.core.metrics.scores import accuracy, classification

    p, t = pred.tolist(), true.tolist()
    return {**accuracy(p, t), "f1": classification(p, t, labels=range(n_labels), scores=("f1",))["f1"]}
