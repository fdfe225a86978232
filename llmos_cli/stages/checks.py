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


def check_train(recipe: Recipe) -> None:
    """What every training stage needs before it writes recipe.yaml: its trackers installed, and its
    run.name free in the model library (or already this run directory's)."""
    from llmos_cli.core.registry import check_name_free
    from llmos_cli.core.train.tracking import check_trackers

    check_trackers(recipe.train.log_to)
    try:
        check_name_free(recipe.run.name, recipe.output_dir / "final")
    except UserError as err:
        raise UserError(f"{recipe.source}: {err.message}", hint=err.hint) from None


def check_pretrain(recipe: Recipe) -> None:
    if recipe.task != "causal-lm":
        raise UserError(f"task: pretrain trains causal LMs only (got '{recipe.task}'); use `llmos finetune`")
    check_data(recipe)
    check_model_config(recipe)
    check_train(recipe)


def check_model_config(recipe: Recipe) -> None:
    """model.arch is a transformers model type and model.config builds a causal LM of it, with causal
    attention: the model is built on the meta device (no memory, no weights), as the run would build it."""
    import difflib

    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmos_cli.core.models import build_model

    arch, where = recipe.model.arch, f"{recipe.source}: model.arch"
    if arch not in CONFIG_MAPPING:
        close = difflib.get_close_matches(arch, list(CONFIG_MAPPING), n=5)
        raise UserError(
            f"{where}: unknown model type '{arch}'"
            + (f"; did you mean {', '.join(close)}?" if close else ""),
            hint="a transformers model_type, such as llama, qwen2, gpt2 or mistral",
        )
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{where}: '{arch}' has no causal-LM model in transformers (task '{recipe.task}')")
    try:
        with torch.device("meta"):
            model = build_model(arch, recipe.model.config, recipe.data.tokenizer.vocab_size, {})
    except StrictDataclassError as err:  # transformers' config validators: the last line says why
        why = str(err).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
        raise UserError(f"{recipe.source}: model.config: {why}") from None
    if any(getattr(m, "is_causal", True) is False for m in model.modules()):
        raise UserError(
            f"{where}: '{arch}' with this model.config has bidirectional attention, but task "
            f"'{recipe.task}' trains a causal LM (each token sees only the ones before it)",
            hint="--set model.config.is_decoder=true makes its attention causal; or use a decoder such as llama",
        )


def check_finetune(recipe: Recipe) -> None:
    if not recipe.model.name_or_path:
        raise UserError(
            f"{recipe.source}: model.name_or_path: finetune needs a base model (a directory or hub id)"
        )
    if recipe.data.format == "text" and recipe.task != "causal-lm":
        raise UserError(f"data.format: text data fits task causal-lm, not '{recipe.task}'")
    check_data(recipe)
    check_train(recipe)


STAGE_CHECKS = {"data": check_data, "pretrain": check_pretrain, "finetune": check_finetune}
