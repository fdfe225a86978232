"""The `llmos` command line: one short function per verb: parse, load the recipe, call the stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from llmos_cli import __version__
from llmos_cli.console import configure, out
from llmos_cli.errors import UserError, debug_enabled, run_guarded

app = typer.Typer(
    name="llmos",
    help="Train and ship language models: data, pretrain, finetune, eval, generate, serve, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(
    help="Check a recipe or print it resolved, defaults filled in.", no_args_is_help=True
)
app.add_typer(recipe_app, name="recipe")

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable).")
DryRunOpt = typer.Option(False, "--dry-run", help="Validate and print the plan; touch nothing.")
NprocOpt = typer.Option(
    1, "--nproc", min=1, help="Train with N processes on this machine (one per GPU): runs torchrun for you."
)


def _version(value: bool) -> None:
    if value:
        print(f"llmos {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and results."),
) -> None:
    if debug:
        os.environ["LLMOS_DEBUG"] = "1"
    # Library progress bars would interleave with ours; llmos shows its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    configure(json_mode=json_output, quiet=quiet)


def _load(recipe: Path, sets: list[str]) -> Any:
    from llmos_cli.recipe import load_recipe

    return load_recipe(recipe, sets)


def _plan(recipe: Any, steps: list[str]) -> None:
    """--dry-run: show what would happen and the resolved recipe; write nothing."""
    out.info("plan (dry run, nothing written):")
    for i, step in enumerate(steps, 1):
        out.info(f"  {i}. {step}")
    if out.json_mode:
        out.emit({"plan": steps, "recipe": recipe.model_dump(mode="json")})
    else:
        print(recipe.to_yaml(), end="")


def _data_steps(recipe: Any) -> list[str]:
    d = recipe.data
    tok = (
        "use the model's tokenizer"
        if recipe.model.tokenizer or recipe.model.name_or_path
        else (f"train a byte-level BPE tokenizer (vocab {d.tokenizer.vocab_size})")
    )
    return [
        f"read {d.train} (format {d.format})",
        "clean and deduplicate",
        tok,
        f"tokenize and pack into blocks of {d.max_seq_len}",
        f"split and save to {recipe.data_output} (reused if its fingerprint matches)",
    ]


@app.command()
def data(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    dry_run: bool = DryRunOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cached dataset matches."),
) -> None:
    """Read, clean, deduplicate, train a tokenizer, tokenize, pack, split; write data.output."""
    r = _load(recipe, set_)
    if dry_run:
        return _plan(r, _data_steps(r))
    from llmos_cli.stages import data as stage

    prepared = stage.run(r, force=force)
    out.emit(
        {
            "output": str(prepared.path),
            "fingerprint": prepared.fingerprint,
            "reused": prepared.reused,
            "report": prepared.report,
        }
    )


@app.command()
def pretrain(
    recipe: Path = RecipeArg, set_: list[str] = SetOpt, dry_run: bool = DryRunOpt, nproc: int = NprocOpt
) -> None:
    """Train a model from scratch (model.arch + model.config)."""
    r = _load(recipe, set_)
    if dry_run:
        return _plan(
            r,
            [
                *_data_steps(r),
                f"build {r.model.arch} from model.config",
                f"train {r.train.max_steps or str(r.train.epochs) + ' epochs'} steps into {r.output_dir}",
                f"save {r.output_dir / 'final'}",
            ],
        )
    if nproc > 1:
        _relaunch(nproc, "pretrain", recipe, set_)
    from llmos_cli.stages import pretrain as stage

    out.emit(stage.run(r))


@app.command()
def finetune(recipe: Path = RecipeArg, set_: list[str] = SetOpt, dry_run: bool = DryRunOpt) -> None:
    """Train from a pretrained model: full or LoRA; causal LM, classification or seq2seq."""
    _load(recipe, set_)
    _not_yet("finetune")


@app.command("eval")
def eval_(recipe: Path = RecipeArg, set_: list[str] = SetOpt, dry_run: bool = DryRunOpt) -> None:
    """Evaluate a model: loss, perplexity; writes <output_dir>/eval.json."""
    r = _load(recipe, set_)
    if dry_run:
        return _plan(
            r,
            [
                f"load the model ({r.output_dir / 'final'} or model.name_or_path)",
                f"score {r.eval.data or r.data.validation or 'the prepared validation split'}",
                f"write {r.output_dir / 'eval.json'}",
            ],
        )
    from llmos_cli.stages import evaluate as stage

    out.emit(stage.run(r))


@app.command()
def generate(model: str = typer.Argument(..., help="Model dir or run dir.")) -> None:
    """One completion to stdout, or a batch from --input prompts.jsonl."""
    _not_yet("generate")


@app.command()
def serve(model: str = typer.Argument(..., help="Model dir, run dir or recipe.")) -> None:
    """OpenAI-compatible HTTP server."""
    _not_yet("serve")


@app.command()
def export(model: str = typer.Argument(..., help="Model dir, run dir or recipe.")) -> None:
    """Export to merged HF safetensors, ONNX or GGUF."""
    _not_yet("export")


def _relaunch(nproc: int, verb: str, recipe: Path, sets: list[str]) -> None:
    """`llmos VERB RECIPE --nproc N`: exec torchrun running the same command in N processes."""
    from llmos_cli.core.distributed import launch_torchrun

    flags = [
        flag
        for flag, on in (("--debug", debug_enabled()), ("--json", out.json_mode), ("--quiet", out.quiet))
        if on
    ]
    launch_torchrun(nproc, [*flags, verb, str(recipe), *(f"--set={s}" for s in sets)])


def _not_yet(verb: str) -> None:
    raise UserError(f"`llmos {verb}` is not available in this build yet")


@recipe_app.command("validate")
def recipe_validate(recipe: Path = RecipeArg, set_: list[str] = SetOpt) -> None:
    """Check a recipe: keys, types, files; exit 2 with the problem named."""
    r = _load(recipe, set_)
    _check_inputs(r)
    out.info(f"{recipe}: ok")
    out.emit({"recipe": str(recipe), "valid": True})


@recipe_app.command("show")
def recipe_show(recipe: Path = RecipeArg, set_: list[str] = SetOpt) -> None:
    """Print the recipe resolved: extends merged, overrides applied, defaults filled in."""
    r = _load(recipe, set_)
    if out.json_mode:
        out.emit(r.model_dump(mode="json"))
    else:
        print(r.to_yaml(), end="")


def _check_inputs(recipe: Any) -> None:
    """Input files named by the recipe must exist."""
    from llmos_cli.core.data.read import list_files

    for key in ("train", "validation"):
        value = getattr(recipe.data, key)
        if value:
            try:
                list_files(value, recipe.data.include)
            except UserError as err:
                raise UserError(f"{recipe.source}: data.{key}: {err.message}") from None
    if recipe.eval.data and not Path(recipe.eval.data).exists():
        raise UserError(f"{recipe.source}: eval.data: file not found: {recipe.eval.data}")


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: app(args=argv, prog_name="llmos"))


if __name__ == "__main__":
    main()
