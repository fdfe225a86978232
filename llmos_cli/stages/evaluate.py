"""`llmos eval`: exact token-weighted loss and perplexity of a model on evaluation data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset

from llmos_cli.console import out
from llmos_cli.core.batches import causal_lm_collate
from llmos_cli.core.data.read import list_files
from llmos_cli.core.data.report import DataReport
from llmos_cli.core.evaluate import dataset_loss, loss_metrics
from llmos_cli.core.models import load_model, load_tokenizer, resolve_model_dir
from llmos_cli.core.objectives import CAUSAL_LM
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe
from llmos_cli.stages import data as data_stage
from llmos_cli.stages.common import device_and_precision, trained_model_path

LOSS_METRICS = {"loss", "perplexity"}


def run(recipe: Recipe) -> dict[str, Any]:
    unknown = [m for m in recipe.eval.metrics if m not in LOSS_METRICS]
    if unknown:
        raise UserError(f"eval.metrics: {', '.join(unknown)} not supported yet (supported: loss, perplexity)")
    model_path = resolve_model_dir(trained_model_path(recipe))
    tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    model = load_model(
        model_path,
        "causal-lm",
        allow_pickle=recipe.model.allow_pickle,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    rows, data_name = _eval_rows(recipe, tokenizer)
    if len(rows) == 0:
        raise UserError(f"eval: no evaluation data in {data_name}")
    device, precision = device_and_precision(recipe)
    model.to(device)
    loss_sum, count = dataset_loss(
        model,
        rows,
        CAUSAL_LM,
        causal_lm_collate(tokenizer.pad_token_id or 0),
        batch_size=recipe.eval.batch_size,
        device=device,
        precision=precision,
    )
    metrics = {k: v for k, v in loss_metrics(loss_sum, count).items() if k in recipe.eval.metrics}
    result = {
        "metrics": metrics,
        "model": str(model_path),
        "data": data_name,
        "n_examples": len(rows),
        "n_tokens": count,
    }
    run_dir = RunDir(recipe.output_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir.eval_file, json.dumps(result, indent=2))
    out.table(f"eval: {model_path}", ["metric", "value"], list(metrics.items()))
    out.info(f"eval: wrote {run_dir.eval_file}")
    return result


def _eval_rows(recipe: Recipe, tokenizer: Any) -> tuple[Any, str]:
    """Token blocks to score: eval.data or data.validation tokenised now, else the prepared split."""
    source = recipe.eval.data or recipe.data.validation
    if source:
        files = list_files(source, recipe.data.include)
        docs = data_stage.read_documents(recipe, files, DataReport())
        blocks, _ = data_stage.tokenize_and_pack(docs, tokenizer, recipe.data.max_seq_len, "eval")
        return Dataset.from_dict({"input_ids": blocks}).with_format("numpy"), str(source)
    if not recipe.data.train:
        raise UserError(f"{recipe.source}: eval.data: no evaluation data (set eval.data or data.validation)")
    from datasets import load_from_disk

    prepared = data_stage.run(recipe)
    return load_from_disk(str(prepared.path))["validation"].with_format("numpy"), str(
        Path(prepared.path) / "validation"
    )
