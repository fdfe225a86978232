"""Training objectives: a summed loss over a batch and the number of targets it was summed over.

The loop divides the summed loss by the targets of the whole accumulation window, so gradient
accumulation and uneven (masked) batches weight every target token equally. An objective may also
return metrics summed over the same targets (`loss_sum` -> `(loss, {name: sum})`, see `summed`):
the loop logs their means beside the loss, on training and validation rows alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmos_cli.core.train.batches import IGNORE_INDEX, count_targets, flash_kwargs

Batch = dict[str, torch.Tensor]
MetricSums = dict[str, torch.Tensor]  # each summed over the batch's targets, as the loss is


@dataclass(frozen=True)
class Objective:
    loss_sum: Callable[[Any, Batch], torch.Tensor | tuple[torch.Tensor, MetricSums]]
    count: Callable[[Batch], int]
    per_token: bool = True  # targets are tokens (perplexity means something), not whole examples


def summed(result: torch.Tensor | tuple[torch.Tensor, MetricSums]) -> tuple[torch.Tensor, MetricSums]:
    """A `loss_sum` result as (summed loss, summed metrics); most objectives report no metrics."""
    return result if isinstance(result, tuple) else (result, {})


def causal_lm_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy; labels shift left so no copy of the logits is made."""
    # use_cache=False: with a cache, transformers ignores restarting position_ids and lets packed
    # documents attend to each other.
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **flash_kwargs(batch),  # flattened packed rows: varlen flash attention's document bounds
    ).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


CAUSAL_LM = Objective(causal_lm_loss_sum, count_targets)


def classification_objective(class_weights: torch.Tensor | None = None) -> Objective:
    """Summed (optionally class-weighted) cross-entropy over sequence labels; one target per example."""

    def loss_sum(model: Any, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weight = class_weights.to(logits.device) if class_weights is not None else None
        return F.cross_entropy(logits.float(), batch["labels"], weight=weight, reduction="sum")

    return Objective(loss_sum, lambda batch: int(batch["labels"].numel()), per_token=False)


def seq2seq_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of the decoder over target tokens (the model shifts labels right itself)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


CLASSIFICATION = classification_objective()
SEQ2SEQ = Objective(seq2seq_loss_sum, lambda batch: int((batch["labels"] != IGNORE_INDEX).sum()))
