"""Zero-shot classification with any model: no head, no training.

- Encoders (BERT, MiniLM, ...): cosine similarity between the text's embedding and each label's
  (mean pooling over the attention mask, then L2 normalisation, as sentence-transformers does for
  all-MiniLM-L6-v2). The score is the cosine similarity, in [-1, 1].
- Causal LMs: the log-likelihood of each label as the continuation of a prompt, averaged per label
  token so that long labels are not penalised for their length. The score is that mean log-prob (<= 0).
- Seq2seq models: the same, with the label as the decoder's target.

Scores are returned best first.
"""

from __future__ import annotations

from typing import Any

import torch

from llmos_cli.core.eval.multiple_choice import choice_loglikelihoods
from llmos_cli.core.models import model_kind
from llmos_cli.core.runtime import model_device
from llmos_cli.core.serve.runners import embed

__all__ = ["embed", "model_kind", "zero_shot_scores"]

ENCODER_TEMPLATE = "{label}"
CAUSAL_TEMPLATE = "{text}\nAnswer: {label}"
SEQ2SEQ_TEMPLATE = "{label}"


@torch.no_grad()
def zero_shot_scores(
    model: Any, tokenizer: Any, text: str, labels: list[str], *, template: str | None = None
) -> list[tuple[str, float]]:
    """Score every label for `text`, best first.

    `template` shapes what is compared: for encoders it is applied to each label (default
    "{label}", e.g. "This review is {label}."); for causal LMs it holds both `{text}` and
    `{label}`, and the label is scored as the continuation of what precedes `{label}`.
    """
    if not labels:
        raise ValueError("zero-shot prediction needs at least one label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    kind = model_kind(model)
    if kind == "encoder":
        scores = _encoder_scores(model, tokenizer, text, labels, template or ENCODER_TEMPLATE)
    elif kind == "causal":
        scores = _causal_scores(model, tokenizer, text, labels, template or CAUSAL_TEMPLATE)
    else:
        scores = _seq2seq_scores(model, tokenizer, text, labels, template or SEQ2SEQ_TEMPLATE)
    return sorted(zip(labels, scores, strict=True), key=lambda pair: -pair[1])


def _encoder_scores(model: Any, tokenizer: Any, text: str, labels: list[str], template: str) -> list[float]:
    vectors = embed(model, tokenizer, [text] + [template.format(label=label) for label in labels])
    return (vectors[1:] @ vectors[0]).tolist()


def _causal_scores(model: Any, tokenizer: Any, text: str, labels: list[str], template: str) -> list[float]:
    if "{label}" not in template:
        raise ValueError(f"a causal-LM template must contain {{label}}: {template!r}")
    head, _, tail = template.partition("{label}")
    context = head.format(text=text)
    # The space before the label belongs to the label's first token in BPE vocabularies.
    stripped = context.rstrip(" ")
    lead = context[len(stripped) :]
    context_ids = tokenizer(stripped)["input_ids"]
    if not context_ids:
        raise ValueError("the prompt before {label} must not be empty for a causal LM")
    labels_ids = [
        tokenizer(lead + label + tail.format(text=text), add_special_tokens=False)["input_ids"]
        for label in labels
    ]
    # the same log-likelihood scorer multiple choice uses: the context once, each label as its continuation
    sums = choice_loglikelihoods(model, context_ids, labels_ids, batch_size=len(labels_ids))
    return [total / len(ids) for total, ids in zip(sums, labels_ids, strict=True)]


def _seq2seq_scores(model: Any, tokenizer: Any, text: str, labels: list[str], template: str) -> list[float]:
    device = model_device(model)
    source = tokenizer([text] * len(labels), padding=True, truncation=True, return_tensors="pt").to(device)
    targets = tokenizer(
        text_target=[template.format(label=label, text=text) for label in labels],
        padding=True,
        return_tensors="pt",
    )["input_ids"].to(device)
    pad = tokenizer.pad_token_id
    logits = model(**source, labels=targets.masked_fill(targets == pad, -100)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = (targets != pad).float()
    return ((logprobs * keep).sum(1) / keep.sum(1)).tolist()
