"""Corpus BLEU and chrF (sacrebleu, 0-100), one or several references per prediction."""

import datasets
import evaluate

from llmos_cli.core.metrics import scores as plain


class Translation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "Corpus-level BLEU (13a tokenisation) and chrF (character 6-grams, beta 2) as computed by sacrebleu."
            ),
            citation=(
                "Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018; "
                "Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015."
            ),
            inputs_description=(
                "predictions: list of strings; references: list of strings or of lists of strings; "
                "scores: which of 'bleu', 'chrf' to compute (default both)."
            ),
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(self, predictions, references, scores=("bleu", "chrf")):
        return plain.translation(predictions=predictions, references=references, scores=scores)
