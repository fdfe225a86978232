"""What each stage checks before it touches anything: its `run` calls these first, and so does
`--dry-run`, so a plan is refused with the same message as the run would be. Rules between recipe
keys alone live in the recipe schema (recipe.py), which every load applies; these are the rules that
depend on the stage."""

from __future__ import annotations

from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe


def check_data(recipe: Recipe) -> None:
    if not recipe.data.train:
        raise UserError(f"{recipe.source}: data.train: no training data given")


def check_pretrain(recipe: Recipe) -> None:
    if recipe.task != "causal-lm":
        raise UserError(f"task: pretrain trains causal LMs only (got '{recipe.task}'); use `llmos finetune`")
    check_data(recipe)


def check_finetune(recipe: Recipe) -> None:
    if not recipe.model.name_or_path:
        raise UserError(
            f"{recipe.source}: model.name_or_path: finetune needs a base model (a directory or hub id)"
        )
    if recipe.data.format == "text" and recipe.task != "causal-lm":
        raise UserError(f"data.format: text data fits task causal-lm, not '{recipe.task}'")
    check_data(recipe)


STAGE_CHECKS = {"data": check_data, "pretrain": check_pretrain, "finetune": check_finetune}
