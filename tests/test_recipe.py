"""The recipe system: defaults, extends, --set typing, and errors that name file and key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmos_cli.errors import UserError
from llmos_cli.recipe import deep_merge, load_recipe
from tests.conftest import write_recipe


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path / "r.yaml", {"run": {"name": "x"}}))
    assert r.train.max_steps == 1000 and r.train.batch_size == 8 and r.train.lr == 3e-4
    assert r.serve.host == "127.0.0.1" and r.data.packing == "auto" and r.data.packs
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
        ({}, ["--set", "train.batch_size=abc"], "--set train.batch_size=abc: train.batch_size"),
        ({"data": {"train": "missing.jsonl"}}, [], "missing.jsonl"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(tmp_path, run_cli, body, args, message) -> None:
    path = write_recipe(tmp_path / "r.yaml", body)
    res = run_cli("recipe", "validate", path, *args)
    assert res.code == 2
    assert message in res.stderr and ("r.yaml" in res.stderr) == (not args)  # --set errors name the --set
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


# ---------------------------------------------------------------- errors name where the key came from


def test_unknown_key_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    parent = write_recipe(tmp_path / "parent.yaml", {"train": {"max_step": 20}})
    child = write_recipe(tmp_path / "child.yaml", {"extends": "parent.yaml", "train": {"lr": 0.1}})
    with pytest.raises(UserError) as err:
        load_recipe(child)
    assert str(err.value) == (
        f"invalid recipe\n  {parent}: train.max_step: unknown key (did you mean 'max_steps'?)"
    )


def test_a_key_set_in_several_files_is_blamed_on_the_one_that_won(tmp_path: Path) -> None:
    write_recipe(tmp_path / "grandparent.yaml", {"train": {"batch_size": 4, "lr": 0.1}})
    parent = write_recipe(
        tmp_path / "parent.yaml", {"extends": "grandparent.yaml", "train": {"batch_size": "eight"}}
    )
    child = write_recipe(tmp_path / "child.yaml", {"extends": "parent.yaml", "train": {"lr": "fast"}})
    with pytest.raises(UserError) as err:
        load_recipe(child)
    lines = str(err.value).splitlines()[1:]
    assert [line.split(": ")[:2] for line in lines] == [
        [f"  {parent}", "train.batch_size"],
        [f"  {child}", "train.lr"],
    ]


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lrr=1", "--set train.lrr=1: train.lrr: unknown key (did you mean 'lr'?)"),
        (
            "train.batch_size=abc",
            "--set train.batch_size=abc: train.batch_size: Input should be a valid integer, "
            "unable to parse string as an integer (got 'abc')",
        ),
        ("train=5", "--set train=5: train: expected a mapping of train settings, got 5"),
        ("model.config=5", "--set model.config=5: model.config: expected a mapping, got 5"),
        ("data.train=5", "--set data.train=5: data.train: expected a string or a list of strings (got 5)"),
        (
            "data.train=[a, 3]",
            "--set data.train=[a, 3]: data.train.1: Input should be a valid string (got 3)",
        ),
        (
            "train.class_weights=5",
            "--set train.class_weights=5: train.class_weights: expected 'balanced' or a list of numbers (got 5)",
        ),
        (
            "train.early_stopping.metrc=loss",
            "--set train.early_stopping.metrc=loss: train.early_stopping.metrc: unknown key "
            "(did you mean 'metric'?)",
        ),
    ],
)
def test_set_mistakes_name_the_set(tmp_path: Path, item: str, message: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"train": {"lr": 0.1}})
    with pytest.raises(UserError) as err:
        load_recipe(path, [item])
    assert str(err.value) == f"invalid recipe\n  {message}"


def test_a_section_given_as_a_value_in_a_file(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"data": {"clean": "yes"}})
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"invalid recipe\n  {path}: data.clean: expected a mapping of data.clean settings, got 'yes'"
    )


def test_missing_parent_names_the_child_and_the_resolved_path(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    child = write_recipe(tmp_path / "sub" / "child.yaml", {"extends": "../nothere.yaml"})
    with pytest.raises(UserError) as err:
        load_recipe(child)
    assert str(err.value) == f"{child}: extends: file not found: {tmp_path / 'nothere.yaml'}"


def test_parent_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    child = write_recipe(tmp_path / "child.yaml", {"extends": "base"})
    with pytest.raises(UserError) as err:
        load_recipe(child)
    assert str(err.value) == f"{child}: extends: {tmp_path / 'base'} is a directory, not a recipe file"


def test_cli_recipe_that_is_a_directory(run_cli, tmp_path) -> None:
    write_recipe(tmp_path / "a.yaml", {})
    res = run_cli("recipe", "validate", tmp_path)
    assert res.code == 2 and "Traceback" not in res.stderr
    assert res.stderr == (
        f"error: {tmp_path} is a directory, not a recipe file\n"
        f"  hint: give one of its recipes, e.g. {tmp_path / 'a.yaml'}\n"
    )


# ---------------------------------------------------------------- --dry-run checks what the run checks


def _no_data_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", {"run": {"output_dir": str(tmp_path / "run")}})


@pytest.mark.parametrize("verb", ["data", "pretrain"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_no_training_data_is_refused_by_dry_run_and_run_alike(run_cli, tmp_path, verb, dry_run) -> None:
    path = _no_data_recipe(tmp_path)
    res = run_cli(verb, path, *(["--dry-run"] if dry_run else []))
    assert (res.code, res.stderr) == (2, f"error: {path}: data.train: no training data given\n")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.parametrize("dry_run", [True, False])
def test_finetune_without_a_base_model_is_refused_by_dry_run_and_run_alike(
    run_cli, tiny_recipe, tmp_path, dry_run
) -> None:
    res = run_cli("finetune", tiny_recipe, *(["--dry-run"] if dry_run else []))
    message = "model.name_or_path: finetune needs a base model (a directory or hub id)"
    assert (res.code, res.stderr) == (2, f"error: {tiny_recipe}: {message}\n")
    assert not (tmp_path / "run").exists()


def test_finetune_dry_run_checks_the_format_fits_the_task(run_cli, tiny_recipe) -> None:
    sets = [
        "--set",
        "task=classification",
        "--set",
        "data.format=instruction",
        "--set",
        "model.name_or_path=m",
    ]
    res = run_cli("finetune", tiny_recipe, *sets, "--dry-run")
    message = "data.format: 'instruction' does not fit task 'classification' (use classification)"
    assert (res.code, res.stderr) == (2, f"error: {message}\n")


def test_pretrain_dry_run_refuses_a_task_it_cannot_train(run_cli, tiny_recipe) -> None:
    res = run_cli("pretrain", tiny_recipe, "--set", "task=seq2seq", "--dry-run")
    assert res.code == 2 and "task: pretrain trains causal LMs only (got 'seq2seq')" in res.stderr


def test_validate_warns_when_there_is_no_training_data(run_cli, tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    res = run_cli("recipe", "validate", path)
    assert res.code == 0  # a serve or export recipe needs no data.train
    assert res.stderr == (
        f"warning: {path}: no data.train (data, pretrain and finetune need one)\n{path}: ok\n"
    )


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_model_config_transformers_refuses_is_one_line_in_dry_run_and_run(
    run_cli, tiny_recipe, tmp_path, dry_run
) -> None:
    sets = ["--set", "model.config.hidden_size=65", *(["--dry-run"] if dry_run else [])]
    res = run_cli("pretrain", tiny_recipe, *sets)
    message = "model.config: The hidden size (65) is not a multiple of the number of attention heads (2)."
    assert (res.code, res.stderr) == (2, f"error: {tiny_recipe}: {message}\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unknown_arch_lists_the_close_matches(run_cli, tiny_recipe, tmp_path, dry_run) -> None:
    res = run_cli("pretrain", tiny_recipe, "--set", "model.arch=lama", *(["--dry-run"] if dry_run else []))
    first = res.stderr.splitlines()[0]
    assert res.code == 2 and first.startswith(f"error: {tiny_recipe}: model.arch: unknown model type 'lama'")
    assert "did you mean llama" in first and len(res.stderr) < 300  # not transformers' ~900 names


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_bidirectional_arch_is_refused_as_a_causal_lm(run_cli, tiny_recipe, tmp_path, dry_run) -> None:
    bert = ["--set", "model.arch=bert", "--set", "model.config={hidden_size: 32, num_attention_heads: 2}"]
    res = run_cli("pretrain", tiny_recipe, *bert, *(["--dry-run"] if dry_run else []))
    said = " ".join(res.stderr.split())
    assert res.code == 2 and "model.arch: 'bert'" in said and "bidirectional attention" in said
    assert "task 'causal-lm'" in said and "model.config.is_decoder=true" in said
    assert not (tmp_path / "run").exists()
    causal = ["--set", "model.config.is_decoder=true", "--dry-run"]
    assert run_cli("pretrain", tiny_recipe, *bert, *causal).code == 0


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    run_cli, tiny_recipe, tmp_path, verb, dry_run
) -> None:
    sets = ["--set", "train.log_to=[mlflow]", "--set", "model.name_or_path=m"] if verb == "finetune" else []
    sets = sets or ["--set", "train.log_to=[mlflow]"]
    res = run_cli(verb, tiny_recipe, *sets, *(["--dry-run"] if dry_run else []))
    assert res.code == 2 and res.stderr.startswith("error: train.log_to: mlflow is not installed\n")
    assert not (tmp_path / "run").exists()  # no recipe.yaml: nothing was written


def test_the_causal_bert_the_hint_gives_is_causal() -> None:
    """What `model.config.is_decoder=true` builds: a token's logits do not depend on later tokens."""
    import torch

    from llmos_cli.core.models import build_model

    config = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    model = build_model("bert", {**config, "is_decoder": True}, 100, {}).eval()
    ids = torch.randint(0, 100, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 100
    with torch.no_grad():
        assert torch.allclose(model(ids).logits[0, :-1], model(changed).logits[0, :-1], atol=1e-5)


def test_a_plan_names_the_training_length_in_the_recipes_unit() -> None:
    from llmos_cli.recipe import TrainSection

    assert TrainSection().length == "1000 steps" and TrainSection(max_steps=50).length == "50 steps"
    assert TrainSection(epochs=3).length == "3 epochs" and TrainSection(epochs=0.5).length == "0.5 epochs"
