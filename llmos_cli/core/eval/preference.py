"""`llmos eval` on preference pairs: the objective's loss and the reward metrics against a reference.

The reference is `eval.reference`; by default a LoRA model's own base (the adapters disabled), else
the model it was fine-tuned from, as the model library records it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmos_cli.core.eval.loss import dataset_sums, loss_metrics
from llmos_cli.core.train.preference import preference_collate, preference_objective
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe

if TYPE_CHECKING:
    from llmos_cli.core.eval.tasks import EvalTarget


def evaluate_preference(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    from llmos_cli.core.eval.tasks import WEIGHTS_DTYPE

    if recipe.data.format != "preference":
        raise UserError(
            f"eval.task: preference evaluation reads data.format preference (got '{recipe.data.format}')"
        )
    tokenizer = target.tokenizer()
    model = target.load("causal-lm")
    rows, data_name = preference_rows(recipe, tokenizer)
    reference, reference_name = (
        _reference(recipe, target) if recipe.finetune.objective == "dpo" else (None, None)
    )
    total, count, sums = dataset_sums(
        model,
        rows,
        preference_objective(recipe.finetune, reference),
        preference_collate(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ),
        batch_size=recipe.eval.batch_size,
        device=target.device,
        precision=WEIGHTS_DTYPE,
    )
    metrics = loss_metrics(total, count, per_token=False, metric_sums=sums)
    metrics.pop("examples")
    details = {"data": data_name, "n_examples": count, "objective": recipe.finetune.objective}
    if recipe.finetune.objective == "dpo":
        details["reference"] = reference_name
    return metrics, details


def preference_rows(recipe: Recipe, tokenizer: Any) -> tuple[list[dict[str, Any]], str]:
    """The evaluation pairs (eval.data, data.validation or the validation split), encoded as for training."""
    from llmos_cli.core.data.preference import preference_encoder
    from llmos_cli.core.eval.tasks import _example_rows

    examples, name = _example_rows(recipe)
    encode = preference_encoder(tokenizer, recipe.data)
    rows = [e for e in map(encode, examples) if not isinstance(e, str)]
    if not rows:
        raise UserError(f"eval: no preference pairs left in {name} (identical or empty responses)")
    return rows, name


def _reference(recipe: Recipe, target: EvalTarget) -> tuple[Any, str]:
    """The reference model loaded beside the one evaluated, or None: the LoRA model's base."""
    from llmos_cli.core.eval.tasks import EvalTarget
    from llmos_cli.core.registry import lookup

    ref = recipe.eval.reference
    if ref is None and target.info.is_adapter:
        return None, f"{target.info.base.path} (the adapter's base)"
    if ref is None:
        entry = lookup(str(target.info.path))
        if entry is None or not entry.parent:
            raise UserError(
                f"eval.reference: {target.info.path} is not a LoRA model and the model library records no "
                "model it was fine-tuned from; set eval.reference to the DPO reference (the starting model)"
            )
        ref = entry.parent
    reference = EvalTarget.of(recipe, ref)
    return reference.load("causal-lm").eval(), str(reference.info.path)
