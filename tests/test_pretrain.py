"""Pretraining a tiny llama end to end: the loss falls, the run dir is complete, final/ is plain HF."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from llmos_cli.core.train.checkpoint import complete_checkpoints
from llmos_cli.recipe import load_recipe
from llmos_cli.stages import pretrain


def test_tiny_pretrain_loss_falls_and_run_dir_is_complete(tiny_recipe: Path, tmp_path: Path, run_cli) -> None:
    old_umask = os.umask(0o022)
    try:
        res = run_cli("--json", "pretrain", tiny_recipe)
    finally:
        os.umask(old_umask)
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val_rows] == [15, 30]
    assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"] < 0.8 * math.log(300)
    assert val_rows[-1]["loss"] < val_rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and "lr" in r for r in train_rows)
    assert summary["steps"] == 30 and summary["validation"]["loss"] == val_rows[-1]["loss"]

    assert load_recipe(run / "recipe.yaml").train.max_steps == 30  # the resolved recipe, re-loadable
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the curves, at the end
    assert not [p.name for p in run.iterdir() if p.name.startswith(".loss.png")]  # no temp file left
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [
        "step-20",
        "step-30",
    ]  # keep_last=2

    from transformers import AutoModelForCausalLM, AutoTokenizer  # plain transformers, no llmos

    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    tok = AutoTokenizer.from_pretrained(str(run / "final"))
    assert (run / "final" / "model.safetensors").exists()
    owner_only = [  # every file follows the umask (0o022: readable by all), as a plain open() would
        str(p.relative_to(tmp_path))
        for p in [tmp_path / "data", run, *(tmp_path / "data").rglob("*"), *run.rglob("*")]
        if p.stat().st_mode & 0o777 not in (0o644, 0o755)
    ]
    assert owner_only == []
    ids = tok("the cat sat on the", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.isfinite(float(loss)) and float(loss) < math.log(len(tok))


def test_resume_continues_the_same_loss_curve(tiny_recipe: Path, tmp_path: Path) -> None:
    """A run stopped after step 20 and resumed equals an uninterrupted run, step for step."""
    full = pretrain.run(load_recipe(tiny_recipe, [f"run.output_dir={tmp_path / 'full'}", "run.name=full"]))
    part = [f"run.output_dir={tmp_path / 'part'}", "run.name=part"]
    pretrain.run(load_recipe(tiny_recipe, [*part, "train.max_steps=30"]))
    # Simulate a crash after step 20: drop the last checkpoint and everything logged after it.
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-30")
    resumed = pretrain.run(load_recipe(tiny_recipe, part))

    def losses(run: str) -> list[float]:
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows]

    assert losses("part") == losses("full")
    assert resumed["train_loss"] == full["train_loss"]


def test_resume_refuses_a_changed_recipe(tiny_recipe: Path, tmp_path: Path, run_cli) -> None:
    pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=10"]))
    res = run_cli("pretrain", tiny_recipe, "--set", "train.batch_size=4")
    assert res.code == 2 and "cannot resume" in res.stderr and "batch_size: 8 -> 4" in res.stderr


def test_a_finished_run_reports_its_result_and_refuses_other_settings(
    tiny_recipe: Path, tmp_path: Path, run_cli
) -> None:
    first = pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=10"]))
    res = run_cli("--json", "pretrain", tiny_recipe, "--set", "train.max_steps=10")
    assert res.code == 0 and "already finished at step 10: nothing to train" in " ".join(res.stderr.split())
    again = json.loads(res.stdout)
    assert again["steps"] == 10 and again["train_loss"] == pytest.approx(first["train_loss"], abs=1e-6)
    assert again["validation"]["loss"] == pytest.approx(first["validation"]["loss"], abs=1e-6)
    assert again["validation"].keys() == first["validation"].keys()

    res = run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=10", "--set", "train.lr=0.001")
    said = " ".join(res.stderr.split())
    assert res.code == 2 and "already finished at step 10 with other settings" in said
    assert "train.lr: 0.003 -> 0.001" in said and "train.resume=never" in said


def test_keep_best_reports_the_kept_weights_metrics(tiny_recipe: Path, tmp_path: Path, run_cli) -> None:
    # mode=max on the loss: every evaluation after the first is "worse", so patience 1 at eval_every 5
    # stops at step 10 and keep_best brings back the step-5 weights: the result must describe those.
    sets = ["train.eval_every=5", "train.keep_best=true"]
    sets += ["train.early_stopping={metric: loss, mode: max, patience: 1}"]
    res = run_cli("--json", "pretrain", tiny_recipe, *(a for s in sets for a in ("--set", s)))
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["stopped_early"] is True and summary["steps"] == 10
    assert summary["best"] == {
        "metric": "loss",
        "value": pytest.approx(summary["validation"]["loss"]),
        "step": 5,
    }
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    at5 = {r.get("split", "train"): r for r in rows if r["step"] == 5}
    assert summary["validation"]["loss"] == at5["validation"]["loss"]
    assert summary["train_loss"] == pytest.approx(at5["train"]["loss"], abs=1e-6)
    listed = json.loads(run_cli("--json", "models", "list").stdout)
    (entry,) = [e for e in listed if e["name"] == "tiny"]
    assert entry["metrics"]["validation_loss"] == at5["validation"]["loss"]
    assert entry["metrics"]["train_loss"] == pytest.approx(at5["train"]["loss"], abs=1e-6)
