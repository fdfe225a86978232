"""Accuracy: the fraction of predictions equal to their reference (labels as strings or ints)."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain

_LABEL_FEATURES = [
    datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference.",
            citation="",
            inputs_description="predictions, references: lists of labels (str or int) of the same length.",
            features=_LABEL_FEATURES,
        )

    def _compute(self, predictions, references):
        return plain.accuracy(predictions=predictions, references=references)
