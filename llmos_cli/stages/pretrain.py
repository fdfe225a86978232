"""`llmos pretrain`: prepare the data, build a model from its config, train it, save final/."""

from __future__ import annotations

from typing import Any

from llmos_cli.console import out
from llmos_cli.core.data.prepare import plan_steps, prepare
from llmos_cli.core.distributed import init_distributed
from llmos_cli.core.models import build_model, load_tokenizer
from llmos_cli.core.runtime import set_seed, use_varlen_attention
from llmos_cli.core.train.batches import causal_lm_collate, check_packed_rows
from llmos_cli.core.train.loop import TrainJob, train
from llmos_cli.core.train.objectives import CAUSAL_LM
from llmos_cli.core.writable import ensure_dir
from llmos_cli.recipe import Recipe
from llmos_cli.stages.checks import check_pretrain
from llmos_cli.stages.common import (
    best_row,
    config_hash,
    device_and_precision,
    memory_plan,
    open_run,
    plot_losses,
    pretrain_config,
    register_trained,
    save_final,
)


def run(recipe: Recipe) -> dict[str, Any]:
    check_pretrain(recipe)  # before the run dir exists: a refused run leaves nothing behind
    ensure_dir(recipe.output_dir, "run.output_dir")  # an unwritable run dir fails now, not after the data
    world = init_distributed()  # joins torchrun's process group; one process otherwise
    with world.main_first():  # rank 0 prepares the data, the others reuse it
        prepared = prepare(recipe)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    set_seed(recipe.run.seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = build_model(recipe.model.arch, recipe.model.config, len(tokenizer), special)
    n_params = sum(p.numel() for p in model.parameters())
    out.info(f"pretrain: {recipe.model.arch} with {n_params / 1e6:.2f}M parameters")

    from datasets import load_from_disk

    splits = load_from_disk(str(prepared.path)).with_format("numpy")
    run_dir = open_run(recipe)
    device, precision = device_and_precision(recipe, config=model.config, run=run_dir)
    collate = causal_lm_collate(tokenizer.pad_token_id, flatten=use_varlen_attention(model, device))
    check_packed_rows(model, splits["train"], "data.packing_mode")
    job = TrainJob(
        model=model,
        train_rows=splits["train"],
        val_rows=splits["validation"] if len(splits["validation"]) else None,
        objective=CAUSAL_LM,
        collate=collate,
        cfg=recipe.train,
        run=run_dir,
        seed=recipe.run.seed,
        device=device,
        precision=precision,
        compat={
            "batch_size": recipe.train.batch_size,
            "grad_accum": recipe.train.grad_accum,
            "data_fingerprint": prepared.fingerprint,
            "model": config_hash([recipe.model.arch, recipe.model.config, len(tokenizer)]),
        },
    )
    result = train(job)
    save_final(run_dir, model, tokenizer)
    plot_losses(run_dir, f"{recipe.run.name}: loss")
    register_trained(run_dir, recipe, parent=None, data_fingerprint=prepared.fingerprint, result=result)
    summary = {
        "run_dir": str(run_dir.path),
        "final": str(run_dir.final),
        "steps": result.steps,
        "tokens": result.tokens,
        "parameters": n_params,
        "train_loss": result.final_loss,
        "validation": result.validation,
        "best": result.best,
        "stopped_early": result.stopped_early,
        "device": str(device),
        "precision": precision.name,
    }
    rows = [(k, v) for k, v in summary.items() if k not in ("validation", "best")]
    rows += [(f"validation {k}", v) for k, v in (result.validation or {}).items()]
    if result.best:
        rows.append(best_row(result.best))
    out.table("pretrain", ["what", "value"], rows)
    return summary


def plan(recipe: Recipe) -> list[str]:
    """--dry-run: what `run` would do, refused as the run would refuse it."""
    check_pretrain(recipe)
    return [
        *plan_steps(recipe),
        f"build {recipe.model.arch} from model.config",
        f"train {recipe.train.length} into {recipe.output_dir}",
        *memory_plan(recipe, lambda: pretrain_config(recipe)),  # on a GPU: the estimated peak
        f"save {recipe.output_dir / 'final'}",
    ]
