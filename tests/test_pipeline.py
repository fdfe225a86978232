"""`llmos run`: chained stages, skipping the unchanged ones, rerunning exactly the changed ones; the lock."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from llmos_cli.core.lockfile import FileHashes
from llmos_cli.core.registry import Registry
from llmos_cli.errors import UserError
from llmos_cli.recipe import load_recipe
from llmos_cli.stages import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def pipeline_recipe(tiny_recipe: Path) -> Path:
    body = yaml.safe_load(tiny_recipe.read_text())
    body["train"].update(max_steps=4, eval_every=4, save_every=2, log_every=2)
    body["pipeline"] = {"stages": ["data", "pretrain", "eval"]}
    tiny_recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    return tiny_recipe


def statuses(result: dict) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in result["stages"]}


def test_rerun_skips_unchanged_stages_and_reruns_exactly_the_changed_ones(
    pipeline_recipe: Path, tmp_path: Path, corpus: Path
) -> None:
    run = tmp_path / "run"
    first = pipeline.run(pipeline_recipe, [])
    assert statuses(first) == {"data": "ran", "pretrain": "ran", "eval": "ran"}
    assert (run / "final" / "model.safetensors").exists() and (run / "eval.json").exists()
    entry = Registry().get("tiny")  # the pretrain run registered itself
    assert entry.kind == "run" and entry.path == str((run / "final").resolve())
    assert entry.data_fingerprint == first["stages"][0]["result"]["fingerprint"]
    assert entry.metrics["train_loss"] > 0 and entry.size_bytes > 0

    again = pipeline.run(pipeline_recipe, [])
    assert statuses(again) == {"data": "skipped", "pretrain": "skipped", "eval": "skipped"}
    assert [s["fingerprint"] for s in again["stages"]] == [s["fingerprint"] for s in first["stages"]]

    assert pipeline.plan(pipeline_recipe, ["eval.batch_size=4"]) == [
        {"stage": "data", "action": "skip", "reason": "unchanged"},
        {"stage": "pretrain", "action": "skip", "reason": "unchanged"},
        {"stage": "eval", "action": "run", "reason": "changed: recipe eval"},
    ]
    eval_only = pipeline.run(pipeline_recipe, ["eval.batch_size=4"])
    assert statuses(eval_only) == {"data": "skipped", "pretrain": "skipped", "eval": "ran"}

    # A training change reruns training and what reads its model, and starts the run over.
    retrain = pipeline.run(pipeline_recipe, ["eval.batch_size=4", "train.lr=1e-3"])
    assert statuses(retrain) == {"data": "skipped", "pretrain": "ran", "eval": "ran"}
    assert "changed: recipe train" in retrain["stages"][1]["reason"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4]  # a fresh run, not a resume of the old one, nor an appended log

    # Changed input data reruns everything downstream of it.
    corpus.write_text(corpus.read_text() + json.dumps({"text": "a brand new document. " * 3}) + "\n")
    changed = pipeline.run(pipeline_recipe, ["eval.batch_size=4", "train.lr=1e-3"])
    assert statuses(changed) == {"data": "ran", "pretrain": "ran", "eval": "ran"}
    assert f"input {corpus}" in changed["stages"][0]["reason"]

    # A missing output is rebuilt; nothing else runs.
    (run / "eval.json").unlink()
    rebuilt = pipeline.run(pipeline_recipe, ["eval.batch_size=4", "train.lr=1e-3"])
    assert statuses(rebuilt) == {"data": "skipped", "pretrain": "skipped", "eval": "ran"}
    assert "output missing" in rebuilt["stages"][2]["reason"]


def test_lock_records_versions_inputs_and_fingerprints_and_replays(
    pipeline_recipe: Path, tmp_path: Path, corpus: Path, monkeypatch, capsys
) -> None:
    data_only = ["pipeline.stages=[data]"]
    result = pipeline.run(pipeline_recipe, data_only)
    lock_path = tmp_path / "run" / "llmos.lock"
    lock = json.loads(lock_path.read_text())
    assert result["lock"] == str(lock_path)
    assert {"python", "torch", "transformers", "datasets", "tokenizers", "peft", "llmos-cli"} <= set(
        lock["packages"]
    )
    assert lock["packages"]["torch"] is not None
    assert lock["inputs"] == {str(corpus): FileHashes({}).file(corpus)}
    assert lock["stages"] == {"data": result["stages"][0]["fingerprint"]}
    assert load_recipe(pipeline_recipe, data_only).model_dump(mode="json") == lock["recipe"]

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []
    data_stage = pipeline.STAGES["data"]

    def spy_call(recipe):
        seen.append(constants.HF_HUB_OFFLINE)
        return data_stage.call(recipe)

    spy = dataclasses.replace(data_stage, call=spy_call)
    monkeypatch.setitem(pipeline.STAGES, "data", spy)
    lock["packages"]["torch"] = "0.0.1"
    lock_path.write_text(json.dumps(lock))
    capsys.readouterr()
    replayed = pipeline.replay(lock_path)
    assert replayed["matches_lock"] and statuses(replayed) == {"data": "skipped"}
    assert "torch 0.0.1 locked" in capsys.readouterr().err and replayed["version_drift"]

    shutil.rmtree(tmp_path / "data")  # outputs gone (a fresh checkout): replay rebuilds them, identically
    rebuilt = pipeline.replay(lock_path)
    assert rebuilt["matches_lock"] and statuses(rebuilt) == {"data": "ran"}
    assert seen == [True]  # the stage ran with the hub switched off...
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # ...and only then

    corpus.write_text(corpus.read_text() + json.dumps({"text": "changed"}) + "\n")
    with pytest.raises(UserError, match="changed since the lock was written"):
        pipeline.replay(lock_path)


def test_pipeline_section_is_validated(pipeline_recipe: Path) -> None:
    with pytest.raises(UserError, match="pipeline.stages: .*must follow the order data -> pretrain"):
        load_recipe(pipeline_recipe, ["pipeline.stages=[eval, data]"])
    with pytest.raises(UserError, match="pretrain or finetune"):
        load_recipe(pipeline_recipe, ["pipeline.stages=[pretrain, finetune]"])
    with pytest.raises(UserError, match="no stages to run"):
        pipeline.run(pipeline_recipe, ["pipeline.stages=[]"])


def test_quickstart_pipeline_recipe_is_valid() -> None:
    recipe = load_recipe(ROOT / "recipes" / "pipeline-quickstart.yaml")
    assert recipe.pipeline.stages == ["data", "pretrain", "eval"] and recipe.run.name == "quickstart"


def test_the_plan_refuses_what_the_run_would(pipeline_recipe: Path) -> None:
    with pytest.raises(UserError, match="finetune needs a base model"):
        pipeline.plan(pipeline_recipe, ["pipeline.stages=[data, finetune]"])
    with pytest.raises(UserError, match="data.train: no training data given"):
        pipeline.plan(pipeline_recipe, ["data.train=null"])
