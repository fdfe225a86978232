"""The recipe system: defaults, extends, --set typing, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_cli.errors import UserError
from llmos_cli.recipe import deep_merge, load_recipe
from tests.conftest import write_recipe


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path / "r.yaml", {"run": {"name": "x"}}))
    assert r.train.max_steps == 1000 and r.train.batch_size == 8 and r.train.lr == 3e-4
    assert r.serve.host == "127.0.0.1" and r.data.packing is True
    assert r.output_dir == Path("runs/x") and r.data_output == Path("runs/data/x")


def test_extends_deep_merges_and_child_wins(tmp_path: Path) -> None:
    write_recipe(
        tmp_path / "base.yaml",
        {
            "model": {"arch": "llama", "config": {"hidden_size": 64, "num_hidden_layers": 2}},
            "train": {"lr": 1e-3, "batch_size": 4},
        },
    )
    (tmp_path / "sub").mkdir()
    child = write_recipe(
        tmp_path / "sub" / "child.yaml",
        {"extends": "../base.yaml", "model": {"config": {"hidden_size": 128}}, "train": {"lr": 5e-4}},
    )
    r = load_recipe(child)
    assert r.model.config == {"hidden_size": 128, "num_hidden_layers": 2}
    assert r.train.lr == 5e-4 and r.train.batch_size == 4


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write_recipe(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_recipe(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_set_overrides_are_yaml_typed(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {})
    r = load_recipe(
        path,
        ["train.lr=3e-4", "data.packing=false", "train.batch_size=32", "run.name=abc", "eval.metrics=[loss]"],
    )
    assert r.train.lr == pytest.approx(3e-4) and r.data.packing is False and r.train.batch_size == 32
    assert r.run.name == "abc" and r.eval.metrics == ["loss"]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"train": {"lrr": 0.1}})
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "r.yaml: train.lrr: unknown key (did you mean 'lr'?)" in str(err.value)


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"train": {"batch_size": "eight"}})
    with pytest.raises(UserError, match=r"r\.yaml: train\.batch_size: .*integer.*'eight'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr", "expected KEY=VALUE"),
        ("train.lr.x=1", "train.lr is a value, not a section"),
        ("train.nope=1", "train.nope: unknown key"),
    ],
)
def test_bad_set(tmp_path: Path, item: str, message: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"train": {"lr": 0.1}})
    with pytest.raises(UserError, match=message):
        load_recipe(path, [item])


def test_input_paths_resolve_relative_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    path = write_recipe(tmp_path / "recipes" / "r.yaml", {"data": {"train": "../data/train.jsonl"}})
    assert Path(load_recipe(path).data.train) == tmp_path / "recipes" / "../data/train.jsonl"


def test_deep_merge_replaces_lists() -> None:
    assert deep_merge({"a": {"b": [1, 2], "c": 1}}, {"a": {"b": [3]}}) == {"a": {"b": [3], "c": 1}}


@pytest.mark.parametrize(
    "body, args, message",
    [
        ({"trian": {}}, [], "trian: unknown key (did you mean 'train'?)"),
        ({"train": {"precision": "fp8"}}, [], "train.precision"),
        ({}, ["--set", "train.batch_size=abc"], "train.batch_size"),
        ({"data": {"train": "missing.jsonl"}}, [], "missing.jsonl"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(tmp_path, run_cli, body, args, message) -> None:
    path = write_recipe(tmp_path / "r.yaml", body)
    res = run_cli("recipe", "validate", path, *args)
    assert res.code == 2
    assert message in res.stderr and "r.yaml" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_missing_recipe_file(run_cli, tmp_path) -> None:
    res = run_cli("pretrain", tmp_path / "nope.yaml")
    assert res.code == 2 and "recipe file not found" in res.stderr and "nope.yaml" in res.stderr


def test_cli_invalid_yaml_names_the_line(run_cli, tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    res = run_cli("recipe", "validate", path)
    assert res.code == 2 and "r.yaml:" in res.stderr and "invalid YAML" in res.stderr


def test_recipe_show_json_has_defaults(run_cli, tmp_path) -> None:
    import json

    path = write_recipe(tmp_path / "r.yaml", {"train": {"lr": 0.01}})
    res = run_cli("--json", "recipe", "show", path, "--set", "train.batch_size=3")
    shown = json.loads(res.stdout)
    assert res.code == 0 and shown["train"]["lr"] == 0.01 and shown["train"]["batch_size"] == 3
    assert shown["train"]["scheduler"] == "cosine"


def test_dry_run_touches_nothing(run_cli, tiny_recipe, tmp_path) -> None:
    res = run_cli("pretrain", tiny_recipe, "--dry-run")
    assert res.code == 0 and "plan" in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_version(run_cli) -> None:
    from llmos_cli import __version__

    res = run_cli("--version")
    assert res.code == 0 and res.stdout.strip() == f"llmos {__version__}"
