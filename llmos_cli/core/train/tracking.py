"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases, when asked for."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from llmos_cli.core.rundir import RunDir
from llmos_cli.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Every tracker in train.log_to is installed (checked before a run writes anything)."""
    for name in dict.fromkeys(names):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise _not_installed(name)


def _not_installed(name: str) -> UserError:
    return UserError(
        f"train.log_to: {name} is not installed", hint=f"pip install {PACKAGES[name]}, or drop it"
    )


class Trackers:
    """Fan one metrics row out to every tracker; rows split into train/ and validation/ series."""

    def __init__(self, names: list[str], run: RunDir, config: dict[str, Any]):
        self._sinks: list[Any] = []
        for name in dict.fromkeys(names):
            try:
                self._sinks.append(_OPEN[name](run, config))
            except ImportError:
                self.close()
                raise _not_installed(name) from None
            except Exception as err:  # noqa: BLE001 - a tracker refusing its settings (store URI, login, mode)
                self.close()
                raise UserError(
                    f"train.log_to: {name} could not start: {type(err).__name__}: {str(err).splitlines()[0]}",
                    hint=f"check {name}'s own settings (its environment variables), or drop it",
                ) from None

    def log(self, row: dict[str, Any]) -> None:
        if not self._sinks:
            return
        split = row.get("split", "train")
        values = {
            f"{split}/{k}": float(v)
            for k, v in row.items()
            if k not in ("step", "time", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for sink in self._sinks:
            sink.log(values, int(row["step"]))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, run: RunDir, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run: RunDir, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run.path.name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, run: RunDir, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(name=run.path.name, dir=str(run.path), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPEN = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


@contextlib.contextmanager
def open_trackers(names: list[str], run: RunDir, config: dict[str, Any]) -> Iterator[Trackers]:
    trackers = Trackers(names, run, config)
    try:
        yield trackers
    finally:
        trackers.close()
