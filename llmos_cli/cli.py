"""The `llmos` command line: one short function per verb: parse, load the recipe, call the stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

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


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a recipe: `llmos data RECIPE` runs `llmos data prepare RECIPE`."""

    default_command = "prepare"

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_command, *args]
        return super().resolve_command(ctx, args)


data_app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Prepare a dataset (`llmos data RECIPE`), convert files (`llmos data convert IN OUT`), "
    "label rows with a model (`llmos data label IN OUT --model M`).",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
models_app = typer.Typer(
    help="The local model library under LLMOS_HOME (default ~/.llmos): base models, runs, exports.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable).")
DryRunOpt = typer.Option(False, "--dry-run", help="Validate and print the plan; touch nothing.")
MODEL_HELP = (
    "HF-format model dir, run dir (its final/), or a name from `llmos models list` (a local path wins)."
)
MODEL_OR_RECIPE_HELP = (
    "HF-format model dir, run dir (its final/), a name from `llmos models list` (a local path wins), "
    "or a recipe (its trained model)."
)
DeviceOpt = typer.Option(
    None, "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", show_default=False
)
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
    from llmos_cli.core.noise import quiet_known_noise

    quiet_known_noise()
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


@data_app.command("prepare")
def data(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    dry_run: bool = DryRunOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cached dataset matches."),
) -> None:
    """Read, clean, deduplicate, train a tokenizer, tokenize, pack, split; write data.output; judge
    data.checks (exit 3 when a gate fails, after writing the report)."""
    from llmos_cli.stages import data as stage

    r = _load(recipe, set_)
    if dry_run:
        return _plan(r, stage.plan(r))
    out.emit(stage.run(r, force=force).summary())  # a failed data gate exits 3, the report written


@data_app.command("check")
def data_check(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    index: int = typer.Option(0, "--index", min=0, help="Which row of data.train to check."),
) -> None:
    """Render one example through training and serving (chat template), diff them, check EOS carries loss."""
    from llmos_cli.stages import data_check as stage

    result = stage.run(_load(recipe, set_), index=index)
    out.emit(result)
    if not result["ok"]:
        raise typer.Exit(1)


@data_app.command("convert")
def data_convert(
    in_path: Path = typer.Argument(..., help="Input file (.jsonl .json .csv .tsv .parquet .txt)."),
    out_path: Path = typer.Argument(..., help="Output file; its extension picks the format."),
    to: str | None = typer.Option(None, "--to", help="Also change layout: chat or instruction."),
    prompt_field: str = typer.Option("prompt", "--prompt-field"),
    response_field: str = typer.Option("response", "--response-field"),
    system_field: str = typer.Option("system", "--system-field"),
    messages_field: str = typer.Option("messages", "--messages-field"),
    text_field: str = typer.Option("text", "--text-field"),
) -> None:
    """Convert between file formats, and between instruction and chat layouts."""
    from llmos_cli.core.data.convert import convert

    result = convert(
        in_path,
        out_path,
        to_layout=to,
        prompt_field=prompt_field,
        response_field=response_field,
        system_field=system_field,
        messages_field=messages_field,
        text_field=text_field,
    )
    out.info(f"data convert: {result['rows']} rows -> {result['out']}")
    out.emit(result)


@data_app.command("label")
def data_label(
    in_path: Path = typer.Argument(
        ..., help="Input rows (.jsonl .json .csv .tsv .parquet .txt, folder, glob)."
    ),
    out_path: Path = typer.Argument(..., help="Labelled output; its extension picks the format."),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated labels for zero-shot; default a classifier's own labels."
    ),
    text_field: str = typer.Option("text", "--text-field", help="The field holding the text to label."),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Rows scoring under this (on the model's scale) go to the review file."
    ),
    review: Path | None = typer.Option(None, "--review", help="Review file; default OUT.review.<ext>."),
    template: str | None = typer.Option(
        None, "--template", help='Zero-shot template, e.g. "This text is about {label}."'
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Texts scored per forward pass."),
) -> None:
    """Label rows with a model: `label` and `label_score` per row; low scores to a review file."""
    from dataclasses import asdict

    from llmos_cli.api import LLMOS
    from llmos_cli.core.data.label import label_file, show

    names = [x.strip() for x in labels.split(",") if x.strip()] if labels is not None else None
    if names is not None and len(names) < 2:
        raise UserError(f"--labels: give at least two labels, comma-separated (got {labels!r})")
    result = label_file(
        LLMOS().load_model(model),
        in_path,
        out_path,
        labels=names,
        text_field=text_field,
        min_score=min_score,
        review=review,
        template=template,
        batch_size=batch_size,
    )
    show(result)
    review_note = f", {result.review} to review in {result.review_file}" if result.review else ""
    out.info(f"data label: {result.kept} rows -> {result.out}{review_note}")
    out.emit(asdict(result))


