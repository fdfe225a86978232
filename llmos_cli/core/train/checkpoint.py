"""Resumable checkpoints: written to a temp dir, fsynced, marked complete, then renamed into place.

A checkpoint holds the model (safetensors), optimizer and scheduler state (tensors and numbers only,
loaded with weights_only=True), RNG states and the training position. Only directories with the
completion marker count, so a crash mid-save never leaves a checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos_cli.core.writable import disk_full_is_clear, match_umask
from llmos_cli.errors import UserError

COMPLETE = "complete.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def save_checkpoint(
    root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep_last: int
) -> Path:
    from safetensors.torch import save_model

    target = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{uuid.uuid4().hex[:8]}"
    with disk_full_is_clear(target):
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            save_model(model, str(tmp / "model.safetensors"))
            rng_tensors = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng_tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_tensors,
                },
                tmp / "trainer_state.pt",
            )
            (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_state()}))
            (tmp / COMPLETE).write_text(json.dumps({"step": step}))
            match_umask(tmp)
            _fsync_tree(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    prune(root, keep_last)
    return target


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first; partial ones (no marker) are ignored."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).exists() and (d / "model.safetensors").exists():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; returns the saved training state."""
    from safetensors.torch import load_model

    if not (path / COMPLETE).exists():
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE})")
    load_model(model, str(path / "model.safetensors"))
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    state = json.loads((path / "state.json").read_text())
    restore_rng(state.pop("rng"), blob["rng"])
    return state


# What a checkpoint saved before a compatibility key existed did: fine-tuning grouped every unpacked
# batch by length until train.group_by_length came.
BEFORE_THE_KEY: dict[str, Any] = {"group_by_length": True}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when what defines the run changed, saying exactly what changed."""
    saved = {**{k: v for k, v in BEFORE_THE_KEY.items() if k in current}, **saved}
    changed = [
        f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in current if saved.get(key) != current[key]
    ]
    if changed:
        raise UserError(
            f"cannot resume from {path}: the recipe changed since it was saved ({'; '.join(changed)})",
            hint="restore those settings, set train.resume=never to start over, or use a new run.output_dir",
        )
