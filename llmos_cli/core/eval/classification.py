"""Classification quality on a labelled set: accuracy and macro-F1 of the model's argmax predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmos_cli.core.runtime import Precision
from llmos_cli.core.train.batches import Collate, to_device


@torch.no_grad()
def predict_labels(
    model: Any,
    rows: Sequence[dict[str, Any]],
    collate: Collate,
    *,
    batch_size: int,
    device: torch.device,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) label ids for every row, batched in length order to avoid padding waste."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    preds, labels = [], []
    for start in range(0, len(order), batch_size):
        batch = to_device(collate([rows[i] for i in order[start : start + batch_size]]), device)
        with precision.autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracy_and_f1(pred: torch.Tensor, true: torch.Tensor, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over label ids 0..n_labels-1 (a label absent from both counts 0), by the
    same functions `llmos eval` reports."""
    from llmos_cli.core.metrics.scores import accuracy, classification

    p, t = pred.tolist(), true.tolist()
    return {**accuracy(p, t), "f1": classification(p, t, labels=range(n_labels), scores=("f1",))["f1"]}
