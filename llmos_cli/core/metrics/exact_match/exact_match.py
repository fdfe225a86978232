"""Exact match: the fraction of predictions equal to their reference after optional normalisation."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain


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
        return plain.exact_match(
            predictions=predictions,
            references=references,
            strip=strip,
            lowercase=lowercase,
            ignore_punctuation=ignore_punctuation,
        )
