"""No lost work: SIGTERM saves and exits cleanly, divergence stops before saving bad weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmos_cli.core.train.checkpoint import complete_checkpoints, save_checkpoint
from llmos_cli.core.train.loop import NonFiniteGuard
from llmos_cli.core.train.objectives import CAUSAL_LM, Objective
from llmos_cli.errors import RunFailed
from llmos_cli.recipe import load_recipe
from llmos_cli.stages import pretrain
from tests.conftest import wait_until


def test_sigterm_finishes_the_step_saves_and_resumes(tiny_recipe: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "llmos_cli",
        "pretrain",
        str(tiny_recipe),
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.log_every=1",
        "--set",
        "train.save_every=100000",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(
        lambda: metrics.exists() and metrics.read_text().count("\n") >= 3,
        alive=lambda: proc.poll() is None,
        what=proc.communicate,
        timeout=120,
        interval=0.2,
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert step >= 3

    result = pretrain.run(load_recipe(tiny_recipe, [f"train.max_steps={step + 2}"]))
    assert result["steps"] == step + 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_recipe: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = CAUSAL_LM.loss_sum(model, batch)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(pretrain, "CAUSAL_LM", Objective(poisoned, CAUSAL_LM.count))
    with pytest.raises(RunFailed, match=r"diverged at step 13: gradient norm is nan.*step-10"):
        pretrain.run(load_recipe(tiny_recipe))
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-10"]
    assert not (tmp_path / "run" / "final").exists()


def test_nonfinite_guard_keeps_the_first_bad_step_and_norm() -> None:
    import torch

    guard = NonFiniteGuard(torch.device("cpu"))
    for step, norm in [(1, 0.5), (2, 3.0)]:
        guard.record(step, torch.tensor(norm))
    assert guard.first_bad() is None
    for step, norm in [(3, float("inf")), (4, 1.0), (5, float("nan"))]:
        guard.record(step, torch.tensor(norm))
    assert guard.first_bad() == (3, float("inf"))


def test_gradient_norm_reaches_the_host_only_where_the_loop_syncs_anyway(
    tiny_recipe: Path, monkeypatch
) -> None:
    """No per-step host sync: the guard is read once at each log (every 5), eval (15, 30) or save (10, 20, 30) step."""
    asked: list[int] = []
    first_bad = NonFiniteGuard.first_bad

    def counted(self: NonFiniteGuard) -> tuple[int, float] | None:
        asked.append(1)
        return first_bad(self)

    monkeypatch.setattr(NonFiniteGuard, "first_bad", counted)
    pretrain.run(load_recipe(tiny_recipe))
    assert len(asked) == len({5, 10, 15, 20, 25, 30})


def test_partial_checkpoints_are_never_resumed(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, model, opt, sched, {"step": 5}, keep_last=3)
    (root / "step-9").mkdir()  # a crash mid-save leaves a directory without the completion marker
    (root / "step-9" / "model.safetensors").write_bytes(b"partial")
    (root / ".step-11.tmp-abcd").mkdir()
    assert [p.name for p in complete_checkpoints(root)] == ["step-5"]


def _train_losses(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("split") != "validation"}


def test_sigkill_mid_run_resumes_to_the_same_loss_curve(tiny_recipe: Path, tmp_path: Path) -> None:
    """kill -9 (no handler runs, possibly mid-save), rerun the same command: the curve is unchanged."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    sets = ["train.max_steps=16", "train.log_every=1", "train.save_every=2", "train.eval_every=100"]

    def command(run: str) -> list[str]:
        args = [*sets, f"run.output_dir={tmp_path / run}", f"run.name={run}"]
        return [sys.executable, "-m", "llmos_cli", "pretrain", str(tiny_recipe)] + [
            arg for s in args for arg in ("--set", s)
        ]

    pretrain.run(load_recipe(tiny_recipe, [*sets, f"run.output_dir={tmp_path / 'whole'}", "run.name=whole"]))
    expected = _train_losses(tmp_path / "whole" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 17))

    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "killed" / "checkpoints"
    wait_until(
        lambda: len(complete_checkpoints(checkpoints)) >= 2,
        alive=lambda: proc.poll() is None,
        what=proc.communicate,
        timeout=120,
        interval=0.02,
    )
    proc.kill()  # SIGKILL: nothing flushes, nothing cleans up
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()
    killed_at = max(_train_losses(tmp_path / "killed" / "metrics.jsonl"))
    assert killed_at < 16

    again = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "Traceback" not in again.stderr
    assert _train_losses(tmp_path / "killed" / "metrics.jsonl") == expected
    assert (tmp_path / "killed" / "final" / "model.safetensors").exists()
