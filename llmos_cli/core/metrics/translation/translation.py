"""Corpus BLEU and chrF (sacrebleu, 0-100), one or several references per prediction."""

import datasets
import evaluate
import sacrebleu

SCORES = {"bleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf}


def reference_streams(references):
    """sacrebleu wants one stream per reference position; every prediction needs the same number of references."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len({len(r) for r in refs}) > 1:
        raise ValueError("every prediction needs the same number of references")
    return [list(stream) for stream in zip(*refs, strict=True)]


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
        streams = reference_streams(references)
        return {name: float(SCORES[name](predictions, streams).score) for name in scores}
