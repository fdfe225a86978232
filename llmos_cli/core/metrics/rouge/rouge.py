"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score), averaged over examples."""

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


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
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            scores = scorer.score(reference, prediction)
            for key in ROUGE_TYPES:
                totals[key] += scores[key].fmeasure
        return {key: total / len(references) for key, total in totals.items()}
