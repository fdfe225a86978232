"""`llmos data label`: zero-shot labelling with all-MiniLM-L6-v2, the same scoring `Model.predict` uses."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.finetune_fixtures import minilm_dir

TOPICS = ["sports", "politics", "cooking", "finance"]
ROWS = [
    ("The striker scored twice in the second half to win the match.", "sports"),
    ("The goalkeeper saved a penalty in the final minute.", "sports"),
    ("She ran the marathon in under three hours.", "sports"),
    ("The senate passed the bill after a long debate among lawmakers.", "politics"),
    ("The president vetoed the new immigration law.", "politics"),
    ("Voters head to the polls for the parliamentary election.", "politics"),
    ("Whisk the eggs with sugar, then fold in the flour and bake for 20 minutes.", "cooking"),
    ("Simmer the tomato sauce with garlic and basil.", "cooking"),
    ("Season the steak and sear it in a hot pan.", "cooking"),
    ("The central bank raised interest rates to fight inflation.", "finance"),
    ("Shares fell sharply after the quarterly earnings report.", "finance"),
    ("The weather was nice and we talked for a while.", "finance"),  # no clear topic: a low score
]


@pytest.fixture(scope="module")
def api_model():
    from llmos_cli.api import LLMOS

    return LLMOS().load_model(minilm_dir())


def test_label_matches_predict_and_sends_low_scores_to_review(run_cli, tmp_path: Path, api_model) -> None:
    texts = [t for t, _ in ROWS]
    predicted = api_model.predict(texts, TOPICS)
    threshold = 0.15  # between the clear rows' cosine similarities and the doubtful ones'
    src = tmp_path / "in.csv"
    src.write_text("body,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts)))

    res = run_cli(
        "--json", "data", "label", src, tmp_path / "out.jsonl", "--model", minilm_dir(),
        "--labels", ",".join(TOPICS), "--text-field", "body", "--min-score", str(threshold),
    )  # fmt: skip
    assert res.code == 0, res.stderr
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    review = [json.loads(x) for x in (tmp_path / "out.review.jsonl").read_text().splitlines()]
    labelled = {int(r["id"]): r for r in kept + review}
    assert sorted(labelled) == list(range(len(ROWS))) and len(kept) + len(review) == len(ROWS)
    assert [labelled[i]["label"] for i in range(len(ROWS))] == predicted  # the labels predict gives
    assert all(r["label_score"] >= threshold for r in kept) and all(
        r["label_score"] < threshold for r in review
    )
    assert 0 < len(review) < len(ROWS)
    accuracy = np.mean([labelled[i]["label"] == gold for i, (_, gold) in enumerate(ROWS)])
    assert accuracy == np.mean([p == gold for p, (_, gold) in zip(predicted, ROWS, strict=True)])
    assert accuracy == 10 / 12  # what zero-shot MiniLM reaches here (the marathon reads as politics)
    wrong = {i for i, (_, gold) in enumerate(ROWS) if predicted[i] != gold}
    assert wrong <= {int(r["id"]) for r in review}  # both misses scored low: they wait for review
    # the score is the one Model.scores gives the chosen label
    assert labelled[0]["label_score"] == pytest.approx(
        api_model.scores(texts[0], TOPICS)[predicted[0]], abs=1e-6
    )

    summary = json.loads(res.stdout)
    assert summary["rows"] == 12 and summary["kept"] == len(kept) and summary["review"] == len(review)
    assert summary["labels"] == dict(Counter(r["label"] for r in kept).most_common())
    every = sorted(r["label_score"] for r in kept + review)
    assert summary["score"]["min"] == pytest.approx(every[0], abs=1e-4)
    assert summary["score"]["max"] == pytest.approx(every[-1], abs=1e-4)
    assert summary["score"]["p50"] == pytest.approx(float(np.median(every)), abs=1e-4)


def test_plain_run_prints_the_summary_table(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in ROWS[:4]))
    res = run_cli(
        "data", "label", src, tmp_path / "out.csv", "--model", minilm_dir(), "--labels", "sports,politics"
    )
    assert res.code == 0, res.stderr
    assert "label: sports" in res.stderr and "score p50" in res.stderr
    header, *lines = (tmp_path / "out.csv").read_text().splitlines()
    assert header == "text,label,label_score" and len(lines) == 4
    assert not (tmp_path / "out.review.csv").exists()


def test_a_model_without_a_head_needs_labels(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    res = run_cli("data", "label", src, tmp_path / "out.jsonl", "--model", minilm_dir())
    assert res.code == 2 and "no classification head" in res.stderr and "--labels" in res.stderr
    res = run_cli(
        "data",
        "label",
        src,
        tmp_path / "out.jsonl",
        "--model",
        minilm_dir(),
        "--text-field",
        "body",
        "--labels",
        "a,b",
    )
    assert res.code == 2 and "missing field 'body'" in res.stderr


def test_the_python_api_labels_a_file(tmp_path: Path, api_model) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in ROWS[:3]))
    summary = api_model.label(src, tmp_path / "out.jsonl", ["sports", "cooking"], min_score=1.0)
    assert summary["kept"] == 0 and summary["review"] == 3  # cosine similarity never reaches 1
    assert summary["review_labels"] == {"sports": 3}
    assert len((tmp_path / "out.review.jsonl").read_text().splitlines()) == 3


def test_a_recipe_labelling_step_feeds_classification(tmp_path: Path, api_model) -> None:
    from llmos_cli.recipe import load_recipe
    from llmos_cli.stages import data as data_stage
    from tests.conftest import write_recipe

    rows = [ROWS[i] for i in (0, 1, 6, 7, 8, 2)]  # sports and cooking, no label field
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "task": "classification",
            "model": {"name_or_path": str(minilm_dir())},
            "data": {
                "train": "train.jsonl",
                "format": "classification",
                "validation_split": 0,
                "label": {
                    "model": "builtin:all-MiniLM-L6-v2",
                    "labels": ["sports", "cooking"],
                    "min_score": 0.1,
                },
                "output": str(tmp_path / "out"),
            },
        },
    )
    prepared = data_stage.run(load_recipe(recipe))
    predicted = api_model.predict([t for t, _ in rows], ["sports", "cooking"])
    scores = [max(api_model.scores(t, ["sports", "cooking"]).values()) for t, _ in rows]
    kept = [p for p, s in zip(predicted, scores, strict=True) if s >= 0.1]
    report = prepared.report
    assert report["labelled"] == {
        "model": "builtin:all-MiniLM-L6-v2",
        "rows": len(kept),
        "under_min_score": 6 - len(kept),
    }
    assert report["class_counts"] == {name: kept.count(name) for name in report["label_names"]}


def test_a_fine_tuned_classifier_labels_with_its_own_labels(run_cli, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llmos_cli.api import LLMOS

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "clf"))
    tok.save_pretrained(str(tmp_path / "clf"))
    texts = [t for t, _ in ROWS[:5]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    res = run_cli(
        "data", "label", tmp_path / "in.jsonl", out, "--model", tmp_path / "clf", "--batch-size", "2"
    )
    assert res.code == 0, res.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    head = LLMOS().load_model(tmp_path / "clf")
    assert [r["label"] for r in got] == head.predict(texts)  # the head's own labels, no --labels
    assert all(0.5 <= r["label_score"] <= 1 for r in got)  # the winning class probability
    alone = [head.scores(t) for t in texts]  # batches of 2 padded texts score as one text at a time
    assert [r["label"] for r in got] == [max(s, key=s.get) for s in alone]
    assert [r["label_score"] for r in got] == pytest.approx([max(s.values()) for s in alone], abs=1e-5)


def test_batched_labels_equal_one_text_at_a_time(tmp_path: Path, api_model) -> None:
    texts = [t for t, _ in ROWS]
    alone = [api_model.scores(t, TOPICS) for t in texts]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for batch_size in (1, 5):
        api_model.label(src, tmp_path / f"out{batch_size}.jsonl", TOPICS, batch_size=batch_size)
        got = [json.loads(x) for x in (tmp_path / f"out{batch_size}.jsonl").read_text().splitlines()]
        assert [r["label"] for r in got] == [max(s, key=s.get) for s in alone]
        assert [r["label_score"] for r in got] == pytest.approx([max(s.values()) for s in alone], abs=1e-5)
    assert api_model.predict(texts, TOPICS, batch_size=5) == api_model.predict(texts, TOPICS, batch_size=1)


def test_the_label_batch_size_is_not_part_of_the_dataset_fingerprint() -> None:
    """The same labels come out at any batch size: changing it re-encodes nothing."""
    from llmos_cli.core.data.cache import data_settings
    from llmos_cli.recipe import DataSection

    label = {"model": "builtin:all-MiniLM-L6-v2", "labels": ["a", "b"]}
    assert data_settings(DataSection(label={**label, "batch_size": 4})) == data_settings(
        DataSection(label=label)
    )
    assert data_settings(DataSection(label=label)) != data_settings(
        DataSection(label={**label, "min_score": 0.1})
    )
