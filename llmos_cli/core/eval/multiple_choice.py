"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it.

Each item is a context and its choices. A choice's score is the summed log-probability of its
tokens given the context (`accuracy` takes the argmax) and that sum divided by the choice's length
in characters (`accuracy_norm`, the harness's acc_norm). The context runs through the model once per
item; every choice is then scored from a copy of that KV cache, choices batched together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmos_cli.console import out
from llmos_cli.core.runtime import model_device
from llmos_cli.errors import UserError


def load_choice_items(path: str | Path, target_delimiter: str = " ") -> list[dict[str, Any]]:
    """Read JSONL rows {question|context, choices, answer (index or choice text)} as {context, choices, answer}.

    Choices are scored as `target_delimiter + choice` (see `score_choices`): a choice that starts with
    whitespace after a delimiter that ends with it is refused, as it would be scored with both.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"multiple-choice data not found: {p}", hint="pass a .jsonl file, one item per line")
    items = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                items.append(_parse_item(line, f"{p}:{lineno}", target_delimiter))
    if not items:
        raise UserError(
            f"{p} holds no items",
            hint='one JSON object a line: {"question": ..., "choices": [...], "answer": 0}',
        )
    return items


def _parse_item(line: str, where: str, target_delimiter: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with question, choices and answer")
    context = row.get("question", row.get("context"))
    if not isinstance(context, str):
        raise UserError(f"{where}: needs a 'question' (or 'context') string")
    choices = row.get("choices")
    if not (
        isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
    ):
        raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    doubled = [c for c in choices if c[0].isspace()] if target_delimiter[-1:].isspace() else []
    if doubled:
        raise UserError(
            f"{where}: choice {doubled[0]!r} starts with whitespace and eval.target_delimiter "
            f"{target_delimiter!r} ends with it: it would be scored with both",
            hint="write the choices without their leading space, or --set eval.target_delimiter=''",
        )
    answer = row.get("answer")
    if isinstance(answer, str):
        if answer not in choices:
            raise UserError(f"{where}: answer {answer!r} is not one of the choices")
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: 'answer' must be a choice index 0..{len(choices) - 1} or the choice text")
    return {"context": context, "choices": choices, "answer": answer}


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the harness way.

    Trailing whitespace of the context moves to the continuation; the continuation is what follows the
    context's tokens in the tokenisation of context + continuation. An empty context becomes the BOS
    (else EOS) token so the first continuation token has something to be predicted from.
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def _max_positions(model: Any) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def choice_loglikelihoods(
    model: Any, context_ids: list[int], continuations: list[list[int]], batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each continuation after the context, `batch_size` continuations at a time."""
    scores: list[float] = []
    for start in range(0, len(continuations), batch_size):
        (chunk,) = loglikelihoods(model, [(context_ids, continuations[start : start + batch_size])])
        scores.extend(chunk)
    return scores


@torch.inference_mode()
def loglikelihoods(model: Any, requests: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
    """For each (context, continuations): the summed log-probability of each continuation after its context.

    The contexts run together, left-padded, each once; then every continuation runs from a copy of its
    context's KV cache, all in one batch. Padding is masked, so a request scores the same alone or batched."""
    if any(not c for _, conts in requests for c in conts):
        raise ValueError("a choice tokenised to nothing; every choice needs at least one token")
    device = model_device(model)
    limit = _max_positions(model)
    contexts = []
    for context_ids, conts in requests:
        longest = max(len(c) for c in conts)
        if limit is not None and len(context_ids) + longest - 1 > limit:
            # Like the harness, drop the oldest context tokens so the longest choice still fits.
            context_ids = context_ids[-max(limit - longest + 1, 1) :]
        contexts.append(context_ids)
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[0] * (width - len(c)) + c for c in contexts], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # what each context predicts next
    rows = [(i, c) for i, (_, conts) in enumerate(requests) for c in conts]
    owner = torch.tensor([i for i, _ in rows], device=device)
    cont_width = max(len(c) for _, c in rows)
    # Right padding after each continuation: causal attention keeps it out of the positions we read.
    cont = torch.tensor([c + [0] * (cont_width - len(c)) for _, c in rows], device=device)
    real = torch.tensor([[t < len(c) for t in range(cont_width)] for _, c in rows], device=device)
    logprobs = first[owner].unsqueeze(1)
    if cont_width > 1:
        # The last token of a continuation predicts nothing we score, so it is not fed.
        cache = out.cache
        cache.batch_select_indices(owner)
        steps = torch.arange(cont_width - 1, device=device)
        logits = model(
            input_ids=cont[:, :-1],
            attention_mask=torch.cat([mask[owner], mask.new_ones(len(rows), cont_width - 1)], dim=1),
            position_ids=mask.sum(-1)[owner, None] + steps,
            cache=cache,
            use_cache=True,
        ).logits
        logprobs = torch.cat([logprobs, torch.log_softmax(logits.float(), dim=-1)], dim=1)
    sums = logprobs.gather(2, cont.unsqueeze(-1)).squeeze(-1).masked_fill(~real, 0.0).sum(dim=1).tolist()
    found: list[list[float]] = [[] for _ in requests]
    for (i, _), total in zip(rows, sums, strict=True):
        found[i].append(total)
    return found


def score_choices(
    model: Any, tokenizer: Any, items: list[dict[str, Any]], batch_size: int = 8, target_delimiter: str = " "
) -> dict[str, Any]:
    """Score every item's choices; returns {"metrics": {accuracy, accuracy_norm, n_examples}, "predictions": [...]}.

    A choice is scored as the continuation `target_delimiter + choice` of the item's context, exactly as
    lm-evaluation-harness builds multiple-choice requests (its target_delimiter, default " ").
    accuracy_norm divides each log-likelihood by len(choice) in characters.
    """
    if not items:
        raise ValueError("no items to score")
    was_training = model.training
    model.eval()
    predictions = []
    try:
        with out.progress("scoring choices", total=len(items)) as bar:
            for item in items:
                pairs = [
                    encode_pair(tokenizer, item["context"], target_delimiter + c) for c in item["choices"]
                ]
                context_ids = pairs[0][0]
                lls = choice_loglikelihoods(model, context_ids, [cont for _, cont in pairs], batch_size)
                normed = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
                predictions.append(
                    {
                        "loglikelihoods": lls,
                        "prediction": max(range(len(lls)), key=lls.__getitem__),
                        "prediction_norm": max(range(len(normed)), key=normed.__getitem__),
                        "answer": item["answer"],
                    }
                )
                bar.update(1)
    finally:
        model.train(was_training)
    n = len(predictions)
    return {
        "metrics": {
            "accuracy": sum(p["prediction"] == p["answer"] for p in predictions) / n,
            "accuracy_norm": sum(p["prediction_norm"] == p["answer"] for p in predictions) / n,
            "n_examples": n,
        },
        "predictions": predictions,
    }
