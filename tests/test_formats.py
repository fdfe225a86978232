"""Task formats: where the loss goes (responses, assistant turns), label maps, task prefixes, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos_cli.core.data.formats import prepare_task_dataset
from llmos_cli.core.train.batches import IGNORE_INDEX
from llmos_cli.errors import UserError
from llmos_cli.recipe import validate_recipe
from tests.finetune_fixtures import chat_rows, minilm_dir, write_jsonl


@pytest.fixture(scope="module")
def bpe():
    from llmos_cli.core.data.tokenizer import train_bpe_tokenizer

    texts = ["What does the cat say? The cat says meow. Below is an instruction ### Response"] * 20
    return train_bpe_tokenizer(iter(texts), vocab_size=300, min_frequency=1)


def prepare(tmp_path: Path, tokenizer, rows, task: str = "causal-lm", **data):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = validate_recipe(
        {"task": task, "data": {"train": str(train), "validation_split": 0.0, **data}}, "recipe.yaml"
    )
    return prepare_task_dataset(recipe, tokenizer)


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def test_instruction_loss_only_on_response_and_eos(tmp_path: Path, bpe) -> None:
    rows = [{"prompt": "What does the cat say?", "response": "The cat says meow."}]
    ds, info = prepare(tmp_path, bpe, rows, format="instruction")
    row = ds["train"][0]
    assert labelled_text(bpe, row) == "The cat says meow." + bpe.eos_token
    prompt_text = bpe.decode(row["input_ids"][: row["labels"].index(row["input_ids"][-2]) - 3])
    assert prompt_text.startswith("Below is an instruction") and "### Response:" in bpe.decode(
        row["input_ids"]
    )
    assert row["labels"][: len(row["labels"]) // 2] == [IGNORE_INDEX] * (len(row["labels"]) // 2)
    n = len(row["input_ids"])
    assert info["train"] == {
        "examples": 1,
        "dropped": {},
        "truncated": 0,
        "tokens": n,
        "example_tokens": {"mean": float(n), "p50": float(n), "p90": float(n), "p99": float(n), "max": n},
    }

    ds, _ = prepare(tmp_path, bpe, rows, format="instruction", train_on_prompt=True)
    assert ds["train"][0]["labels"] == ds["train"][0]["input_ids"]


def test_instruction_templates_use_row_fields(tmp_path: Path, bpe) -> None:
    rows = [{"prompt": "Say it", "input": "the cat", "response": "meow"}]
    ds, _ = prepare(tmp_path, bpe, rows, format="instruction")
    assert "### Input:\nthe cat" in bpe.decode(ds["train"][0]["input_ids"])  # alpaca's with-input form
    ds, _ = prepare(tmp_path, bpe, rows, format="instruction", template="Q: {prompt} ({input})\nA: ")
    assert bpe.decode(ds["train"][0]["input_ids"]) == "Q: Say it (the cat)\nA: meow" + bpe.eos_token
    with pytest.raises(UserError, match=r"train.jsonl:1: data.template names field 'topic'"):
        prepare(tmp_path, bpe, rows, format="instruction", template="{topic}: {prompt}")


def test_chat_loss_only_on_assistant_turns_through_end_of_turn(tmp_path: Path, bpe) -> None:
    convo = chat_rows(1)[0]
    convo["messages"] += [
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "woof"},
    ]
    ds, _ = prepare(tmp_path, bpe, [convo], format="chat")
    row = ds["train"][0]
    first = convo["messages"][2]["content"]
    assert labelled_text(bpe, row) == f"{first}<|im_end|>\nwoof<|im_end|>\n"  # ChatML turns, closed by im_end
    ds, _ = prepare(tmp_path, bpe, [convo], format="chat", train_on_prompt=True)
    assert ds["train"][0]["labels"] == ds["train"][0]["input_ids"]


def test_chat_recipe_template_and_bad_messages(tmp_path: Path, bpe) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}[assistant] {% endif %}"
    convo = chat_rows(1)[0]
    ds, _ = prepare(tmp_path, bpe, [convo], format="chat", chat_template=template)
    reply = convo["messages"][-1]["content"]
    assert labelled_text(bpe, ds["train"][0]).strip() == reply + bpe.eos_token
    assert bpe.chat_template == template  # saved with final/ so inference renders the same way
    bad = [{"messages": [{"role": "robot", "content": "hi"}]}]
    with pytest.raises(UserError, match=r"train.jsonl:1: message 1 should be"):
        prepare(tmp_path, bpe, bad, format="chat")


def test_classification_label_map_counts_and_unknown_labels(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    rows = [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]
    ds, info = prepare(tmp_path, tok, rows, task="classification", format="classification")
    assert info["label_names"] == ["neg", "pos"] and info["class_counts"] == {"neg": 1, "pos": 2}
    assert ds["train"]["label"] == [1, 0, 1]
    assert tok.decode(ds["train"][0]["input_ids"]) == "[CLS] good [SEP]"

    numeric = [{"text": "a", "label": 10}, {"text": "b", "label": 9}]
    _, info = prepare(tmp_path, tok, numeric, task="classification", format="classification")
    assert info["label_names"] == ["9", "10"]

    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "meh", "label": "mixed"}])
    with pytest.raises(UserError, match=r"val.jsonl:1: label 'mixed' is not one of the labels \(neg, pos\)"):
        prepare(tmp_path, tok, rows, task="classification", format="classification", validation=str(val))


def test_pairs_get_the_task_prefix_and_eos(tmp_path: Path, bpe) -> None:
    rows = [{"source": "the cat", "target": "meow"}] * 4
    ds, info = prepare(tmp_path, bpe, rows, task="seq2seq", format="pairs", task_prefix="say: ")
    row = ds["train"][0]
    assert bpe.decode(row["input_ids"]) == "say: the cat" + bpe.eos_token
    assert bpe.decode(row["labels"]) == "meow" + bpe.eos_token
    assert info["train"]["examples"] == 1 and info["duplicates_exact"] == 3  # repeats go, as for text


def test_format_must_fit_the_task_and_split_is_seeded(tmp_path: Path, bpe) -> None:
    with pytest.raises(UserError, match="data.format: 'pairs' does not fit task 'causal-lm'"):
        prepare(tmp_path, bpe, [{"source": "a", "target": "b"}], format="pairs")
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    a, _ = prepare(tmp_path, bpe, rows, format="instruction", validation_split=0.25)
    b, _ = prepare(tmp_path, bpe, rows, format="instruction", validation_split=0.25)
    assert (len(a["train"]), len(a["validation"])) == (30, 10)
    assert a["validation"]["input_ids"] == b["validation"]["input_ids"]
