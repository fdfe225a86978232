"""Zero-shot classification with any model: no head, no training.

- Encoders (BERT, MiniLM, ...): cosine similarity between the text's embedding and each label's
  (mean pooling over the attention mask, then L2 normalisation, as sentence-transformers does for
  all-MiniLM-L6-v2). The score is the cosine similarity, in [-1, 1].
- Causal LMs: the log-likelihood of each label as the continuation of a prompt, averaged per label
  token so that long labels are not penalised for their length. The score is that mean log-prob (<= 0).
- Seq2seq models: the same, with the label as the decoder's target.

`zero_shot_batch` scores many texts, a batch per forward pass; `zero_shot_scores` one, best first.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from llmos_cli.core.eval.multiple_choice import loglikelihoods
from llmos_cli.core.models import model_kind
from llmos_cli.core.runtime import model_device
from llmos_cli.core.serve.runners import embed

__all__ = ["embed", "model_kind", "zero_shot_batch", "zero_shot_scores"]

ENCODER_TEMPLATE = "{label}"
CAUSAL_TEMPLATE = "{text}\nAnswer: {label}"
SEQ2SEQ_TEMPLATE = "{label}"


def zero_shot_scores(
    model: Any, tokenizer: Any, text: str, labels: list[str], *, template: str | None = None
) -> list[tuple[str, float]]:
    """Score every label for `text`, best first (`zero_shot_batch` of one text)."""
    (scores,) = zero_shot_batch(model, tokenizer, [text], labels, template=template)
    return sorted(scores.items(), key=lambda pair: -pair[1])


@torch.no_grad()
def zero_shot_batch(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    labels: list[str],
    *,
    template: str | None = None,
    batch_size: int = 16,
) -> list[dict[str, float]]:
    """Label -> score for each text, `batch_size` texts per forward pass (padding is masked: the scores
    are those of one text at a time).

    `template` shapes what is compared: for encoders it is applied to each label (default
    "{label}", e.g. "This review is {label}."); for causal LMs it holds both `{text}` and
    `{label}`, and the label is scored as the continuation of what precedes `{label}`.
    """
    if not labels:
        raise ValueError("zero-shot prediction needs at least one label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    kind = model_kind(model)
    if kind == "encoder":
        label_vectors = embed(
            model, tokenizer, [(template or ENCODER_TEMPLATE).format(label=x) for x in labels]
        )
        score = partial(_encoder_scores, model, tokenizer, label_vectors)
    elif kind == "causal":
        score = partial(_causal_scores, model, tokenizer, labels, template or CAUSAL_TEMPLATE)
    else:
        score = partial(_seq2seq_scores, model, tokenizer, labels, template or SEQ2SEQ_TEMPLATE)
    found: list[dict[str, float]] = []
    for start in range(0, len(texts), batch_size):
        rows = score(texts[start : start + batch_size])
        found.extend(dict(zip(labels, row, strict=True)) for row in rows)
    return found


def _encoder_scores(
    model: Any, tokenizer: Any, label_vectors: torch.Tensor, texts: list[str]
) -> list[list[float]]:
    return (embed(model, tokenizer, texts) @ label_vectors.T).tolist()


def _causal_scores(
    model: Any, tokenizer: Any, labels: list[str], template: str, texts: list[str]
) -> list[list[float]]:
    if "{label}" not in template:
        raise ValueError(f"a causal-LM template must contain {{label}}: {template!r}")
    head, _, tail = template.partition("{label}")
    requests = []
    for text in texts:
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
        requests.append((context_ids, labels_ids))
    # the log-likelihood scorer multiple choice uses: each context once, each label as its continuation
    sums = loglikelihoods(model, requests)
    return [
        [total / len(ids) for total, ids in zip(row, labels_ids, strict=True)]
        for row, (_, labels_ids) in zip(sums, requests, strict=True)
    ]


def _seq2seq_scores(
    model: Any, tokenizer: Any, labels: list[str], template: str, texts: list[str]
) -> list[list[float]]:
    device = model_device(model)
    sources = [text for text in texts for _ in labels]
    source = tokenizer(sources, padding=True, truncation=True, return_tensors="pt").to(device)
    targets = tokenizer(
        text_target=[template.format(label=label, text=text) for text in texts for label in labels],
        padding=True,
        return_tensors="pt",
    )["input_ids"].to(device)
    pad = tokenizer.pad_token_id
    logits = model(**source, labels=targets.masked_fill(targets == pad, -100)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = (targets != pad).float()
    means = ((logprobs * keep).sum(1) / keep.sum(1)).tolist()
    return [means[i : i + len(labels)] for i in range(0, len(means), len(labels))]
