"""Exact, token-weighted loss and perplexity over a whole dataset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from llmos_cli.core.runtime import Precision
from llmos_cli.core.train.batches import Collate, to_device
from llmos_cli.core.train.objectives import Objective, summed


def dataset_loss(
    model: Any, rows: Sequence[dict[str, Any]], objective: Objective, collate: Collate, **kwargs: Any
) -> tuple[float, int]:
    """Summed loss and target count over `rows` (see `dataset_sums`)."""
    total, count, _ = dataset_sums(model, rows, objective, collate, **kwargs)
    return total, count


@torch.no_grad()
def dataset_sums(
    model: Any,
    rows: Sequence[dict[str, Any]],
    objective: Objective,
    collate: Collate,
    *,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    batch_tokens: int | None = None,
    max_batches: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[float, int, dict[str, float]]:
    """Summed loss, target count and the objective's summed metrics over `rows`, batched in length
    order to avoid padding waste (see `length_batches`).

    `shard=(i, n)` scores only batches i, i + n, i + 2n, ... (one process's share of the work).
    """
    was_training = model.training
    model.eval()
    batches = length_batches([len(r["input_ids"]) for r in rows], batch_size, batch_tokens)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count, metrics = 0, {}
    for b, indices in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        if b % shard[1] != shard[0]:
            continue
        batch = collate([rows[i] for i in indices])
        count += objective.count(batch)
        with precision.autocast(device):
            loss, metric_sums = summed(objective.loss_sum(model, to_device(batch, device)))
        total += loss.double()
        for name, value in metric_sums.items():
            metrics[name] = metrics.get(name, 0) + value.double()
    model.train(was_training)
    return float(total), count, {k: float(v) for k, v in metrics.items()}


def length_batches(
    lengths: Sequence[int], batch_size: int, batch_tokens: int | None = None
) -> list[list[int]]:
    """Row indices, longest first, cut into batches of `batch_size` rows; or with `batch_tokens`, into
    batches as many rows as fit rows x longest <= batch_tokens (padded size; a longer row goes alone), so
    short rows share a forward and long ones do not make it huge."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if batch_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def loss_metrics(
    loss_sum: float, count: int, per_token: bool = True, metric_sums: dict[str, float] | None = None
) -> dict[str, float]:
    """Mean loss, and for token targets perplexity and the token count (else the example count); and
    the mean of each of an objective's summed metrics."""
    loss = loss_sum / max(count, 1)
    means = {k: v / max(count, 1) for k, v in (metric_sums or {}).items()}
    if not per_token:
        return {"loss": loss, **means, "examples": count}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), **means, "tokens": count}
