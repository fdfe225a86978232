"""Packaged evaluate metrics, each checked against the library that defines it, computed directly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import sacrebleu  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from llmos_cli.core.metrics import (  # noqa: E402
    _MODULE_OF,
    KNOWN_METRICS,
    METRICS_DIR,
    check_metrics,
    compute_metrics,
)
from llmos_cli.errors import UserError  # noqa: E402

REFS = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neg", "pos", "neu"]
PREDS = ["pos", "neg", "pos", "pos", "pos", "neg", "neu", "neg", "pos", "pos"]
LABELS = ["pos", "neg", "neu", "unused"]

HYPS = [
    "the cat sat on the mat",
    "a quick brown fox jumps",
    "hello there general kenobi",
    "it is raining today",
]
GOLD = ["the cat is on the mat", "the quick brown fox jumped", "hello there", "today it is raining heavily"]


def test_every_module_is_a_package_data_script():
    # pyproject ships `core/metrics/*/*.py`; evaluate.load(dir) needs dir/<dir name>.py
    for module in set(_MODULE_OF.values()):
        assert (METRICS_DIR / module / f"{module}.py").is_file()
    assert {"loss", "perplexity", "accuracy", "f1", "exact_match", "bleu", "chrf", "rouge"} <= set(
        KNOWN_METRICS
    )


@pytest.mark.parametrize(
    ("preds", "refs"), [(PREDS, REFS), ([0, 1, 1, 2, 0], [0, 1, 2, 2, 1])], ids=["strings", "ints"]
)
def test_accuracy_matches_sklearn(preds, refs):
    result = compute_metrics(["accuracy"], preds, refs)
    assert result == {"accuracy": pytest.approx(accuracy_score(refs, preds))}


def test_precision_recall_f1_macro_and_per_class_match_sklearn():
    result = compute_metrics(["precision", "recall", "f1"], PREDS, REFS, labels=LABELS)
    p, r, f, _ = precision_recall_fscore_support(REFS, PREDS, labels=LABELS, average=None, zero_division=0)
    macro = precision_recall_fscore_support(REFS, PREDS, labels=LABELS, average="macro", zero_division=0)
    for key, per_class, avg in (("precision", p, macro[0]), ("recall", r, macro[1]), ("f1", f, macro[2])):
        assert result[key] == pytest.approx(avg)
        assert list(result[f"{key}_per_class"]) == LABELS
        assert list(result[f"{key}_per_class"].values()) == pytest.approx(list(per_class))


def test_f1_alone_returns_only_f1_and_defaults_to_sorted_union_of_labels():
    result = compute_metrics(["f1"], PREDS, REFS)
    assert set(result) == {"f1", "f1_per_class"}
    assert list(result["f1_per_class"]) == ["neg", "neu", "pos"]
    assert result["f1"] == pytest.approx(precision_recall_fscore_support(REFS, PREDS, average="macro")[2])


def test_confusion_matrix_matches_sklearn_in_label_order():
    result = compute_metrics(["confusion_matrix"], PREDS, REFS, labels=LABELS)
    expected = confusion_matrix(REFS, PREDS, labels=LABELS).tolist()
    assert result["confusion_matrix"] == {"labels": LABELS, "matrix": expected}


def test_exact_match_normalisations():
    preds = ["Paris ", "paris", "Paris!", "London", " rome."]
    refs = ["Paris", "Paris", "Paris", "Paris", "Rome"]
    # strip only (default): "Paris " == "Paris" -> 1 of 5
    assert compute_metrics(["exact_match"], preds, refs) == {"exact_match": pytest.approx(1 / 5)}
    lower = {"exact_match": {"lowercase": True}}
    assert compute_metrics(["exact_match"], preds, refs, options=lower)["exact_match"] == pytest.approx(2 / 5)
    everything = {"exact_match": {"lowercase": True, "ignore_punctuation": True}}
    assert compute_metrics(["exact_match"], preds, refs, options=everything)["exact_match"] == pytest.approx(
        4 / 5
    )
    raw = {"exact_match": {"strip": False}}
    assert compute_metrics(["exact_match"], preds, refs, options=raw)["exact_match"] == pytest.approx(0.0)


def test_bleu_and_chrf_match_sacrebleu():
    result = compute_metrics(["bleu", "chrf"], HYPS, GOLD)
    assert result == {
        "bleu": pytest.approx(sacrebleu.corpus_bleu(HYPS, [GOLD]).score),
        "chrf": pytest.approx(sacrebleu.corpus_chrf(HYPS, [GOLD]).score),
    }
    assert 0 < result["bleu"] < 100
    assert set(compute_metrics(["chrf"], HYPS, GOLD)) == {"chrf"}


def test_bleu_with_several_references_per_prediction():
    second = ["a cat sat on the mat", "a fast brown fox jumps", "general kenobi", "it rains today"]
    result = compute_metrics(["bleu"], HYPS, [list(pair) for pair in zip(GOLD, second, strict=True)])
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [GOLD, second]).score)


def test_rouge_matches_rouge_score_mean_fmeasure():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, GOLD, strict=True)]
    result = compute_metrics(["rouge"], HYPS, GOLD)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores))


def test_loss_metrics_are_left_to_the_caller():
    assert compute_metrics(["loss", "perplexity", "accuracy"], [1, 0], [1, 1]) == {"accuracy": 0.5}


def test_unknown_metric_is_a_user_error_listing_known_ones(monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    with pytest.raises(UserError) as err:
        compute_metrics(["accurasy"], ["a"], ["a"])
    assert "accurasy" in str(err.value)
    assert "exact_match" in str(err.value) and "perplexity" in str(err.value)
    with pytest.raises(UserError, match="accurasy"):
        check_metrics(["accuracy", "accurasy"])
    check_metrics(list(KNOWN_METRICS))


def test_empty_or_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(["accuracy"], [], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["accuracy"], ["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("names", "preds", "refs", "kwargs"),
    [
        (["accuracy"], PREDS, REFS, {}),
        (["precision", "recall", "f1"], PREDS, REFS, {"labels": LABELS}),
        (["confusion_matrix"], PREDS, REFS, {"labels": LABELS}),
        (["exact_match"], HYPS, GOLD, {}),
        (["bleu", "chrf"], HYPS, GOLD, {}),
        (["rouge"], HYPS, GOLD, {}),
    ],
)
def test_the_packaged_evaluate_modules_give_the_plain_functions_numbers(names, preds, refs, kwargs):
    from llmos_cli.core.metrics import _SHARED, load_local_metric

    module = _MODULE_OF[names[0]]
    extra = {"scores": sorted(names)} if module in _SHARED else {}
    loaded = load_local_metric(module).compute(predictions=preds, references=refs, **kwargs, **extra)
    assert loaded == compute_metrics(names, preds, refs, labels=kwargs.get("labels"))


def test_training_macro_f1_is_the_eval_macro_f1():
    import torch

    from llmos_cli.core.eval.classification import accuracy_and_f1

    pred, true = [0, 1, 1, 2, 0, 3], [0, 1, 2, 2, 1, 1]
    names = list(range(5))  # label 4 is in neither: it counts 0, as eval's does
    expected = compute_metrics(["accuracy", "f1"], pred, true, labels=names)
    got = accuracy_and_f1(torch.tensor(pred), torch.tensor(true), len(names))
    assert got == pytest.approx({"accuracy": expected["accuracy"], "f1": expected["f1"]})
    _, _, f1, _ = precision_recall_fscore_support(true, pred, labels=names, average="macro", zero_division=0)
    assert got["f1"] == pytest.approx(f1)
