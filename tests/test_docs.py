"""docs/recipes.md documents every recipe key the schema accepts."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmos_cli.recipe import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += schema_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_recipe_key_is_documented() -> None:
    text = DOC.read_text()
    # a row may document siblings together: `data.prompt_field`, `data.response_field`, or `.alpha`
    missing = [
        k for k in schema_keys(Recipe) if f"`{k}`" not in text and f"`.{k.rsplit('.', 1)[-1]}`" not in text
    ]
    assert not missing, f"undocumented recipe keys in docs/recipes.md: {missing}"
