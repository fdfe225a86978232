"""Every rule a stage refuses is refused the same way by `recipe validate` and by `--dry-run`: the rules
between keys live in the recipe schema, the stage's own in stages/checks.py, and all three doors call them."""

from __future__ import annotations

import pytest

NEEDS_VALIDATION = "needs validation data: set data.validation, or data.validation_split above 0"
RULES = [
    (
        "finetune",
        ["task=classification", "data.format=instruction", "model.name_or_path=m"],
        "data.format: 'instruction' does not fit task 'classification' (use classification)",
    ),
    (
        "finetune",
        ["train.class_weights=balanced", "model.name_or_path=m", "data.format=instruction"],
        "train.class_weights: only classification uses class weights (task is 'causal-lm')",
    ),
    (
        "finetune",
        ["finetune.qlora=true", "finetune.method=full", "model.name_or_path=m"],
        "finetune.qlora: needs finetune.method=lora (a 4-bit model cannot be trained in full); "
        "finetune.method: qlora says both",
    ),
    (
        "pretrain",
        ["train.early_stopping.metric=accuracy"],
        "train.early_stopping.metric: 'accuracy' is not a validation metric of task causal-lm "
        "(available: loss, perplexity)",
    ),
    ("pretrain", ["train.keep_best=true", "data.validation_split=0"], f"train.keep_best: {NEEDS_VALIDATION}"),
    (
        "pretrain",
        ["train.early_stopping.patience=2", "data.validation_split=0"],
        f"train.early_stopping: {NEEDS_VALIDATION}",
    ),
    (
        "pretrain",
        ["task=seq2seq"],
        "task: pretrain trains causal LMs only (got 'seq2seq'); use `llmos finetune`",
    ),
    (
        "finetune",
        ["task=classification", "model.name_or_path=m"],
        "data.format: text data fits task causal-lm, not 'classification'",
    ),
    ("finetune", [], "{recipe}: model.name_or_path: finetune needs a base model (a directory or hub id)"),
    ("data", ["data.train=null"], "{recipe}: data.train: no training data given"),
]


@pytest.mark.parametrize(("stage", "sets", "message"), RULES, ids=[r[2].split(":")[-2][-30:] for r in RULES])
def test_validate_dry_run_and_run_refuse_alike(run_cli, tiny_recipe, tmp_path, stage, sets, message) -> None:
    args = [a for s in sets for a in ("--set", s)]
    expected = f"error: {message.format(recipe=tiny_recipe)}\n"
    for command in (
        ["recipe", "validate", tiny_recipe, "--stage", stage, *args],
        [stage, tiny_recipe, *args, "--dry-run"],
        [stage, tiny_recipe, *args],
    ):
        res = run_cli(*command)
        assert (res.code, res.stderr) == (2, expected), command
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_validate_runs_the_checks_of_the_recipes_pipeline_stages(run_cli, tiny_recipe) -> None:
    res = run_cli(
        "recipe", "validate", tiny_recipe, "--set", "pipeline.stages=[data,pretrain]", "--set", "task=seq2seq"
    )
    assert res.code == 2 and "task: pretrain trains causal LMs only" in res.stderr
    assert run_cli("recipe", "validate", tiny_recipe, "--stage", "pretrain").code == 0
    res = run_cli("recipe", "validate", tiny_recipe, "--stage", "serve")
    assert res.code == 2 and "--stage: unknown stage 'serve' (known: data, pretrain, finetune)" in res.stderr
