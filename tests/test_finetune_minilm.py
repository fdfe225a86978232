"""The real thing: all-MiniLM-L6-v2 fine-tuned by llmos matches a plain HF Trainer run in accuracy."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_minilm_classification_matches_hf_trainer_accuracy() -> None:
    from bench import bench_finetune

    accuracy, wall_time, _ = bench_finetune.run(quick=True)
    assert accuracy["unit"] == "% accuracy" and accuracy["baseline"] > 80
    assert abs(accuracy["ours"] - accuracy["baseline"]) <= 1.0, accuracy["notes"]
    assert wall_time["ours"] > 0 and wall_time["baseline"] > 0
