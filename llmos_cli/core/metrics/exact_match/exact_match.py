"""Exact match: the fraction of predictions equal to their reference after optional normalisation."""

import string

import datasets
import evaluate

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text, strip=True, lowercase=False, ignore_punctuation=False):
    """Apply the chosen normalisations; punctuation is ASCII `string.punctuation`."""
    if ignore_punctuation:
        text = text.translate(_DROP_PUNCTUATION)
    if lowercase:
        text = text.lower()
    if strip:
        text = text.strip()
    return text


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions identical to their reference after normalisation.",
            citation="",
            inputs_description=(
                "predictions, references: lists of strings; strip (default True), lowercase (default False), "
                "ignore_punctuation (default False): normalisations applied to both sides."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, strip=True, lowercase=False, ignore_punctuation=False):
        hits = sum(
            normalize(p, strip, lowercase, ignore_punctuation)
            == normalize(r, strip, lowercase, ignore_punctuation)
            for p, r in zip(predictions, references, strict=True)
        )
        return {"exact_match": hits / len(references)}
