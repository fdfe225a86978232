"""The generate, chat and serve stages on a tiny model."""

from __future__ import annotations

import json
import os

import pytest

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve.runners import Runner, SamplingParams
from llmos_cli.errors import UserError
from llmos_cli.stages import chat, generate, serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_generate_one_prompt_prints_the_completion(model_dir, capsys):
    [text] = generate.run(str(model_dir), SamplingParams(max_new_tokens=8), prompt="the quick")
    assert capsys.readouterr().out == text + "\n"
    assert text == Runner.load(model_dir).generate(["the quick"], SamplingParams(max_new_tokens=8))[0].text


def test_generate_batch_jsonl(model_dir, tmp_path):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "out" / "completions.jsonl"
    rows = [{"prompt": f"prompt {i} " * (i + 1), "id": i} for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": "hello"}], "id": 5})
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = generate.run(
        str(model_dir), SamplingParams(max_new_tokens=6), input_path=src, output_path=dst, batch_size=2
    )
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(6))
    assert [o["completion"] for o in out] == texts
    assert all(o["finish_reason"] in ("stop", "length") for o in out)
    assert [p.name for p in dst.parent.iterdir()] == ["completions.jsonl"]  # no temp file left behind


@pytest.mark.parametrize(
    "line, match",
    [
        ("not json", "prompts.jsonl:2: not valid JSON"),
        ('{"text": "x"}', "prompts.jsonl:2: expected an object"),
    ],
)
def test_generate_names_the_bad_line(model_dir, tmp_path, line, match):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=match):
        generate.run(str(model_dir), SamplingParams(), input_path=src, output_path=tmp_path / "o.jsonl")


def test_generate_rejects_prompts_over_the_context_window(model_dir, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "ok"}\n' + json.dumps({"prompt": "x y " * 300}) + "\n")
    with pytest.raises(UserError, match="prompts.jsonl:2: the prompt is .* context window of 512"):
        generate.run(str(model_dir), SamplingParams(), input_path=src, output_path=tmp_path / "o.jsonl")
    with pytest.raises(UserError, match="--prompt: .* context window"):
        generate.run(str(model_dir), SamplingParams(max_new_tokens=600), prompt="hi")


def test_generate_rejects_bad_flags(model_dir):
    with pytest.raises(UserError, match="exactly one"):
        generate.run(str(model_dir), SamplingParams())
    with pytest.raises(UserError, match="--temperature"):
        generate.run(str(model_dir), SamplingParams(temperature=-1), prompt="x")


def test_chat_streams_replies_with_the_template(model_dir, monkeypatch, capsys):
    turns = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    chat.run(str(model_dir), system="be brief", max_new_tokens=5, temperature=0)
    runner = Runner.load(model_dir)
    ids = runner.encode_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]
    )
    expected = runner.generate([ids], SamplingParams(max_new_tokens=5))[0].text
    assert capsys.readouterr().out.endswith(expected + "\n")


def test_serve_refuses_a_public_address_without_a_key(model_dir, monkeypatch):
    monkeypatch.delenv("LLMOS_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="without an API key"):
        serve.run(str(model_dir), host="0.0.0.0", port=0, api_key_env="LLMOS_TEST_KEY")


def test_chat_default_reply_length_fits_a_small_context_and_says_so_once(tmp_path, monkeypatch, capsys):
    small = build_tiny_llama(tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    turns = iter(["hello", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    chat.run(str(small), temperature=0)  # the default 256 tokens would not fit a 64-token context
    err = capsys.readouterr().err
    assert err.count("replies are capped at the room the 64-token context leaves") == 1
    with pytest.raises(UserError, match="--max-new-tokens 256 it does not fit"):
        turns = iter(["hello"])
        chat.run(str(small), max_new_tokens=256)  # an explicit length is kept, and refused
