"""Data gates (`data.checks`): judged against the report, recorded in report.json, exit 3 when one fails."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmos_cli.core.data.gates import evaluate
from llmos_cli.recipe import ChecksSection
from tests.conftest import toy_documents, write_recipe
from tests.finetune_fixtures import minilm_dir

N_UNIQUE, N_REPEATS = 100, 20  # duplicate share 20 / 120


@pytest.fixture
def dup_recipe(tmp_path: Path) -> Path:
    docs = toy_documents(N_UNIQUE)
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in docs + docs[:N_REPEATS])
    )
    return write_recipe(
        tmp_path / "recipe.yaml",
        {
            "run": {"name": "gates", "output_dir": str(tmp_path / "run")},
            "model": {"arch": "llama", "config": {"hidden_size": 32}},
            "data": {
                "train": "train.jsonl",
                "validation_split": 0.1,
                "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                "max_seq_len": 32,
                "output": str(tmp_path / "data"),
                "checks": {"min_rows": 50, "max_duplicate_share": 0.05, "max_dropped_share": 0.1},
            },
            "train": {"max_steps": 2, "batch_size": 4},
            "pipeline": {"stages": ["data", "pretrain"]},
        },
    )


def test_a_failing_gate_exits_3_after_writing_the_report(run_cli, dup_recipe: Path, tmp_path: Path) -> None:
    res = run_cli("--json", "data", dup_recipe)
    assert res.code == 3
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["measures"]["duplicate_share"] == pytest.approx(
        N_REPEATS / (N_UNIQUE + N_REPEATS), abs=1e-6
    )
    assert report["measures"]["rows"] == N_UNIQUE and report["measures"]["dropped_share"] == 0
    assert {c["gate"]: c["passed"] for c in report["checks"]} == {
        "min_rows": True,
        "max_duplicate_share": False,
        "max_dropped_share": True,
    }
    printed = json.loads(res.stdout)  # one JSON object: the result and the error
    assert printed["exit_code"] == 3 and printed["report"]["checks"] == report["checks"]
    assert "data gate failed: max_duplicate_share: duplicate_share 0.1667 > 0.05" in printed["error"]
    plain = run_cli("data", dup_recipe)  # reused; the pass/fail table as plain lines outside a TTY
    assert plain.code == 3
    table = plain.stderr[plain.stderr.index("data checks") :].splitlines()
    assert table[1].split() == ["gate", "limit", "value", "result"]
    assert table[3].split() == ["max_duplicate_share", "0.05", "0.1667", "FAIL"]
    assert plain.stderr.rstrip().splitlines()[-1].startswith("error: data gate failed: max_duplicate_share")


def test_passing_gates_exit_0_and_a_reused_dataset_is_checked_anew(
    run_cli, dup_recipe: Path, tmp_path: Path
) -> None:
    res = run_cli("--json", "data", dup_recipe, "--set", "data.checks.max_duplicate_share=0.2")
    assert res.code == 0, res.stderr
    assert all(c["passed"] for c in json.loads(res.stdout)["report"]["checks"])
    # checks are not part of the dataset's fingerprint: the same dataset is reused and judged again
    res = run_cli(
        "--json",
        "data",
        dup_recipe,
        "--set",
        "data.checks.max_duplicate_share=0.2",
        "--set",
        "data.checks.min_rows=101",
    )
    assert res.code == 3
    printed = json.loads(res.stdout)
    assert printed["reused"] is True and "min_rows: rows 100 < 101" in printed["error"]
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert [c["gate"] for c in report["checks"] if not c["passed"]] == ["min_rows"]


def test_run_stops_the_pipeline_at_a_failed_gate(run_cli, dup_recipe: Path, tmp_path: Path) -> None:
    res = run_cli("run", dup_recipe)
    assert res.code == 3
    assert "error: data gate failed: max_duplicate_share" in res.stderr
    assert not (tmp_path / "run" / "final").exists()  # pretrain never started


def test_a_gate_that_cannot_be_measured_fails() -> None:
    gates = evaluate(ChecksSection(max_label_share=0.9, min_rows=1), {"rows": 5, "label_share": None})
    assert [(g.gate, g.passed) for g in gates] == [("min_rows", True), ("max_label_share", False)]
    assert gates[1].describe() == "max_label_share: not measured for this data (label_share)"


def test_classification_measures(run_cli, tmp_path: Path) -> None:
    """Labels, truncation, overlap and duplicates for a task format (rows compared by their text)."""
    rows = [{"text": f"good movie number {i}", "label": "pos"} for i in range(8)]
    rows += [{"text": "bad " * 40, "label": "neg"}, {"text": "good movie number 0", "label": "pos"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text(
        json.dumps(rows[1]) + "\n" + json.dumps({"text": "meh", "label": "neg"})
    )
    recipe = write_recipe(
        tmp_path / "cls.yaml",
        {
            "task": "classification",
            "model": {"name_or_path": str(minilm_dir())},
            "data": {
                "train": "train.jsonl",
                "validation": "val.jsonl",
                "format": "classification",
                "max_seq_len": 16,
                "output": str(tmp_path / "cls"),
                "clean": {"decontaminate": False},  # keep the overlap so its gate can fail
                "checks": {
                    "max_label_share": 0.8,
                    "max_train_validation_overlap": 0,
                    "max_truncated_share": 0.5,
                },
            },
        },
    )
    res = run_cli("--json", "data", recipe)
    assert res.code == 3
    measures = json.loads(res.stdout)["report"]["measures"]
    assert measures == {
        "rows": 11,  # the repeat of row 0 dropped
        "duplicate_share": pytest.approx(1 / 12, abs=1e-6),  # row 0 twice in train
        "truncated_share": pytest.approx(1 / 11, abs=1e-6),  # the long "bad bad ..." row
        "train_validation_overlap": 1,  # row 1 again in validation
        "label_share": pytest.approx(8 / 9, abs=1e-6),
        "dropped_share": 0.0,
    }
    assert {c["gate"]: c["passed"] for c in json.loads(res.stdout)["report"]["checks"]} == {
        "max_label_share": False,
        "max_train_validation_overlap": False,
        "max_truncated_share": True,
    }


def test_task_rows_are_deduplicated_and_decontaminated(run_cli, tmp_path: Path) -> None:
    """Classification rows repeated ten times: the repeats go before the split, so no validation row is
    also in train; an explicit validation file's rows found in train (exactly, or near with near_dedup)
    are removed; the report counts each decision and draws the length plot."""
    words = [
        "film",
        "plot",
        "actor",
        "scene",
        "music",
        "story",
        "ending",
        "camera",
        "light",
        "script",
        "pace",
        "voice",
    ]
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(words, k=14)), "label": i % 2} for i in range(40)]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({**r, "id": k}) + "\n" for k in range(10) for r in rows)
    )
    base = {
        "task": "classification",
        "model": {"name_or_path": str(minilm_dir())},
        "data": {"train": "train.jsonl", "format": "classification", "validation_split": 0.25},
    }
    split = write_recipe(
        tmp_path / "split.yaml", {**base, "data": {**base["data"], "output": str(tmp_path / "a")}}
    )
    res = run_cli("--json", "data", str(split))
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)["report"]
    assert report["duplicates_exact"] == 360  # the id column does not make a repeat new
    assert (report["train"]["examples"], report["validation"]["examples"]) == (30, 10)
    assert report["validation_overlap"] == 0 and report["measures"]["duplicate_share"] == 0.9
    assert (tmp_path / "a" / "lengths.png").stat().st_size > 1000 and report["histogram"] == "lengths.png"

    val = [rows[0], rows[1], {**rows[2], "text": rows[2]["text"] + "!"}, {"text": "a new review", "label": 1}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    data = {**base["data"], "validation": "val.jsonl", "output": str(tmp_path / "b")}
    exact = write_recipe(tmp_path / "exact.yaml", {**base, "data": data})
    report = json.loads(run_cli("--json", "data", str(exact)).stdout)["report"]
    assert (report["validation_overlap"], report["validation_overlap_removed"]) == (2, 2)
    assert report["validation"]["examples"] == 2 and report["measures"]["train_validation_overlap"] == 0

    near = {**data, "output": str(tmp_path / "c"), "clean": {"near_dedup": True}}
    report = json.loads(
        run_cli("--json", "data", str(write_recipe(tmp_path / "near.yaml", {**base, "data": near}))).stdout
    )["report"]
    assert report["validation_overlap_removed"] == 3 and report["validation"]["examples"] == 1
