"""The evaluation tasks `llmos eval` runs: perplexity, multiple choice, classification, generation;
each takes the recipe and the model under evaluation and returns (metrics, details)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos_cli.console import out
from llmos_cli.core.allocator import retain_freed_memory
from llmos_cli.core.data import prepare as data_pipeline
from llmos_cli.core.data.read import list_files
from llmos_cli.core.data.report import DataReport
from llmos_cli.core.eval.loss import dataset_loss, loss_metrics
from llmos_cli.core.eval.plots import save_confusion_matrix_png
from llmos_cli.core.metrics import compute_metrics
from llmos_cli.core.models import ModelInfo, describe_recipe_model
from llmos_cli.core.runtime import Precision, inference_dtype, pick_device
from llmos_cli.core.train.batches import causal_lm_collate
from llmos_cli.core.train.objectives import CAUSAL_LM
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe

if TYPE_CHECKING:
    import torch

LOSS_METRICS = {"loss", "perplexity"}
WEIGHTS_DTYPE = Precision("weights", None)  # no autocast: the weights are loaded in the inference dtype


def eval_task(recipe: Recipe) -> str:
    """What kind of evaluation a recipe asks for, when eval.task is auto."""
    if recipe.eval.task != "auto":
        return recipe.eval.task
    if recipe.task == "classification":
        return "classification"
    if recipe.data.format == "preference":
        return "preference"
    if set(recipe.eval.metrics) - LOSS_METRICS:
        return "generation"
    return "perplexity"


@dataclass(frozen=True)
class EvalTarget:
    """The model under evaluation, described once, and where (and in which dtype) it runs."""

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    allow_pickle: bool
    trust_remote_code: bool

    @classmethod
    def of(cls, recipe: Recipe, model: str) -> EvalTarget:
        """`model` (a reference in the recipe's terms) on the recipe's eval.device, in eval.precision."""
        info = describe_recipe_model(model, recipe.source, trust_remote_code=recipe.model.trust_remote_code)
        device = pick_device(recipe.eval.device, "eval.device")
        if device.type == "cpu":
            retain_freed_memory()
        dtype = inference_dtype(device, recipe.eval.precision, "eval.precision", info.config)
        return cls(info, device, dtype, recipe.model.allow_pickle, recipe.model.trust_remote_code)

    def load(self, task: str | None = None) -> Any:
        return self.info.load(
            task,
            device=self.device,
            dtype=self.dtype,
            allow_pickle=self.allow_pickle,
            trust_remote_code=self.trust_remote_code,
        )

    def tokenizer(self) -> Any:
        return self.info.load_tokenizer(self.trust_remote_code)


def _perplexity(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exact token-weighted loss and perplexity of a causal LM."""
    tokenizer = target.tokenizer()
    model = target.load("causal-lm")
    rows, data_name = _lm_rows(recipe, tokenizer)
    if len(rows) == 0:
        raise UserError(f"eval: no evaluation data in {data_name}")
    loss_sum, count = dataset_loss(
        model,
        rows,
        CAUSAL_LM,
        causal_lm_collate(tokenizer.pad_token_id or 0),
        batch_size=recipe.eval.batch_size,
        batch_tokens=recipe.eval.batch_tokens or recipe.eval.batch_size * recipe.data.max_seq_len,
        device=target.device,
        precision=WEIGHTS_DTYPE,
    )
    metrics = {k: v for k, v in loss_metrics(loss_sum, count).items() if k in recipe.eval.metrics}
    return metrics, {"data": data_name, "n_examples": len(rows), "n_tokens": count}


def _multiple_choice(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-evaluation-harness style log-likelihood scoring of JSONL {question, choices, answer}."""
    from llmos_cli.core.eval.multiple_choice import load_choice_items, score_choices

    if not recipe.eval.data:
        raise UserError(f"{recipe.source}: eval.data: multiple_choice needs a JSONL file of items")
    items = load_choice_items(recipe.eval.data, recipe.eval.target_delimiter)[: recipe.eval.max_examples]
    tokenizer = target.tokenizer()
    model = target.load("causal-lm")
    scored = score_choices(
        model,
        tokenizer,
        items,
        batch_size=recipe.eval.batch_size,
        target_delimiter=recipe.eval.target_delimiter,
    )
    return scored["metrics"], {
        "data": recipe.eval.data,
        "n_examples": len(items),
        "predictions": scored["predictions"],
    }


def _classification(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predictions from the model's classification head; accuracy, F1, confusion matrix (+ PNG)."""
    from llmos_cli.core.data.formats import label_key
    from llmos_cli.core.data.read import field_text
    from llmos_cli.core.serve.runners import EncoderRunner

    d = recipe.data
    model = target.load("classification")
    tokenizer = target.tokenizer()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows, data_name = _example_rows(recipe)
    texts = [field_text(r, d.text_field) for r in rows]
    references = [label_key(r, d.label_field) for r in rows]
    unknown = sorted(set(references) - set(labels))
    if unknown:
        raise UserError(f"eval: {data_name} has labels the model does not know: {unknown} (model: {labels})")
    runner = EncoderRunner(model, tokenizer, max_length=d.max_seq_len)
    scores: list[dict[str, float]] = []
    with out.progress("classify", total=len(texts)) as bar:
        for start in range(0, len(texts), recipe.eval.batch_size):
            batch = texts[start : start + recipe.eval.batch_size]
            scores += runner.classify(batch)
            bar.update(len(batch))
    predictions = [max(s, key=s.get) for s in scores]
    names = [m for m in recipe.eval.metrics if m not in LOSS_METRICS] or ["accuracy", "f1"]
    metrics = compute_metrics(names, predictions, references, labels=labels)
    if "loss" in recipe.eval.metrics:
        metrics["loss"] = -sum(
            math.log(max(s[r], 1e-12)) for s, r in zip(scores, references, strict=True)
        ) / len(rows)
    details: dict[str, Any] = {"data": data_name, "n_examples": len(rows), "labels": labels}
    if "confusion_matrix" in metrics:
        png = recipe.output_dir / "confusion_matrix.png"
        save_confusion_matrix_png(
            metrics["confusion_matrix"]["matrix"], metrics["confusion_matrix"]["labels"], png
        )
        details["confusion_matrix_png"] = str(png)
    details["predictions"] = [
        {"text": t, "label": r, "prediction": p, "scores": s}
        for t, r, p, s in zip(texts, references, predictions, scores, strict=True)
    ]
    return metrics, details


def _generation(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompt -> generate -> score (exact_match, bleu, chrf, rouge) for causal LMs and seq2seq models."""
    from llmos_cli.core.serve.runners import RUNNERS, SamplingParams

    names = [m for m in recipe.eval.metrics if m not in LOSS_METRICS]
    rows, data_name = _example_rows(recipe)
    tokenizer = target.tokenizer()
    g = recipe.eval.generation
    prompts, references = _prompts_and_references(recipe, rows, tokenizer)
    if not target.info.generates:
        raise UserError(
            f"eval: generation metrics need a causal LM or a seq2seq model; {target.info.path} is {target.info.kind}"
        )
    runner = RUNNERS[target.info.kind](target.load(), tokenizer)
    inputs = prompts
    if target.info.kind == "seq2seq":  # the encoder sees at most data.max_seq_len tokens, as in training
        inputs = [
            tokenizer(p, truncation=True, max_length=recipe.data.max_seq_len)["input_ids"] for p in prompts
        ]
    params = SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        seed=recipe.run.seed,
    )
    with out.progress("generate", total=len(prompts)) as bar:
        done = runner.generate(
            inputs, params, batch_size=recipe.eval.batch_size, on_done=lambda i, c: bar.update(1)
        )
    predictions = [c.text.strip() for c in done]
    metrics = compute_metrics(names, predictions, references)
    details = {"data": data_name, "n_examples": len(rows), "generation": g.model_dump()}
    details["predictions"] = [
        {"prompt": p if isinstance(p, str) else tokenizer.decode(p), "reference": r, "prediction": y}
        for p, r, y in zip(prompts, references, predictions, strict=True)
    ]
    return metrics, details


def _preference(recipe: Recipe, target: EvalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preference objective's loss and rewards on preference pairs (see core/eval/preference.py)."""
    from llmos_cli.core.eval.preference import evaluate_preference

    return evaluate_preference(recipe, target)


EVALUATORS = {
    "perplexity": _perplexity,
    "preference": _preference,
    "multiple_choice": _multiple_choice,
    "classification": _classification,
    "generation": _generation,
}


def _example_rows(recipe: Recipe) -> tuple[list[Any], str]:
    """Evaluation examples: eval.data, data.validation, or the seeded validation split of data.train."""
    from llmos_cli.core.data.formats import read_examples, split_rows

    d = recipe.data
    source = recipe.eval.data or d.validation
    if source:
        rows = read_examples(list_files(source, d.include), d)
        name = str(source)
    elif d.train:
        _, rows = split_rows(
            read_examples(list_files(d.train, d.include), d), d.validation_split, recipe.run.seed
        )
        name = f"{d.train} (validation split {d.validation_split})"
    else:
        raise UserError(f"{recipe.source}: eval.data: no evaluation data (set eval.data or data.validation)")
    rows = rows[: recipe.eval.max_examples]
    if not rows:
        raise UserError(f"eval: no evaluation examples in {name}")
    return rows, name


def _prompts_and_references(recipe: Recipe, rows: list[Any], tokenizer: Any) -> tuple[list[Any], list[str]]:
    """What the model is asked (text, or token ids for chat) and the reference answer, per format."""
    from llmos_cli.core.data.formats import instruction_prompt, messages_of
    from llmos_cli.core.data.read import field_text

    d = recipe.data
    if d.format == "pairs":
        return (
            [d.task_prefix + field_text(r, d.source_field) for r in rows],
            [field_text(r, d.target_field) for r in rows],
        )
    if d.format == "instruction":
        return [instruction_prompt(r, d) for r in rows], [field_text(r, d.response_field) for r in rows]
    if d.format == "chat":
        prompts, refs = [], []
        for r in rows:
            messages = messages_of(r, d.messages_field)
            if messages[-1]["role"] != "assistant":
                raise UserError(
                    f"{r.source}:{r.line}: the last chat turn must be the assistant's reference answer"
                )
            prompts.append(
                tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            )
            refs.append(messages[-1]["content"])
        return prompts, refs
    raise UserError(
        f"eval: generation metrics need prompts and references: data.format instruction, chat or pairs "
        f"(got '{d.format}')"
    )


def _lm_rows(recipe: Recipe, tokenizer: Any) -> tuple[Any, str]:
    """Token blocks to score: eval.data or data.validation tokenised now, else the prepared split."""
    from datasets import Dataset, load_from_disk

    source = recipe.eval.data or recipe.data.validation
    if source:
        files = list_files(source, recipe.data.include)
        docs = data_pipeline.read_documents(recipe, files, DataReport())[: recipe.eval.max_examples]
        blocks, _ = data_pipeline.tokenize_and_pack(docs, tokenizer, recipe.data.max_seq_len, "eval")
        return Dataset.from_dict({"input_ids": blocks}).with_format("numpy"), str(source)
    if not recipe.data.train:
        raise UserError(f"{recipe.source}: eval.data: no evaluation data (set eval.data or data.validation)")
    prepared = data_pipeline.prepare(recipe)
    split = load_from_disk(str(prepared.path))["validation"].with_format("numpy")
    return split, str(Path(prepared.path) / "validation")
