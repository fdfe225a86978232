"""The run directory: resolved recipe, metrics log, checkpoints, final model, eval results."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from llmos_cli.core.writable import disk_full_is_clear, ensure_dir, match_umask


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_is_clear(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            match_umask(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def precision_file(self) -> Path:
        return self.path / "precision.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    def create(self, recipe_yaml: str) -> RunDir:
        ensure_dir(self.path, "run.output_dir")
        write_atomic(self.recipe_file, recipe_yaml)
        return self

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (one JSON object per line, flushed at once)."""
        row = {"time": round(time.time(), 3), **row}
        with self.metrics_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
