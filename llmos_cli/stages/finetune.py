"""`llmos finetune`: load a pretrained model, encode the task's data, train (full or LoRA), save final/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmos_cli.console import out
from llmos_cli.core.data.prepare import plan_steps
from llmos_cli.core.distributed import current_world, init_distributed
from llmos_cli.core.eval.classification import accuracy_and_f1, predict_labels
from llmos_cli.core.models import ModelInfo, describe_recipe_model, load_tokenizer
from llmos_cli.core.runtime import pick_device, set_seed, use_varlen_attention
from llmos_cli.core.train.adapters import (
    apply_lora,
    parameter_counts,
    quantization_config,
    quantized_load_kwargs,
    save_adapter_quantization,
)
from llmos_cli.core.train.batches import (
    causal_lm_collate,
    check_packed_rows,
    classification_collate,
    groups_by_length,
    seq2seq_collate,
)
from llmos_cli.core.train.loop import TrainJob, train
from llmos_cli.core.train.objectives import CAUSAL_LM, SEQ2SEQ, Objective, classification_objective
from llmos_cli.core.train.preference import frozen_reference, preference_collate, preference_objective
from llmos_cli.core.writable import ensure_dir
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe
from llmos_cli.stages.checks import check_finetune
from llmos_cli.stages.common import (
    best_row,
    config_hash,
    device_and_precision,
    memory_plan,
    open_run,
    plot_losses,
    register_trained,
    save_final,
)


def run(recipe: Recipe) -> dict[str, Any]:
    check_finetune(recipe)  # before the run dir exists: a refused run leaves nothing behind
    ensure_dir(recipe.output_dir, "run.output_dir")  # an unwritable run dir fails now, not after the data
    base_model = resolve_base(
        recipe.model.name_or_path, recipe.source, trust_remote_code=recipe.model.trust_remote_code
    )  # resolved once, here
    base = base_model.path.resolve()
    set_seed(recipe.run.seed)

    world = init_distributed()  # joins torchrun's process group (each rank on its GPU); one process otherwise
    quantization = quantization_config(recipe.finetune) if recipe.finetune.qlora else None
    # QLoRA's 4-bit base, on the device the run trains on; refused here, before the data, without a backend
    load_kwargs = quantized_load_kwargs(quantization, pick_device(recipe.train.device))
    with world.main_first():  # rank 0 prepares the data, the others reuse it
        splits, info, encoded_with = task_data(recipe)
    tokenizer = load_tokenizer(
        encoded_with, recipe.model.trust_remote_code
    )  # the one the data was encoded with
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base(recipe, base_model, info, load_kwargs)
    if recipe.finetune.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if recipe.finetune.adapters:
        model = apply_lora(model, recipe.finetune, recipe.task)
    trainable, total = parameter_counts(model)
    out.info(
        f"finetune: {recipe.finetune.method} {recipe.task} from {base}: "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train"
    )

    run_dir = open_run(recipe)
    device, precision = device_and_precision(recipe, config=model.config, run=run_dir)
    train_rows = splits["train"].with_format("numpy")
    val_rows = splits["validation"].with_format("numpy") if len(splits["validation"]) else None
    objective, collate = task_objective(recipe, info, tokenizer.pad_token_id, model, device)
    check_packed_rows(model, train_rows, "data.packing")
    grouped = groups_by_length(recipe.train.group_by_length, recipe.task)
    job = TrainJob(
        model=model,
        train_rows=train_rows,
        val_rows=val_rows,
        objective=objective,
        collate=collate,
        cfg=recipe.train,
        run=run_dir,
        seed=recipe.run.seed,
        device=device,
        precision=precision,
        compat={
            "batch_size": recipe.train.batch_size,
            "grad_accum": recipe.train.grad_accum,
            "group_by_length": grouped,  # the batch order
            "data_fingerprint": info["fingerprint"],
            "model": config_hash([str(base), recipe.task, recipe.finetune.model_dump(mode="json")]),
        },
        group_by_length=grouped,
        metrics=classification_metrics(val_rows, tokenizer.pad_token_id, recipe, info, device, precision)
        if recipe.task == "classification" and val_rows is not None
        else None,
    )
    result = train(job)
    saved_as = save_finetuned(run_dir, model, tokenizer, recipe, base, quantization)
    plot_losses(run_dir, f"{recipe.run.name}: loss")
    register_trained(run_dir, recipe, parent=str(base), data_fingerprint=info["fingerprint"], result=result)
    summary = {
        "run_dir": str(run_dir.path),
        "final": str(run_dir.final),
        "saved_as": saved_as,
        "base_model": str(base),
        "task": recipe.task,
        "method": recipe.finetune.method,
        "objective": recipe.finetune.objective,
        "steps": result.steps,
        "tokens": result.tokens,
        "parameters": total,
        "trainable_parameters": trainable,
        "train_loss": result.final_loss,
        "validation": result.validation,
        "best": result.best,
        "stopped_early": result.stopped_early,
        "data": info,
        "device": str(device),
        "precision": precision.name,
    }
    rows = [(k, v) for k, v in summary.items() if k not in ("validation", "data", "best")]
    rows += [(f"validation {k}", v) for k, v in (result.validation or {}).items()]
    if result.best:
        rows.append(best_row(result.best))
    out.table("finetune", ["what", "value"], rows)
    return summary


def resolve_base(name: str | None, source: str | None, *, trust_remote_code: bool = False) -> ModelInfo:
    """The base model: a HF dir, an llmos run dir, `builtin:NAME`, a registered name or a hub id (see
    `describe_recipe_model`)."""
    if not name:
        raise UserError(
            f"{source}: model.name_or_path: finetune needs a base model (a directory, a registered name or a hub id)"
        )
    return describe_recipe_model(name, source, trust_remote_code=trust_remote_code)


def task_data(recipe: Recipe) -> tuple[Any, dict[str, Any], Path]:
    """The train/validation splits `llmos data` prepares for every format (tokenized and packed text,
    or encoded task examples), cached by a fingerprint known before any encoding; and the tokenizer
    folder they were encoded with (a chat recipe's template included)."""
    from datasets import load_from_disk

    from llmos_cli.core.data.prepare import prepare

    prepared = prepare(recipe)
    info = (
        {"format": "text", "fingerprint": prepared.fingerprint}
        if recipe.data.format == "text"
        else prepared.report
    )
    splits = load_from_disk(str(prepared.path))
    if "validation" not in splits:  # no validation rows (the prepared data leaves an empty split out)
        splits["validation"] = splits["train"].select([])
    return splits, info, prepared.tokenizer_dir


def load_base(recipe: Recipe, base: ModelInfo, info: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """The pretrained model with the task's head; a classifier gets the label map in its config."""
    kwargs = dict(kwargs)
    if recipe.task == "classification":
        names = info["label_names"]
        kwargs.update(
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True,  # a base that is already a classifier may have other labels
        )
    model = base.load(
        recipe.task,
        allow_pickle=recipe.model.allow_pickle,
        trust_remote_code=recipe.model.trust_remote_code,
        **kwargs,
    )
    if hasattr(model, "merge_and_unload"):  # the base is itself a LoRA run: fold its adapter in first
        model = model.merge_and_unload()
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"finetune.gradient_checkpointing: {type(model).__name__} does not support it")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # non-reentrant: works with frozen inputs (LoRA), no warning
    for module in model.modules():  # an encoder-decoder's stacks keep configs of their own
        if getattr(getattr(module, "config", None), "use_cache", None):
            module.config.use_cache = False


def task_objective(
    recipe: Recipe, info: dict[str, Any], pad_id: int, model: Any, device: torch.device
) -> tuple[Objective, Any]:
    """The loss and collator for the task; DPO's reference is the model as it starts (see
    frozen_reference); packed rows go padding-free where the model runs varlen flash attention."""
    if recipe.finetune.objective != "sft":
        dpo = recipe.finetune.objective == "dpo"
        reference = frozen_reference(model, device) if dpo else None
        return preference_objective(recipe.finetune, reference), preference_collate(pad_id)
    if recipe.task == "classification":
        return classification_objective(class_weights(recipe, info)), classification_collate(pad_id)
    if recipe.task == "seq2seq":
        return SEQ2SEQ, seq2seq_collate(pad_id)
    return CAUSAL_LM, causal_lm_collate(pad_id, flatten=use_varlen_attention(model, device))


def class_weights(recipe: Recipe, info: dict[str, Any]) -> torch.Tensor | None:
    """train.class_weights: 'balanced' = n / (labels * count) per label, or the recipe's list."""
    setting, counts = recipe.train.class_weights, list(info["class_counts"].values())
    if setting is None:
        return None
    if setting == "balanced":
        n = sum(counts)
        return torch.tensor([n / (len(counts) * max(c, 1)) for c in counts], dtype=torch.float32)
    if len(setting) != len(counts):
        raise UserError(
            f"train.class_weights: {len(setting)} weights for {len(counts)} labels ({', '.join(info['label_names'])})"
        )
    return torch.tensor(setting, dtype=torch.float32)


def classification_metrics(
    rows: Any, pad_id: int, recipe: Recipe, info: dict[str, Any], device: torch.device, precision: Any
) -> Any:
    def metrics(model: Any) -> dict[str, float]:
        pred, true = predict_labels(
            model, rows, pad_id=pad_id, batch_size=recipe.train.batch_size, device=device, precision=precision
        )
        return accuracy_and_f1(pred, true, len(info["label_names"]))

    return metrics


def save_finetuned(
    run_dir: Any, model: Any, tokenizer: Any, recipe: Recipe, base: Path, quantization: dict[str, Any] | None
) -> str:
    """final/: the full model, or for LoRA the adapter naming its base by absolute path (QLoRA's also
    says how its base is quantised, so every later load sees the model as trained).

    A LoRA classifier is merged into a plain model, so final/ carries its head and label map in
    config.json and loads with AutoModelForSequenceClassification alone.
    """
    if not recipe.finetune.adapters:
        save_final(run_dir, model, tokenizer)
        return "model"
    if recipe.task == "classification" and not recipe.finetune.qlora:
        save_final(run_dir, model.merge_and_unload(), tokenizer)
        return "merged model"
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(base)
    save_final(run_dir, model, tokenizer)
    if quantization and current_world().is_main:
        save_adapter_quantization(run_dir.final, quantization)
    return "adapter"


def plan(recipe: Recipe) -> list[str]:
    """--dry-run: what `run` would do, refused as the run would refuse it."""
    check_finetune(recipe)
    ft = recipe.finetune
    how = ("qlora (4-bit NF4 base)" if ft.qlora else ft.method) + (" + DoRA" if ft.dora else "")
    return [
        f"load base model {recipe.model.name_or_path} for {recipe.task}",
        *plan_steps(recipe),
        f"{how} fine-tune for {recipe.train.length} into {recipe.output_dir}",
        *memory_plan(recipe, lambda: describe_recipe_model(recipe.model.name_or_path, recipe.source).config),
        f"save {recipe.output_dir / 'final'}",
    ]
