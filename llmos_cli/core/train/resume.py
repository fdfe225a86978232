"""Where a training run picks up: the checkpoint to resume from, what it restores, and the result of a
run that had already finished."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_cli.console import out
from llmos_cli.core.distributed import World
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.core.train import full_state
from llmos_cli.core.train.checkpoint import check_compatible, latest_checkpoint
from llmos_cli.core.train.early_stopping import MetricWatch
from llmos_cli.errors import UserError
from llmos_cli.recipe import TrainSection

# The settings a finished run was trained with: a rerun that changes one would train nothing with it.
TRAINING_SETTINGS = (
    "lr", "warmup", "scheduler", "weight_decay", "betas", "max_grad_norm", "precision",
    "early_stopping", "keep_best", "class_weights",
)  # fmt: skip


@dataclass
class Resumed:
    """Where the run starts: the checkpoint it resumed from (None: from scratch), and for a run that
    had already finished, its logged result."""

    path: Path | None = None
    last_loss: float | None = None
    validation: dict[str, float] | None = None


def resume(
    cfg: TrainSection,
    run: RunDir,
    compat: dict[str, Any],
    trained: tuple[Any, Any, Any],
    state: dict[str, int],
    watch: MetricWatch,
    steps: int,
    world: World,
) -> Resumed:
    """Restore the model, optimizer and scheduler (`trained`), the loop's `state` and the watch from the
    checkpoint train.resume names (auto: the latest), checking that the run's settings still match."""
    path = world.broadcast(_resume_point(cfg, run))
    if path is None:
        return Resumed()
    saved = full_state.load_checkpoint(path, *trained)
    check_compatible(saved.get("compat", {}), compat, path)
    state.update({k: saved[k] for k in state})
    watch.restore(saved.get("watch"))
    if world.is_main:
        _truncate_metrics(run, state["step"])
    if state["step"] < steps and not watch.should_stop:
        out.info(f"train: resumed from {path} at step {state['step']}")
        return Resumed(path)
    _refuse_changed_finished_run(saved.get("settings"), training_settings(cfg), path, state["step"])
    out.info(
        f"train: {run.path} already finished at step {state['step']}: nothing to train "
        "(raise train.max_steps to train on)"
    )
    return Resumed(path, *last_logged(run))


def training_settings(cfg: TrainSection) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in TRAINING_SETTINGS}


def last_logged(run: RunDir, up_to: int | None = None) -> tuple[float | None, dict[str, float] | None]:
    """The last training loss and validation metrics in a run's log (a finished run's result), or the
    last ones logged at or before step `up_to`."""
    rows = [r for r in run.read_metrics() if up_to is None or r.get("step", 0) <= up_to]
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "validation"]
    loss = train_rows[-1]["loss"] if train_rows else None
    validation = (
        {k: v for k, v in val_rows[-1].items() if k not in ("step", "split", "time")} if val_rows else None
    )
    return loss, validation


def _resume_point(cfg: TrainSection, run: RunDir) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(run.checkpoints)
    path = Path(cfg.resume)
    if not path.is_dir():
        raise UserError(f"train.resume: checkpoint not found: {path}")
    return path


def _refuse_changed_finished_run(
    saved: dict[str, Any] | None, now: dict[str, Any], path: Path, step: int
) -> None:
    """A finished run resumed with other training settings: say so instead of silently doing nothing."""
    changed = [
        f"train.{k}: {saved[k]!r} -> {now[k]!r}" for k in now if saved and k in saved and saved[k] != now[k]
    ]
    if changed:
        raise UserError(
            f"{path.parent.parent} already finished at step {step} with other settings ({'; '.join(changed)}); "
            "resuming it would train nothing",
            hint="use a new run.output_dir, or --set train.resume=never to train again from scratch",
        )


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so the log has no repeats."""
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    write_atomic(run.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
