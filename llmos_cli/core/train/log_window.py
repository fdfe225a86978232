"""The training log's window: loss (and an objective's metrics), targets and tokens since the last
logged step, and its clock."""

from __future__ import annotations

import time
from typing import Any

import torch

from llmos_cli.core.distributed import World


class LogWindow:
    """What the loop adds up between two logged steps. The loss stays on the device (no host sync per
    step); time spent evaluating is not counted, so tokens/s measures training alone."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.metrics: dict[str, torch.Tensor] = {}  # an objective's summed metrics, on the device
        self.targets, self.tokens, self.start = 0, 0, time.perf_counter()
        self.positions, self.padding = 0, 0.0  # padding: the share of positions that were pads, last window

    def add_batch(
        self,
        batch: dict[str, Any],
        loss_sum: torch.Tensor,
        metric_sums: dict[str, torch.Tensor] | None = None,
    ) -> None:
        mask, positions = batch.get("attention_mask"), batch["input_ids"].numel()
        self.tokens += int(mask.sum()) if mask is not None else positions - int(batch.get("padding", 0))
        self.positions += positions
        self.loss += loss_sum.detach()
        for name, value in (metric_sums or {}).items():
            self.metrics[name] = self.metrics.get(name, 0) + value.detach().float()

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def metric_means(self, world: World) -> dict[str, float]:
        """The objective's metrics per target over every rank since the last close (read before it)."""
        return {k: float(world.sum(v)) / max(self.targets, 1) for k, v in sorted(self.metrics.items())}

    def close(self, world: World) -> tuple[float, int, float]:
        """(mean loss per target, tokens, seconds) over every rank since the last close; then start anew."""
        loss, tokens = float(world.sum(self.loss)), int(world.sum(self.tokens))
        positions = int(world.sum(self.positions))
        result = (loss / max(self.targets, 1), tokens, time.perf_counter() - self.start)
        self.padding = 1 - tokens / positions if positions else 0.0
        self.loss.zero_()
        self.metrics = {}
        self.targets, self.tokens, self.start, self.positions = 0, 0, time.perf_counter(), 0
        return result
