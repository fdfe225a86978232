"""Hugging Face export: LoRA merged into its base, safetensors, tokenizer, generation config, model card."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmos_cli import __version__
from llmos_cli.core.registry import lookup, public_name


@dataclass
class Provenance:
    """Where a model came from: its run directory's recipe and eval, and its own registry record."""

    source: str
    base_model: str | None = None  # the base's path, as trained from
    base_model_id: str | None = None  # the base's hub id or registered name, for the Hub's front matter
    adapter: bool = False  # a LoRA adapter on base_model (else fine-tuned from it)
    recipe_text: str | None = None
    data_fingerprint: str | None = None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None
    chat_template: str | None = None  # the one the tokenizer carries (chat fine-tunes save theirs)


def chat_template_name(template: str) -> str:
    """The chat template's name for the card: one llmos ships, or the model's own."""
    from llmos_cli.core.data.formats import DEFAULT_CHAT_TEMPLATE
    from llmos_cli.core.data.tokenizer import CHAT_TEMPLATE

    if template == DEFAULT_CHAT_TEMPLATE:
        return "llmos's default chat template (the tokenizer had none)"
    if template == CHAT_TEMPLATE:
        return "llmos's ChatML template (of a tokenizer llmos trained)"
    return "the tokenizer's own (or the recipe's data.chat_template)"


def read_provenance(
    model: str | Path, model_dir: Path, base_model: str | None, chat_template: str | None = None
) -> Provenance:
    """Recipe and eval metrics of a run dir (MODEL itself or the parent of its final/); the data
    fingerprint and base model from the model's registry record, written when it was trained (the
    data in the recipe's data.output may have been rebuilt since). `base_model`: an adapter's base.

    Anything missing or unreadable is left empty: a plain HF dir has no run record.
    """
    record = lookup(str(model_dir.resolve()))
    adapter = base_model is not None
    if base_model is None and record is not None and record.kind == "run":
        base_model = record.parent
    prov = Provenance(
        source=str(model),
        base_model=base_model,
        adapter=adapter,
        base_model_id=public_name(base_model) if base_model else None,
        data_fingerprint=record.data_fingerprint if record else None,
        chat_template=chat_template if isinstance(chat_template, str) else None,
    )
    given = Path(model).expanduser()
    run_dir = next((d for d in (given, model_dir.parent) if (d / "recipe.yaml").is_file()), None)
    if run_dir is None:
        return prov
    prov.recipe_text = (run_dir / "recipe.yaml").read_text()
    eval_json = _read_json(run_dir / "eval.json")
    prov.eval_metrics = dict(eval_json.get("metrics") or {})
    prov.eval_data = eval_json.get("data")
    return prov


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(prov: Provenance, task: str, verification: dict[str, Any] | None, merged: bool = True) -> str:
    """README.md for the export: front matter for the Hub, then recipe, data and eval records."""
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft", "tags": ["llmos"]}
    if prov.base_model_id:
        meta["base_model"] = prov.base_model_id
    if task == "causal-lm":
        meta["pipeline_tag"] = "text-generation"
    elif task == "classification":
        meta["pipeline_tag"] = "text-classification"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(prov.source).name or prov.source}",
        "",
        f"Exported by llmos {__version__} from `{prov.source}` (task: {task}).",
        "",
    ]
    if prov.base_model:
        how = (
            "fine-tuned from it"
            if not prov.adapter
            else "LoRA adapter merged into it"
            if merged
            else "this is a LoRA adapter to load on it"
        )
        named = f"`{prov.base_model_id}` at " if prov.base_model_id else ""
        lines += [f"Base model: {named}`{prov.base_model}` ({how}).", ""]
    lines += ["## Data", "", f"Data fingerprint: `{prov.data_fingerprint or 'not recorded'}`", ""]
    if prov.chat_template:
        lines += ["## Chat template", "", f"{chat_template_name(prov.chat_template)}:", ""]
        lines += ["```jinja", prov.chat_template.strip(), "```", ""]
    lines += ["## Evaluation", ""]
    if prov.eval_metrics:
        lines += [f"On `{prov.eval_data}`:" if prov.eval_data else "", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in prov.eval_metrics.items()]
    else:
        lines.append("No eval.json was found for this model.")
    lines.append("")
    if verification:
        lines += [
            "## Export check",
            "",
            f"Logits against the source on {verification['n_prompts']} prompts: max abs diff "
            f"{verification['max_abs_diff']:.3g} (tolerance {verification['tolerance']:.3g}).",
            "",
        ]
    if prov.recipe_text:
        lines += ["## Recipe", "", "```yaml", prov.recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def export_hf(model: Any, tokenizer: Any, dest: Path, dtype: Any = None) -> None:
    """Save `model` (merged, or a PeftModel to keep the adapter) as safetensors, with its tokenizer.

    `dtype` casts the saved weights (a copy; the model in memory stays as it is for other formats).
    """
    state_dict = None
    if dtype is not None and dtype != next(model.parameters()).dtype:
        state_dict = {k: v.to(dtype) for k, v in model.state_dict().items()}
    config_dtype = getattr(model.config, "dtype", None)
    if state_dict is not None:
        model.config.dtype = dtype
    try:
        model.save_pretrained(str(dest), state_dict=state_dict)
    finally:
        if state_dict is not None:
            model.config.dtype = config_dtype
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (dest / "generation_config.json").exists():
        generation_config.save_pretrained(str(dest))
