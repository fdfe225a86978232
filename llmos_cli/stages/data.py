"""`llmos data`: prepare (or reuse) the recipe's dataset, for any format, through the data pipeline."""

from __future__ import annotations

from llmos_cli.core.data.prepare import PreparedData, plan_steps, prepare
from llmos_cli.recipe import Recipe
from llmos_cli.stages.checks import check_data


def run(recipe: Recipe, *, force: bool = False) -> PreparedData:
    check_data(recipe)
    return prepare(recipe, force=force)


def plan(recipe: Recipe) -> list[str]:
    """--dry-run: what `run` would do, refused as the run would refuse it."""
    check_data(recipe)
    return plan_steps(recipe)