@app.command()
def pretrain(
    recipe: Path = RecipeArg, set_: list[str] = SetOpt, dry_run: bool = DryRunOpt, nproc: int = NprocOpt
) -> None:
    """Train a model from scratch (model.arch + model.config)."""
    from llmos_cli.stages import pretrain as stage

    r = _load(recipe, set_)
    if dry_run:
        return _plan(r, stage.plan(r))
    if nproc > 1:
        _relaunch(nproc, "pretrain", recipe, set_)
    out.emit(stage.run(r))


@app.command()
def finetune(
    recipe: Path = RecipeArg, set_: list[str] = SetOpt, dry_run: bool = DryRunOpt, nproc: int = NprocOpt
) -> None:
    """Train from a pretrained model: full or LoRA; causal LM, classification or seq2seq."""
    from llmos_cli.stages import finetune as stage

    r = _load(recipe, set_)
    if dry_run:
        return _plan(r, stage.plan(r))
    if nproc > 1:
        _relaunch(nproc, "finetune", recipe, set_)
    out.emit(stage.run(r))


@app.command("eval")
def eval_(
    paths: list[Path] | None = typer.Argument(
        None,
        help="Recipe YAML file (with --compare: two or more runs or eval.json files).",
        show_default=False,
    ),
    set_: list[str] = SetOpt,
    dry_run: bool = DryRunOpt,
    compare: bool = typer.Option(
        False, "--compare", help="RUN RUN...: evals side by side, deltas against the first, and a plot."
    ),
    plot: Path = typer.Option(Path("eval-compare.png"), "--plot", help="With --compare: the chart's PNG."),
    device: str | None = DeviceOpt,
) -> None:
    """Evaluate a model: loss, perplexity and task metrics; writes <output_dir>/eval.json."""
    from llmos_cli.stages import evaluate as stage

    paths = paths or []
    if compare:
        return out.emit(stage.compare(paths, plot))
    if len(paths) != 1:
        raise UserError("eval: give one RECIPE (or --compare RUN RUN...)")
    r = _load(paths[0], [*set_, *([f"eval.device={device}"] if device else [])])
    if dry_run:
        return _plan(r, stage.plan(r))
    out.emit(stage.run(r))


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="Prompt text; the completion goes to stdout."
    ),
    input_path: Path | None = typer.Option(None, "--input", help='JSONL of {"prompt": ...} for a batch job.'),
    output_path: Path | None = typer.Option(
        None, "--output", help="JSONL to write completions to (with --input; default stdout)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0),
    seed: int | None = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop sequence (repeatable)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help=DeviceOpt.help),
) -> None:
    """One completion to stdout, or a batch from --input prompts.jsonl to --output (default stdout)."""
    from llmos_cli.core.serve.runners import SamplingParams
    from llmos_cli.stages import generate as stage

    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
    )
    completions = stage.run(
        model,
        params,
        prompt=prompt,
        input_path=input_path,
        output_path=output_path,
        batch_size=batch_size,
        device=device,
    )
    out.emit({"completions": completions})


@app.command()
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int | None = typer.Option(
        None,
        "--max-new-tokens",
        min=1,
        help="Reply length; default 256, or the room the model's context leaves.",
        show_default=False,
    ),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    device: str = typer.Option("auto", "--device", help=DeviceOpt.help),
) -> None:
    """Interactive chat in the terminal, using the model's chat template."""
    from llmos_cli.stages import chat as stage

    stage.run(model, system=system, max_new_tokens=max_new_tokens, temperature=temperature, device=device)


