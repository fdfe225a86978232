"""Pieces every training stage wires together: the run directory and the device/precision choice."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from typing import Any

import torch

from llmos_cli.console import out
from llmos_cli.core.allocator import retain_freed_memory
from llmos_cli.core.distributed import current_world
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.core.runtime import Precision, pick_device, pick_precision
from llmos_cli.core.train.full_state import full_state_dict
from llmos_cli.recipe import Recipe


def open_run(recipe: Recipe) -> RunDir:
    """Create the run directory and record the recipe exactly as run (the main process writes)."""
    run = RunDir(recipe.output_dir)
    return run.create(recipe.to_yaml()) if current_world().is_main else run


def device_and_precision(
    recipe: Recipe, *, config: Any = None, run: RunDir | None = None
) -> tuple[torch.device, Precision]:
    """The stage's device and precision (`auto` on a CPU measures at `config`'s shapes); on CPU, freed
    host buffers are kept for the next step. With the training `run`: a resumed run keeps the precision
    it started with, and what `auto` chose is recorded in its precision.json and recipe.yaml."""
    device = pick_device(recipe.train.device)
    if device.type == "cpu":
        retain_freed_memory()
    started = _started_with(recipe, run)
    precision = pick_precision(started or recipe.train.precision, device, config)
    chosen = current_world().broadcast(precision.name)  # every rank trains as rank 0 measured
    if chosen != precision.name:
        precision = pick_precision(chosen, device)
    if started:
        out.info(f"train: precision auto: keeping {started}, which this run started with")
    elif run is not None and recipe.train.precision == "auto":
        _record_precision(run, recipe, precision, device)
    return device, precision


def _started_with(recipe: Recipe, run: RunDir | None) -> str | None:
    """The precision `auto` chose when this run started, if it is about to resume from a checkpoint."""
    from llmos_cli.core.train.checkpoint import latest_checkpoint

    if run is None or recipe.train.precision != "auto" or recipe.train.resume == "never":
        return None
    if not (run.precision_file.exists() and latest_checkpoint(run.checkpoints)):
        return None
    return json.loads(run.precision_file.read_text()).get("precision")


def _record_precision(run: RunDir, recipe: Recipe, precision: Precision, device: torch.device) -> None:
    """precision.json (which the lock and a resume read) and a comment in recipe.yaml: what auto chose, and
    on a CPU the measured bf16 speed-up that decided it."""
    record: dict[str, Any] = {"requested": "auto", "precision": precision.name, "device": str(device)}
    why = f"on {device}"
    if precision.measured is not None:
        record.update(precision.measured.record())
        h, i = precision.measured.shape
        why = f"bf16 autocast measured {precision.measured.speedup:.2f}x fp32 at {h}x{i} on this CPU"
    if current_world().is_main:
        write_atomic(run.precision_file, json.dumps(record, indent=2) + "\n")
        write_atomic(
            run.recipe_file, recipe.to_yaml() + f"# train.precision auto chose {precision.name}: {why}\n"
        )
    out.info(f"train: precision auto: {precision.name} ({why})")


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_final(run: RunDir, model: Any, tokenizer: Any) -> None:
    """Write final/ (safetensors weights, config, tokenizer) via a staging dir and a rename.

    Under torchrun every rank calls this (FSDP shards are gathered); the main process writes.
    """
    from llmos_cli.core.data.cache import replace_dir, staging_dir
    from llmos_cli.core.writable import disk_full_is_clear

    world = current_world()
    state = full_state_dict(model)
    if world.is_main:
        staged = staging_dir(run.final, "run.output_dir")
        with disk_full_is_clear(run.final):
            try:
                model.save_pretrained(str(staged), state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(str(staged))
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        replace_dir(staged, run.final)
    world.barrier()


def plot_losses(run: RunDir, title: str) -> None:
    """loss.png in the run directory: the training and validation curves of metrics.jsonl (the main
    process writes it, atomically; without matplotlib, a note instead)."""
    if not current_world().is_main:
        return
    try:
        from llmos_cli.core.eval.plots import save_loss_curves_png

        save_loss_curves_png(run.read_metrics(), run.loss_plot, title=title)
    except ImportError:
        out.info("train: no loss.png: matplotlib is not installed (pip install 'llmos-cli[data]')")


def trained_model_path(recipe: Recipe) -> str:
    """The model a recipe refers to: its run's final/ once trained, else model.name_or_path."""
    final = recipe.output_dir / "final"
    if final.is_dir():
        return str(final)
    if recipe.model.name_or_path:
        return recipe.model.name_or_path
    from llmos_cli.errors import UserError

    raise UserError(
        f"{recipe.source}: no model to use: {final} does not exist yet and model.name_or_path is not set",
        hint="train first (llmos pretrain/finetune RECIPE) or set model.name_or_path",
    )


def best_row(best: dict[str, Any]) -> tuple[str, str]:
    """The summary table's row for the watched metric's best value (train.early_stopping / keep_best)."""
    return f"best {best['metric']}", f"{best['value']:.6g} at step {best['step']}"


def register_trained(
    run: RunDir, recipe: Recipe, *, parent: str | None, data_fingerprint: str, result: Any
) -> None:
    """Record a training run's final/ in the model library, with its lineage and final metrics."""
    from llmos_cli.core.registry import register_run

    register_run(
        run.final,
        name=recipe.run.name,
        parent=parent,
        recipe_hash=config_hash(recipe.model_dump(mode="json")),
        data_fingerprint=data_fingerprint,
        metrics={
            "train_loss": result.final_loss,
            **{f"validation_{k}": v for k, v in (result.validation or {}).items()},
        },
    )


def memory_plan(recipe: Recipe, model_config: Callable[[], Any]) -> list[str]:
    """--dry-run on a GPU: the estimated peak memory of a training step and the card's free memory
    (nothing on other devices: the estimate is of GPU memory; `model_config` is read only then)."""
    from llmos_cli.core.train.memory import training_memory_plan

    device = pick_device(recipe.train.device)
    if device.type != "cuda":
        return []
    precision = pick_precision(recipe.train.precision, device).name
    line = training_memory_plan(
        model_config(),
        recipe.task,
        method=recipe.finetune.method if recipe.model.name_or_path else "full",
        lora_rank=recipe.finetune.lora.r,
        batch_size=recipe.train.batch_size,
        seq_len=recipe.data.max_seq_len,
        precision=precision,
        gradient_checkpointing=recipe.finetune.gradient_checkpointing,
        device=device,
    )
    return [line]


def pretrain_config(recipe: Recipe) -> Any:
    """The config `llmos pretrain` builds its model from (the vocabulary as the recipe's tokenizer sets it)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        recipe.model.arch, vocab_size=recipe.data.tokenizer.vocab_size, **recipe.model.config
    )
