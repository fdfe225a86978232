"""`llmos data check`: the training encoding against the serving prompt, and where the loss (and EOS) goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos_cli.errors import UserError
from llmos_cli.recipe import validate_recipe
from llmos_cli.stages import data_check
from tests.finetune_fixtures import (
    chat_rows,
    instruction_rows,
    minilm_dir,
    pair_rows,
    tiny_llama,
    write_jsonl,
)

# Turns closed by EOS, generation prompt exactly the assistant header: what serving sends is what training saw.
EOS_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The generation prompt ends with a space that training merges into the reply's first token (' The').
TRAILING_SPACE_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
# The generation prompt adds a newline that the rendered assistant turn does not have.
HEADER_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def recipe(tmp_path: Path, model: Path, rows: list, task: str = "causal-lm", **data):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return validate_recipe(
        {
            "task": task,
            "model": {"name_or_path": str(model)},
            "data": {"train": str(train), "validation_split": 0.0, **data},
        },
        "recipe.yaml",
    )


def test_matching_chat_template_passes_with_loss_on_reply_and_eos(
    tmp_path: Path, model: Path, capsys
) -> None:
    rows = chat_rows(3)
    result = data_check.run(recipe(tmp_path, model, rows, format="chat", chat_template=EOS_TEMPLATE), index=2)
    reply = rows[2]["messages"][-1]["content"]
    assert result["ok"] and result["mismatch"] is None and result["eos_carries_loss"]
    assert result["example"] == {"index": 2, "source": str(tmp_path / "train.jsonl"), "line": 3}
    assert result["training"]["loss_text"] == reply + "<|endoftext|>\n"
    assert result["serving"]["text"].endswith("<|assistant|>\n") and result["serving"]["stop_tokens"] == [
        "<|endoftext|>"
    ]
    training = result["training"]  # one loss span: from the serving prompt's end through the turn's end
    assert training["spans"] == [[result["serving"]["tokens"], training["tokens"]]]
    assert result["loss_tokens"] == training["tokens"] - result["serving"]["tokens"]
    json.dumps(result)  # JSON-able for --json
    assert f"<|assistant|>\n[[{reply}<|endoftext|>\n]]" in capsys.readouterr().err


def test_trailing_space_generation_prompt_is_caught_at_its_token(tmp_path: Path, model: Path) -> None:
    rows = chat_rows(1)
    result = data_check.run(
        recipe(tmp_path, model, rows, format="chat", chat_template=TRAILING_SPACE_TEMPLATE)
    )
    m = result["mismatch"]
    assert not result["ok"] and m["unit"] == "token"
    assert m["position"] == result["serving"]["tokens"] - 1  # the prompt's last token, the lone space
    assert (m["training_token"], m["serving_token"]) == (" The", " ")
    assert "-' The'" in m["diff"] and "+++ serving" in m["diff"]
    assert "differ at token" in result["problems"][0]


def test_generation_prompt_unlike_the_rendered_assistant_header_is_caught(
    tmp_path: Path, model: Path
) -> None:
    result = data_check.run(
        recipe(tmp_path, model, chat_rows(1), format="chat", chat_template=HEADER_TEMPLATE)
    )
    m = result["mismatch"]
    serving = result["serving"]["text"]
    assert not result["ok"] and m["unit"] == "character"
    assert m["position"] == len(serving) - 1 and serving.endswith("<|assistant|>\n")
    assert "+ " in m["diff"] and "<|assistant|>The" in m["diff"]


def test_chat_end_of_turn_token_is_a_stop_token(tmp_path: Path, model: Path) -> None:
    # The trained tokenizer's ChatML template closes turns with <|im_end|>: serving stops there too.
    r = recipe(tmp_path, model, chat_rows(1), format="chat")
    result = data_check.run(r)
    assert result["ok"] and result["mismatch"] is None and result["eos_carries_loss"]
    assert result["training"]["loss_text"].endswith("<|im_end|>\n")
    assert result["serving"]["stop_tokens"] == ["<|endoftext|>", "<|im_end|>"]


def test_a_template_without_a_stop_token_is_caught(tmp_path: Path, model: Path) -> None:
    # Turns that end in plain text: the model never learns to emit anything serving stops on.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    result = data_check.run(recipe(tmp_path, model, chat_rows(1), format="chat", chat_template=template))
    assert not result["ok"] and not result["eos_carries_loss"]
    assert "will not learn to stop" in result["problems"][0]


def test_instruction_prompt_matches_and_eos_carries_loss(tmp_path: Path, model: Path) -> None:
    rows = instruction_rows(2)
    result = data_check.run(recipe(tmp_path, model, rows, format="instruction"), index=1)
    assert result["ok"] and result["eos_carries_loss"] and result["mismatch"] is None
    assert result["serving"]["text"].endswith(f"### Instruction:\n{rows[1]['prompt']}\n\n### Response:\n")
    assert result["training"]["loss_text"] == rows[1]["response"] + "<|endoftext|>"
    assert result["training"]["spans"] == [[result["serving"]["tokens"], result["training"]["tokens"]]]


def test_reply_cut_by_max_seq_len_loses_its_eos(tmp_path: Path, model: Path) -> None:
    r = recipe(
        tmp_path,
        model,
        instruction_rows(1),
        format="instruction",
        template="Q: {prompt}\nA: ",
        max_seq_len=14,
    )
    result = data_check.run(r)
    assert not result["ok"] and not result["eos_carries_loss"]
    assert "data.max_seq_len cuts it" in result["problems"][0]


def test_text_and_pairs_check_only_the_eos(tmp_path: Path, model: Path) -> None:
    result = data_check.run(recipe(tmp_path, model, [{"text": "the cat says meow"}], format="text"))
    assert (
        result["ok"]
        and result["eos_carries_loss"]
        and result["serving"] == {"stop_tokens": ["<|endoftext|>", "<|im_end|>"]}
    )
    assert (
        result["training"]["loss_text"] == "the cat says meow<|endoftext|>"
        and "text:" in result["checked"][0]
    )

    result = data_check.run(recipe(tmp_path, model, pair_rows(2), task="seq2seq", format="pairs"))
    assert result["ok"] and result["training"]["loss_text"].endswith("<|endoftext|>")
    assert "pairs:" in result["checked"][0]

    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    result = data_check.run(
        recipe(tmp_path, minilm_dir(), rows, task="classification", format="classification")
    )
    assert (
        result["ok"] and result["eos_carries_loss"] is None and "no generated text" in result["not_checked"]
    )


def test_index_past_the_data_is_a_user_error(tmp_path: Path, model: Path) -> None:
    with pytest.raises(UserError, match=r"--index 5: data.train .* has fewer than 6 rows"):
        data_check.run(recipe(tmp_path, model, instruction_rows(2), format="instruction"), index=5)


def test_runner_stops_on_the_chat_end_of_turn(model: Path) -> None:
    """Serving stops where a chat fine-tune learned to close its turn, not only on EOS."""
    from llmos_cli.core.models import load_model, load_tokenizer
    from llmos_cli.core.serve.runners import Runner, chat_end_of_turn

    tok = load_tokenizer(model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat_end_of_turn(tok) == im_end
    assert Runner(load_model(model), tok).eos_ids == {tok.eos_token_id, im_end}
    tok.chat_template = None
    assert chat_end_of_turn(tok) is None
