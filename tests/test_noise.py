"""Third-party noise stays off stderr: deprecations llmos cannot act on, torch's read-only array
warning, transformers' LOAD REPORT table (both doors: the CLI and the Python API)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from llmos_cli import LLMOS
from llmos_cli.core.train.batches import classification_collate, seq2seq_collate
from tests.conftest import write_recipe
from tests.finetune_fixtures import instruction_rows, sentiment_rows, tiny_bert, tiny_llama, write_jsonl


def _read_only(values: list[int]) -> np.ndarray:
    array = np.array(values, dtype=np.int64)
    array.setflags(write=False)  # as a dataset's numpy format hands rows out
    return array


def test_collators_take_read_only_rows_without_a_warning() -> None:
    rows = [{"input_ids": _read_only([1, 2, 3]), "labels": _read_only([4, 5]), "label": 1}] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = seq2seq_collate(0)(rows)
        classification_collate(0)(rows)
    assert batch["labels"].tolist() == [[4, 5]] * 2 and batch["input_ids"].tolist() == [[1, 2, 3]] * 2


def test_a_lora_finetune_shows_no_deprecation_warning(tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "run": {"name": "lora", "output_dir": str(tmp_path / "run")},
            "model": {"name_or_path": str(tiny_llama(tmp_path / "base"))},
            "data": {
                "train": str(write_jsonl(tmp_path / "t.jsonl", instruction_rows(40))),
                "format": "instruction",
            },
            "finetune": {"method": "lora"},
            "train": {"max_steps": 2, "batch_size": 4},
        },
    )
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # what a terminal would show, once per place
        res = run_cli("finetune", recipe)
    assert res.code == 0, res.stderr
    said = [str(w.message) for w in shown] + [res.stderr]
    assert not [s for s in said if "is_gradient_checkpointing" in s]


def test_the_api_shows_no_load_report(tmp_path: Path, capfd, monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    monkeypatch.chdir(tmp_path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a Python user's default (the tests run at error)
    try:
        model = LLMOS().load_model(tiny_bert(tmp_path / "bert"))
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40))
        tuned = model.finetune(task="classification", train_data=train, max_steps=2, batch_size=4)
    finally:
        hf_logging.set_verbosity(level)
    assert tuned.kind == "classifier"
    assert "LOAD REPORT" not in capfd.readouterr().err
