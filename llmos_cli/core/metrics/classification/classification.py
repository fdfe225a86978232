"""Precision, recall and F1: macro averages and per class (scikit-learn)."""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support

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
        labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
        p, r, f, _ = precision_recall_fscore_support(
            references, predictions, labels=labels, average=None, zero_division=0
        )
        names = [str(label) for label in labels]
        result = {}
        for key, values in (("precision", p), ("recall", r), ("f1", f)):
            if key not in scores:
                continue
            result[key] = float(values.mean())
            result[f"{key}_per_class"] = {n: float(v) for n, v in zip(names, values, strict=True)}
        return result
