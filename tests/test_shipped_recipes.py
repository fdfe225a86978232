"""Every recipe and preset shipped in recipes/ and configs/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    if path.parent.name == "recipes" and recipe.data.train and not recipe.data.train.startswith("hub:"):
        assert Path(recipe.data.train).exists(), f"{path.name}: data.train {recipe.data.train} is missing"
