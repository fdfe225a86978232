"""`llmos data`: prepare (or reuse) the recipe's dataset, for any format, through the data pipeline."""

from __future__ import annotations

from llmos_cli.core.data.prepare import PreparedData, prepare
from llmos_cli.recipe import Recipe
from llmos_cli.stages.checks import check_data


def run(recipe: Recipe, *, force: bool = False) -> PreparedData:
    check_data(recipe)
    return prepare(recipe, force=force)
