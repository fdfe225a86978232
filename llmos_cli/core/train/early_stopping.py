"""Watch one validation metric: remember the best value and step, and say when patience runs out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmos_cli.core import distributed
from llmos_cli.core.distributed import World
from llmos_cli.core.runtime import model_device
from llmos_cli.core.train import full_state
from llmos_cli.errors import UserError
from llmos_cli.recipe import TrainSection

LOWER_IS_BETTER = {"loss", "perplexity"}


@dataclass
class MetricWatch:
    """Early stopping and the best weights' bookkeeping. Always there: without train.early_stopping or
    keep_best it watches the validation loss and never stops the run, so the loop has no special case."""

    metric: str
    mode: str  # "min" or "max"
    patience: int | None  # None: never stop early
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    asked: bool = True  # the recipe asked for early stopping or keep_best (its best is reported)

    @classmethod
    def from_config(cls, cfg: TrainSection) -> MetricWatch:
        """The watch a recipe asks for (early_stopping and/or keep_best), else a passive one."""
        es = cfg.early_stopping
        metric = es.metric if es else "loss"
        mode = es.mode if es and es.mode != "auto" else ("min" if metric in LOWER_IS_BETTER else "max")
        asked = es is not None or cfg.keep_best
        return cls(metric, mode, es.patience if es else None, es.min_delta if es else 0.0, asked=asked)

    @property
    def result(self) -> dict[str, Any] | None:
        """The watched metric's best value and step, for the run's summary (None when not asked for)."""
        return {"metric": self.metric, "value": self.best, "step": self.best_step} if self.asked else None

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if self.metric not in metrics:
            raise UserError(
                f"train.early_stopping.metric: '{self.metric}' is not a validation metric here "
                f"(available: {', '.join(k for k in metrics if k not in ('tokens', 'examples'))})"
            )
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def save_trained_weights(model: Any, path: Path, world: World) -> None:
    """Write the trainable parameters (all of them for full fine-tuning, adapters for LoRA) atomically.

    Every rank calls it (FSDP gathers shards); rank 0 writes.
    """
    from safetensors.torch import save_file

    tensors = full_state.trained_weights(model)
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
    world.barrier()


def load_trained_weights(model: Any, path: Path) -> None:
    """Load weights `save_trained_weights` wrote (every rank reads the file under FSDP)."""
    from safetensors.torch import load_file

    device = "cpu" if distributed.is_sharded(model) else str(model_device(model))
    _, unexpected = full_state.load_full_state(model, load_file(str(path), device=device))
    if unexpected:
        raise UserError(f"{path} does not match this model: unexpected {unexpected[:3]}")