def _model_or_recipe(value: str, sets: list[str]) -> tuple[str, Any]:
    """A MODEL_OR_RECIPE argument: a recipe file gives its trained model and its settings."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml"):
        from llmos_cli.stages.common import trained_model_path

        recipe = _load(path, sets)
        return trained_model_path(recipe), recipe
    if sets:
        raise UserError("--set applies to a recipe; MODEL is a model directory or a registered name")
    from llmos_cli.recipe import Recipe

    return value, Recipe()


@app.command()
def serve(
    model: str = typer.Argument(..., help=MODEL_OR_RECIPE_HELP, show_default=False),
    host: str | None = typer.Option(None, "--host", help="Bind address (default serve.host, 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="Port (default serve.port, 8000)."
    ),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", min=1, help="Requests decoded together."
    ),
    max_queue: int | None = typer.Option(None, "--max-queue", min=1, help="Waiting requests before 503."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Variable holding the API key."),
    model_name: str | None = typer.Option(None, "--model-name", help="Name shown in /v1/models."),
    device: str | None = DeviceOpt,
    set_: list[str] = SetOpt,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions (generative models),
    /v1/embeddings or /v1/classify (encoders), /v1/models, /health, /metrics."""
    path, r = _model_or_recipe(model, set_)
    s = r.serve
    from llmos_cli.stages import serve as stage

    stage.run(
        path,
        host=host or s.host,
        port=s.port if port is None else port,
        api_key_env=api_key_env or s.api_key_env,
        max_batch_size=max_batch_size or s.max_batch_size,
        max_queue=max_queue or s.max_queue,
        model_name=model_name,
        device=device or s.device,
        precision=s.precision,
        limits=s.limits,
    )


@app.command()
def export(
    model: str = typer.Argument(..., help=MODEL_OR_RECIPE_HELP, show_default=False),
    formats: list[str] = typer.Option(
        [], "--format", "-f", help="hf, onnx, gguf or ollama (GGUF + Modelfile); repeatable."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Output dir (default export.out, else <run>/export)."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Compare exported logits with the source."
    ),
    quantize: bool = typer.Option(False, "--quantize", help="ONNX: int8 dynamic quantisation."),
    gguf_dtype: str = typer.Option(
        "f16",
        "--gguf-dtype",
        help="GGUF type: f32, f16, q8_0, q4_0; q4_k_m, q5_k_m, q6_k need llama-cpp-python.",
    ),
    merge_lora: bool | None = typer.Option(
        None, "--merge-lora/--no-merge-lora", help="HF: merge a LoRA adapter."
    ),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow .bin/.pt weights."),
    set_: list[str] = SetOpt,
) -> None:
    """Export to merged HF safetensors, ONNX, GGUF or Ollama, each verified against the source model."""
    path, r = _model_or_recipe(model, set_)
    chosen = formats or list(r.export.formats)
    target = out_dir or (Path(r.export.out) if r.export.out else None)
    if target is None:
        if Path(model).suffix not in (".yaml", ".yml"):
            raise UserError("export: --out DIR is required when MODEL is a model directory")
        target = r.output_dir / "export"
    from llmos_cli.stages import export as stage

    out.emit(
        stage.run(
            path,
            chosen,
            target,
            verify=verify,
            quantize=quantize,
            gguf_dtype=gguf_dtype,
            merge_lora=r.export.merge_lora if merge_lora is None else merge_lora,
            allow_pickle=allow_pickle or r.model.allow_pickle,
        )
    )


@app.command("run")
def run_(
    recipe: Path | None = typer.Argument(
        None, help="Pipeline recipe (a recipe with pipeline.stages).", show_default=False
    ),
    set_: list[str] = SetOpt,
    dry_run: bool = DryRunOpt,
    force: bool = typer.Option(False, "--force", help="Run every stage, changed or not."),
    replay: Path | None = typer.Option(
        None, "--replay", help="Re-run the pipeline an llmos.lock records, offline."
    ),
) -> None:
    """Chain data -> pretrain/finetune -> eval -> export, skipping stages whose inputs have not changed."""
    from llmos_cli.stages import pipeline as stage

    if replay is not None:
        if recipe is not None or set_:
            raise UserError("llmos run: pass a recipe or --replay LOCK, not both (a lock holds its recipe)")
        return out.emit(stage.replay(replay, force=force))
    if recipe is None:
        raise UserError("llmos run: give a pipeline recipe, or --replay runs/NAME/llmos.lock")
    if dry_run:
        steps = stage.plan(recipe, set_, force=force)
        out.info("plan (dry run, nothing written):")
        for i, step in enumerate(steps, 1):
            out.info(f"  {i}. {step['stage']}: {step['action']} ({step['reason']})")
        return out.emit({"plan": steps})
    out.emit(stage.run(recipe, set_, force=force))


