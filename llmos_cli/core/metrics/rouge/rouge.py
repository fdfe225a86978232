"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score), averaged over examples."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean F-measure of ROUGE-1, ROUGE-2 and ROUGE-L over examples (deterministic, no bootstrap).",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions, references: lists of strings; use_stemmer: Porter stemming (default False).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, use_stemmer=False):
        return plain.rouge(predictions=predictions, references=references, use_stemmer=use_stemmer)
