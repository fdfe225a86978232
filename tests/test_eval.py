"""`llmos eval`: token-weighted loss and perplexity equal a hand-computed per-example reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmos_cli.recipe import load_recipe
from llmos_cli.stages import pretrain


@pytest.fixture
def trained(tiny_recipe: Path) -> Path:
    pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=10"]))
    return tiny_recipe


def reference_loss(model_dir: Path, texts: list[str], block: int) -> tuple[float, int]:
    """Plain per-example loop: tokenize, append EOS, concatenate, cut into blocks, sum token losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stream = [t for text in texts for t in tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    total, count = 0.0, 0
    for start in range(0, len(stream), block):
        ids = torch.tensor([stream[start : start + block]])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


def test_eval_matches_a_hand_computed_perplexity(trained: Path, tmp_path: Path, run_cli) -> None:
    texts = [
        "the owl sat on the hill. 1 2 3.",
        "a dog likes the pond.",
        ("the fox sat on the box. " * 5).strip(),
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    res = run_cli("--json", "eval", trained, "--set", f"eval.data={data}", "--set", "eval.batch_size=2")
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)
    total, count = reference_loss(tmp_path / "run" / "final", texts, 32)
    assert result["n_tokens"] == count
    assert result["metrics"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["n_examples"] == result["n_examples"]
    assert set(saved) >= {"metrics", "model", "data", "n_examples"}


def test_eval_defaults_to_the_prepared_validation_split(trained: Path, run_cli) -> None:
    res = run_cli("--json", "eval", trained)
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["data"].endswith("validation") and result["metrics"]["perplexity"] < 300


def test_eval_without_a_model_says_what_to_do(tiny_recipe: Path, run_cli) -> None:
    res = run_cli("eval", tiny_recipe)
    assert res.code == 2 and "no model to use" in res.stderr and "train first" in res.stderr


def test_multiple_choice_eval_writes_predictions(trained: Path, tmp_path: Path, run_cli) -> None:
    items = tmp_path / "mc.jsonl"
    items.write_text(
        json.dumps({"question": "the cat sat on the", "choices": ["mat.", "zebra quantum"], "answer": 0})
        + "\n"
        + json.dumps({"question": "the dog likes the", "choices": ["hill.", "9 9 9 9"], "answer": "hill."})
        + "\n"
    )
    res = run_cli(
        "--json", "eval", trained, "--set", "eval.task=multiple_choice", "--set", f"eval.data={items}"
    )
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["task"] == "multiple_choice" and result["n_examples"] == 2
    assert set(result["metrics"]) >= {"accuracy", "accuracy_norm"}
    preds = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert [p["answer"] for p in preds] == [0, 0] and all(len(p["loglikelihoods"]) == 2 for p in preds)


def test_multiple_choice_target_delimiter_is_a_recipe_key(trained: Path, tmp_path: Path, run_cli) -> None:
    items = tmp_path / "mc.jsonl"
    items.write_text(
        json.dumps({"question": "the cat sat on the", "choices": [" mat.", " zebra"], "answer": 0})
    )
    sets = ["--set", "eval.task=multiple_choice", "--set", f"eval.data={items}"]
    res = run_cli("eval", trained, *sets)
    assert res.code == 2 and f"{items}:1: choice ' mat.' starts with whitespace" in res.stderr
    res = run_cli("--json", "eval", trained, *sets, "--set", "eval.target_delimiter=''")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["n_examples"] == 1


def test_compare_two_runs_shows_deltas(tmp_path: Path, run_cli, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the chart goes to ./eval-compare.png by default
    for name, loss in (("a", 2.0), ("b", 1.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(
            json.dumps({"metrics": {"loss": loss, "perplexity": math.exp(loss)}})
        )
    res = run_cli("--json", "eval", "--compare", tmp_path / "a", tmp_path / "b")
    assert res.code == 0, res.stderr
    rows = {r["metric"]: r for r in json.loads(res.stdout)["metrics"]}
    assert rows["loss"]["values"] == [2.0, 1.5] and rows["loss"]["deltas"] == [pytest.approx(-0.5)]
    assert (tmp_path / "eval-compare.png").is_file()
    missing = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "nope")
    assert missing.code == 2 and "no eval.json" in missing.stderr


def test_compare_three_runs_deltas_against_the_first_and_a_plot(tmp_path: Path, run_cli) -> None:
    metrics = {"a": {"loss": 2.0, "accuracy": 0.5}, "b": {"loss": 1.5}, "c": {"loss": 1.0, "accuracy": 0.75}}
    for name, values in metrics.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"metrics": values}))
    runs = [tmp_path / n for n in metrics]
    plot = tmp_path / "cmp.png"
    res = run_cli("--json", "eval", "--compare", *runs, "--plot", plot)
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)
    rows = {r["metric"]: r for r in result["metrics"]}
    assert rows["loss"]["deltas"] == [pytest.approx(-0.5), pytest.approx(-1.0)]
    assert rows["accuracy"]["values"] == [0.5, None, 0.75]
    assert rows["accuracy"]["deltas"] == [None, pytest.approx(0.25)]
    assert result["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"

    table = run_cli("eval", "--compare", *runs, "--plot", plot).stderr
    accuracy = next(line for line in table.splitlines() if line.startswith("accuracy"))
    assert accuracy.split() == ["accuracy", "0.5", "-", "-", "0.75", "+0.25"]  # "-", never "None"
    assert "None" not in table
    assert run_cli("eval", "--compare", runs[0]).code == 2  # one run compares with nothing


def test_dataset_loss_shards_add_up_to_the_whole() -> None:
    """The validation share of each of 3 processes sums to the one-process loss and target count."""
    from llmos_cli.core.eval.loss import dataset_loss
    from llmos_cli.core.models import build_model
    from llmos_cli.core.runtime import pick_precision
    from llmos_cli.core.train.batches import causal_lm_collate
    from llmos_cli.core.train.objectives import CAUSAL_LM
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = build_model("llama", TINY_MODEL, 64, {"pad_token_id": 0})
    rows = [{"input_ids": torch.randint(1, 64, (n,)).tolist()} for n in range(5, 40, 3)]
    collate = causal_lm_collate(0)
    kwargs = {
        "batch_size": 2,
        "device": torch.device("cpu"),
        "precision": pick_precision("fp32", torch.device("cpu")),
        "max_batches": 5,
    }
    whole = dataset_loss(model, rows, CAUSAL_LM, collate, **kwargs)
    parts = [dataset_loss(model, rows, CAUSAL_LM, collate, shard=(i, 3), **kwargs) for i in range(3)]
    assert sum(c for _, c in parts) == whole[1] and whole[1] < sum(len(r["input_ids"]) for r in rows)
    assert sum(t for t, _ in parts) == pytest.approx(whole[0], rel=1e-9)
    assert all(c > 0 for _, c in parts)


def test_length_batches_fill_a_token_budget_longest_first() -> None:
    """Rows x longest stays within the budget; a row longer than the budget goes alone; every row once."""
    from llmos_cli.core.eval.loss import length_batches

    lengths = [3, 10, 4, 4, 1, 8, 2, 30]
    batches = length_batches(lengths, 2, batch_tokens=16)
    assert batches == [[7], [1], [5, 2], [3, 0, 6, 4]]
    assert length_batches(lengths, 3) == [[7, 1, 5], [2, 3, 0], [6, 4]]


def test_token_budget_batches_give_the_row_count_batches_loss() -> None:
    """The same summed loss and target count (1e-6 relative), whatever the batches' shapes."""
    from llmos_cli.core.eval.loss import dataset_loss
    from llmos_cli.core.models import build_model
    from llmos_cli.core.runtime import pick_precision
    from llmos_cli.core.train.batches import causal_lm_collate
    from llmos_cli.core.train.objectives import CAUSAL_LM
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = build_model("llama", TINY_MODEL, 64, {"pad_token_id": 0})
    rows = [{"input_ids": torch.randint(1, 64, (n,)).tolist()} for n in [2, 5, 40, 7, 33, 12, 3, 21, 9, 40]]
    kwargs = {"device": torch.device("cpu"), "precision": pick_precision("fp32", torch.device("cpu"))}
    collate = causal_lm_collate(0)
    by_rows = dataset_loss(model, rows, CAUSAL_LM, collate, batch_size=4, **kwargs)
    for budget in (1, 40, 64, 100, 10_000):
        by_tokens = dataset_loss(model, rows, CAUSAL_LM, collate, batch_size=4, batch_tokens=budget, **kwargs)
        assert by_tokens[1] == by_rows[1] == sum(len(r["input_ids"]) - 1 for r in rows)
        assert by_tokens[0] == pytest.approx(by_rows[0], rel=1e-6)
