"""Precision, recall and F1: macro averages and per class (scikit-learn)."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain

_LABEL_FEATURES = [
    datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Macro and per-class precision, recall and F1.",
            citation="Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011.",
            inputs_description=(
                "predictions, references: lists of labels (str or int); "
                "labels: optional list fixing the classes and their order (default: sorted union); "
                "scores: which of 'precision', 'recall', 'f1' to return (default all)."
            ),
            features=_LABEL_FEATURES,
        )

    def _compute(self, predictions, references, labels=None, scores=("precision", "recall", "f1")):
        return plain.classification(
            predictions=predictions, references=references, labels=labels, scores=scores
        )
