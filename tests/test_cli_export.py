"""`llmos export RECIPE` exports the run's final model, verifies it and registers the export."""

from __future__ import annotations

import json
from pathlib import Path


def test_export_from_a_recipe(run_cli, tiny_recipe: Path, tmp_path: Path) -> None:
    assert run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=2").code == 0
    res = run_cli("--json", "export", tiny_recipe, "--format", "hf")
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)
    export = summary["exports"][0]
    assert export["ok"] and export["max_abs_diff"] <= export["tolerance"]
    assert Path(export["path"]) == tmp_path / "run" / "export"
    verify = json.loads((tmp_path / "run" / "export" / "verify.json").read_text())
    assert verify["ok"] is True
    kinds = {m["kind"] for m in json.loads(run_cli("--json", "models", "list").stdout)}
    assert kinds == {"run", "export"}


def test_export_refuses_bad_format_and_missing_out(run_cli, tmp_path: Path) -> None:
    res = run_cli("export", tmp_path, "--format", "tflite", "--out", tmp_path / "x")
    assert res.code == 2 and "tflite" in res.stderr
    res = run_cli("export", tmp_path, "--format", "hf")
    assert res.code == 2 and "--out" in res.stderr
