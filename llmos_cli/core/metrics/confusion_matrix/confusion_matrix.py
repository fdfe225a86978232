"""Confusion matrix: rows are references, columns predictions, in the order of `labels` (scikit-learn)."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain

_LABEL_FEATURES = [
    datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Counts of (reference, prediction) pairs; row i = reference labels[i], column j = prediction labels[j].",
            citation="Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011.",
            inputs_description=(
                "predictions, references: lists of labels (str or int); "
                "labels: optional list fixing the classes and their order (default: sorted union)."
            ),
            features=_LABEL_FEATURES,
        )

    def _compute(self, predictions, references, labels=None):
        return plain.confusion_matrix(predictions=predictions, references=references, labels=labels)
