"""MODEL arguments and model.name_or_path: one rule everywhere (recipe folder, working directory,
registered name, then the hub), and one clear line when a model is none of these."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.models import resolve_model_dir
from llmos_cli.core.registry import Registry
from llmos_cli.errors import UserError
from llmos_cli.stages import finetune
from tests.conftest import write_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", hidden=32)


@pytest.fixture
def quickstart(tiny_model: Path, run_cli, tmp_path: Path, monkeypatch) -> Path:
    """`tiny_model` registered as `quickstart`; the working directory is an empty folder."""
    res = run_cli("models", "add", tiny_model, "--name", "quickstart")
    assert res.code == 0, res.stderr
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tiny_model


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_generate_takes_a_registered_name(quickstart: Path, run_cli) -> None:
    res = run_cli("--json", "generate", "quickstart", "--prompt", "import ", "--max-new-tokens", "3")
    assert res.code == 0, res.stderr
    assert len(json.loads(res.stdout)["completions"]) == 1


def test_chat_export_and_serve_take_a_registered_name(
    quickstart: Path, run_cli, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt="": "/exit")
    assert run_cli("chat", "quickstart").code == 0
    res = run_cli("--json", "export", "quickstart", "--format", "hf", "--out", tmp_path / "exported")
    assert res.code == 0, res.stderr
    assert (tmp_path / "exported" / "config.json").exists()
    from llmos_cli.stages import serve

    app = serve.build_app("quickstart", api_key=None)  # what `llmos serve quickstart` loads
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # clients ask for the model by the name they served it as
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["quickstart"]


def test_eval_and_finetune_take_a_registered_name(quickstart: Path, run_cli, tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": "import os"}) + "\n" for _ in range(4)))
    recipe = write_recipe(
        tmp_path / "eval.yaml",
        {
            "run": {"name": "ev", "output_dir": str(tmp_path / "ev")},
            "model": {"name_or_path": "quickstart"},
            "eval": {"data": "eval.jsonl", "batch_size": 2},
        },
    )
    res = run_cli("--json", "eval", recipe)
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["model"] == str(quickstart)
    assert finetune.resolve_base("quickstart", str(recipe)).path.resolve() == quickstart.resolve()


def test_a_local_path_wins_over_a_registered_name(quickstart: Path, run_cli) -> None:
    Path("quickstart").mkdir()  # a folder in the working directory, not a model
    res = run_cli("generate", "quickstart", "--prompt", "x")
    assert res.code == 2 and "is not a model directory" in one_error_line(res.stderr)
    assert resolve_model_dir(str(quickstart)) == quickstart


def test_unknown_model_names_the_registry(quickstart: Path, run_cli, tmp_path: Path) -> None:
    res = run_cli("generate", "nosuch", "--prompt", "x")
    line = one_error_line(res.stderr)
    assert res.code == 2
    assert "nosuch" in line and f"looked in {tmp_path / 'cwd'}" in line and "not a registered model" in line
    assert "llmos models list" in res.stderr


def test_lookup_does_not_create_the_model_library(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match="not a registered model"):
        resolve_model_dir("nosuch")
    assert not (tmp_path / "home").exists()


@pytest.fixture
def missing_base_recipe(tmp_path: Path, monkeypatch) -> Path:
    """The shipped lora-instruct layout: model.name_or_path runs/quickstart, run from a folder without it."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(
        folder / "recipe.yaml",
        {
            "run": {"name": "lora", "output_dir": str(tmp_path / "runs" / "lora")},
            "model": {"name_or_path": "runs/quickstart"},
            "data": {"train": "train.jsonl", "format": "instruction", "output": str(tmp_path / "data")},
            "finetune": {"method": "lora"},
            "train": {"max_steps": 1},
        },
    )
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return recipe


@pytest.mark.parametrize("verb", ["data", "finetune", "eval"])
def test_missing_model_path_is_one_line_naming_where_it_looked(
    verb: str, missing_base_recipe: Path, run_cli, tmp_path: Path
) -> None:
    res = run_cli(verb, missing_base_recipe)
    line = one_error_line(res.stderr)
    assert res.code == 2
    assert line.startswith(f"error: {missing_base_recipe}: model.name_or_path: runs/quickstart: not found")
    assert f"(looked in {tmp_path / 'recipes'} and {tmp_path / 'cwd'})" in line
    assert "not a registered model" in line and "Hugging Face Hub" in line and "HF_HUB_OFFLINE is set" in line
    assert "data.format" not in res.stderr  # the data stage no longer blames a key that is set


def test_unreachable_hub_is_named_in_the_same_line(missing_base_recipe: Path, run_cli, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Name or service not known\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    res = run_cli("finetune", missing_base_recipe)
    line = one_error_line(res.stderr)
    assert res.code == 2 and "Name or service" not in res.stderr
    assert line.endswith(
        "not a registered model, and the Hugging Face Hub could not be reached (LocalEntryNotFoundError)"
    )
    assert "HF_HUB_OFFLINE" not in res.stderr


def test_hub_ids_still_download(tiny_model: Path, monkeypatch) -> None:
    import huggingface_hub

    asked = []

    def snapshot(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tiny_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert finetune.resolve_base("org/tiny", "r.yaml").path.resolve() == tiny_model.resolve() and asked == [
        "org/tiny"
    ]
    with pytest.raises(UserError, match="not a registered model\n"):
        resolve_model_dir("org/tiny")  # a CLI MODEL argument never downloads
    assert asked == ["org/tiny"]


def test_registered_name_found_by_its_pulled_hub_id(tiny_model: Path) -> None:
    Registry().add(tiny_model, name="tiny", source="hf://org/tiny")
    assert finetune.resolve_base("org/tiny", None).path.resolve() == tiny_model.resolve()


def test_a_pipeline_fingerprints_the_files_of_a_registered_base(quickstart: Path, tmp_path: Path) -> None:
    """`llmos run` reruns finetune when its base changes, also when the base is named by registration."""
    from llmos_cli.recipe import load_recipe
    from llmos_cli.stages.pipeline import STAGES

    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "import os"}) + "\n")
    recipe = load_recipe(
        write_recipe(
            tmp_path / "ft.yaml",
            {"model": {"name_or_path": "quickstart"}, "data": {"train": str(tmp_path / "train.jsonl")}},
        )
    )
    inputs = STAGES["finetune"].inputs(recipe, ["finetune"])
    assert quickstart.resolve() in [p.resolve() for p in inputs]


def test_model_tokenizer_follows_the_same_rule_without_the_hub(quickstart: Path, tmp_path: Path) -> None:
    from llmos_cli.core.data.prepare import tokenizer_source
    from llmos_cli.recipe import load_recipe

    def recipe_with(tokenizer: str):
        return load_recipe(write_recipe(tmp_path / "r.yaml", {"model": {"tokenizer": tokenizer}}))

    assert tokenizer_source(recipe_with("quickstart")) == quickstart  # a registered name
    (tmp_path / "tok").symlink_to(quickstart)
    assert tokenizer_source(recipe_with("tok")).resolve() == quickstart.resolve()  # beside the recipe
    with pytest.raises(
        UserError, match=r"r\.yaml: model\.tokenizer: someone/tok: not found .*not a registered"
    ):
        tokenizer_source(recipe_with("someone/tok"))
