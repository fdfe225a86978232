"""Confusion matrix: rows are references, columns predictions, in the order of `labels` (scikit-learn)."""

import datasets
import evaluate
from sklearn.metrics import confusion_matrix

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
        labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
        matrix = confusion_matrix(references, predictions, labels=labels)
        return {
            "confusion_matrix": {
                "labels": [str(x) for x in labels],
                "matrix": [[int(c) for c in row] for row in matrix],
            }
        }
