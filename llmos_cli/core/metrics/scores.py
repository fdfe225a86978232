"""The task metrics as plain functions: one implementation each, called by `compute_metrics` directly
and by the packaged `evaluate` modules (for users who load a metric by name)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

Labels = Sequence[Any]


def accuracy(predictions: Labels, references: Labels) -> dict[str, float]:
    """The fraction of predictions equal to their reference."""
    return {"accuracy": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)}


def classification(
    predictions: Labels,
    references: Labels,
    labels: Labels | None = None,
    scores: Sequence[str] = ("precision", "recall", "f1"),
) -> dict[str, Any]:
    """Macro precision, recall and F1 and their per-class values (scikit-learn; a class absent from
    both predictions and references scores 0)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
    p, r, f, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0
    )
    names = [str(label) for label in labels]
    result: dict[str, Any] = {}
    for key, values in (("precision", p), ("recall", r), ("f1", f)):
        if key in scores:
            result[key] = float(values.mean())
            result[f"{key}_per_class"] = {n: float(v) for n, v in zip(names, values, strict=True)}
    return result


def confusion_matrix(predictions: Labels, references: Labels, labels: Labels | None = None) -> dict[str, Any]:
    """Rows are references, columns predictions, in the order of `labels` (scikit-learn)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
    matrix = sk_confusion_matrix(references, predictions, labels=labels)
    return {
        "confusion_matrix": {
            "labels": [str(x) for x in labels],
            "matrix": [[int(c) for c in row] for row in matrix],
        }
    }


_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(
    text: str, strip: bool = True, lowercase: bool = False, ignore_punctuation: bool = False
) -> str:
    """Apply the chosen normalisations; punctuation is ASCII `string.punctuation`."""
    if ignore_punctuation:
        text = text.translate(_DROP_PUNCTUATION)
    if lowercase:
        text = text.lower()
    if strip:
        text = text.strip()
    return text


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    strip: bool = True,
    lowercase: bool = False,
    ignore_punctuation: bool = False,
) -> dict[str, float]:
    """The fraction of predictions equal to their reference after the chosen normalisations."""
    hits = sum(
        normalize(p, strip, lowercase, ignore_punctuation)
        == normalize(r, strip, lowercase, ignore_punctuation)
        for p, r in zip(predictions, references, strict=True)
    )
    return {"exact_match": hits / len(references)}


def reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference position; every prediction needs the same number of references."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len({len(r) for r in refs}) > 1:
        raise ValueError("every prediction needs the same number of references")
    return [list(stream) for stream in zip(*refs, strict=True)]


def translation(
    predictions: Sequence[str], references: Sequence[Any], scores: Sequence[str] = ("bleu", "chrf")
) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100), one or several references per prediction."""
    import sacrebleu

    corpus = {"bleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf}
    streams = reference_streams(references)
    return {name: float(corpus[name](list(predictions), streams).score) for name in scores}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False
) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score), averaged over examples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        result = scorer.score(reference, prediction)
        for key in ROUGE_TYPES:
            totals[key] += result[key].fmeasure
    return {key: total / len(references) for key, total in totals.items()}


SCORES = {
    "accuracy": accuracy,
    "classification": classification,
    "confusion_matrix": confusion_matrix,
    "exact_match": exact_match,
    "translation": translation,
    "rouge": rouge,
}