@models_app.command("list")
def models_list(kind: str | None = typer.Option(None, "--kind", help="Only base, run or export.")) -> None:
    """Registered models: kind, parent, size, created, metrics, path."""
    from llmos_cli.stages import models as stage

    out.emit(stage.list_models(kind))


@models_app.command("show")
def models_show(name: str = typer.Argument(..., help="Registered name or path.")) -> None:
    """One model and its lineage: parent, recipe hash, data fingerprint, metrics, size."""
    from llmos_cli.stages import models as stage

    out.emit(stage.show_model(name))


@models_app.command("add")
def models_add(
    path: Path = typer.Argument(..., help="HF-format model dir or run dir."),
    name: str | None = typer.Option(None, "--name", help="Default: the folder's name."),
    kind: str = typer.Option("base", "--kind", help="base, run or export."),
    parent: str | None = typer.Option(None, "--parent", help="The model it came from (name or path)."),
) -> None:
    """Register a local model."""
    from llmos_cli.stages import models as stage

    out.emit(stage.add_model(path, name=name, kind=kind, parent=parent))


@models_app.command("rm")
def models_rm(
    name: str = typer.Argument(..., help="Registered name or path."),
    delete_files: bool = typer.Option(False, "--delete-files", help="Also delete the model's folder."),
) -> None:
    """Forget a model (its files stay unless --delete-files)."""
    from llmos_cli.stages import models as stage

    out.emit(stage.remove_model(name, delete_files=delete_files))


@models_app.command("pull")
def models_pull(
    hub_id: str = typer.Argument(
        ..., help="Hugging Face Hub id, e.g. sentence-transformers/all-MiniLM-L6-v2."
    ),
    name: str | None = typer.Option(None, "--name", help="Default: the id's last part."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also fetch pickle (.bin) weights."),
) -> None:
    """Download a model from the Hugging Face Hub into LLMOS_HOME/models and register it (needs network)."""
    from llmos_cli.stages import models as stage

    out.emit(stage.pull_model(hub_id, name=name, revision=revision, allow_pickle=allow_pickle))


def _relaunch(nproc: int, verb: str, recipe: Path, sets: list[str]) -> None:
    """`llmos VERB RECIPE --nproc N`: run the same command as N processes under torchrun's agent."""
    from llmos_cli.core.launch import launch_local

    flags = [
        flag
        for flag, on in (("--debug", debug_enabled()), ("--json", out.json_mode), ("--quiet", out.quiet))
        if on
    ]
    launch_local(nproc, [*flags, verb, str(recipe), *(f"--set={s}" for s in sets)])


@recipe_app.command("validate")
def recipe_validate(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    stages: list[str] = typer.Option(
        [],
        "--stage",
        help="Also run the checks this stage's run starts with (data, pretrain, finetune; repeatable); "
        "default: the recipe's pipeline.stages.",
    ),
) -> None:
    """Check a recipe: keys, types, rules between keys, files; exit 2 with the problem named. With
    --stage (or pipeline.stages), also what that stage refuses, so validate refuses what a run would."""
    from llmos_cli.stages.checks import STAGE_CHECKS

    r = _load(recipe, set_)
    _check_inputs(r)
    unknown = [s for s in stages if s not in STAGE_CHECKS]
    if unknown:
        raise UserError(f"--stage: unknown stage '{unknown[0]}' (known: {', '.join(STAGE_CHECKS)})")
    for name in stages or r.pipeline.stages:
        if name in STAGE_CHECKS:
            STAGE_CHECKS[name](r)
    if not r.data.train:  # validate is stage-agnostic: serve, export and eval recipes need no data.train
        out.warn(f"{recipe}: no data.train (data, pretrain and finetune need one)")
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
