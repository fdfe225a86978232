"""`llmos models` and `llmos run` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_recipe


def test_models_add_list_show_rm(run_cli, tiny_recipe: Path, tmp_path: Path) -> None:
    res = run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=2", "--set", "train.eval_every=2")
    assert res.code == 0, res.stderr
    listed = json.loads(run_cli("--json", "models", "list").stdout)
    assert [m["kind"] for m in listed] == ["run"] and listed[0]["path"].endswith("final")
    shown = json.loads(run_cli("--json", "models", "show", listed[0]["name"]).stdout)
    assert shown["data_fingerprint"] and shown["recipe_hash"]
    import shutil

    shutil.copytree(tmp_path / "run" / "final", tmp_path / "copy")
    again = run_cli("models", "add", tmp_path / "run", "--name", "other")
    assert again.code == 2 and "already registered" in again.stderr
    add = run_cli("--json", "models", "add", tmp_path / "copy", "--parent", listed[0]["name"])
    assert add.code == 0, add.stderr
    assert run_cli("models", "rm", "copy").code == 0
    missing = run_cli("models", "show", "copy")
    assert missing.code == 2 and "copy" in missing.stderr


def test_run_pipeline_then_skip(run_cli, tiny_recipe: Path, tmp_path: Path) -> None:
    import yaml

    body = yaml.safe_load(tiny_recipe.read_text())
    body["pipeline"] = {"stages": ["data", "pretrain", "eval"]}
    body["train"]["max_steps"] = 4
    path = write_recipe(tmp_path / "pipe.yaml", body)
    first = run_cli("--json", "run", path)
    assert first.code == 0, first.stderr
    assert [s["status"] for s in json.loads(first.stdout)["stages"]] == ["ran", "ran", "ran"]
    plan = run_cli("--json", "run", path, "--dry-run", "--set", "eval.batch_size=3")
    assert [s["action"] for s in json.loads(plan.stdout)["plan"]] == ["skip", "skip", "run"]
    again = run_cli("--json", "run", path)
    assert [s["status"] for s in json.loads(again.stdout)["stages"]] == ["skipped"] * 3
    assert (tmp_path / "run" / "llmos.lock").exists()
