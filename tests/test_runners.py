"""One model description, one device rule, one runner per kind: generate, chat, serve, eval and the API
on a causal LM, a seq2seq model, an encoder and a classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.models import context_window, describe_model, model_kind
from llmos_cli.core.serve.runners import EncoderRunner, Runner, SamplingParams, Seq2SeqRunner, load_runner
from llmos_cli.errors import UserError
from llmos_cli.stages import serve
from tests.finetune_fixtures import minilm_dir, tiny_t5

PROMPTS = ["translate English to French: house", "cat", "translate English to French: the red dog runs"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """The tiny T5 with an untied LM head, so its random greedy output is words (and an EOS), not padding."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = tiny_t5(tmp_path_factory.mktemp("t5"))
    cfg = T5Config.from_pretrained(str(path))
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    T5ForConditionalGeneration(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """transformers' own greedy generate, one prompt at a time: the reference."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        out = model.generate(
            **tok(prompt, return_tensors="pt"), max_new_tokens=max_new_tokens, do_sample=False
        )
    ids = out[0, 1:].tolist()  # without the decoder start token
    if model.config.eos_token_id in ids:
        ids = ids[: ids.index(model.config.eos_token_id) + 1]
    return ids, tok.decode(out[0], skip_special_tokens=True)


def test_the_model_description_names_each_kind(t5_dir, llama_dir, tmp_path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    assert describe_model(t5_dir).kind == "seq2seq"
    assert describe_model(llama_dir).kind == "causal"
    assert describe_model(minilm_dir()).kind == "encoder"
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "clf"))
    info = describe_model(tmp_path / "clf")
    assert info.kind == "classifier" and info.tokenizer_dir is None and not info.generates
    # the kind of a loaded model follows the same rule
    assert model_kind(describe_model(t5_dir).load()) == "seq2seq"
    run = tmp_path / "myrun"
    (run / "final").mkdir(parents=True)
    for f in llama_dir.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    info = describe_model(run)
    assert info.path == run / "final" and info.name == "myrun" and context_window(info.config) == 512


def test_seq2seq_runner_equals_transformers_greedy_generate(t5_dir) -> None:
    runner = Runner.load(t5_dir)
    assert isinstance(runner, Seq2SeqRunner)
    expected = [hf_greedy(t5_dir, p, 10) for p in PROMPTS]
    assert all(text for _, text in expected[:2]) and expected[2][0] == [1]  # words, and one stops at once
    for batch_size in (1, 2, 3):  # 2: a group finishes while the next prompt waits for its turn
        done = runner.generate(PROMPTS, SamplingParams(max_new_tokens=10), batch_size=batch_size)
        assert [c.token_ids for c in done] == [ids for ids, _ in expected]
        assert [c.text for c in done] == [text for _, text in expected]
    assert "".join(runner.stream(PROMPTS[0], SamplingParams(max_new_tokens=10))) == expected[0][1]


def test_seq2seq_sampling_is_seeded_and_stops_at_stop_strings(t5_dir) -> None:
    runner = Runner.load(t5_dir)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    first = runner.generate(PROMPTS, params)
    assert [c.token_ids for c in runner.generate(PROMPTS, params)] == [c.token_ids for c in first]
    assert all(len(c.token_ids) <= 8 for c in first)


def test_llmos_generate_on_a_t5_model_prints_transformers_greedy_output(t5_dir, run_cli, tmp_path) -> None:
    _, expected = hf_greedy(t5_dir, PROMPTS[0], 12)
    res = run_cli("generate", t5_dir, "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--device", "cpu")
    assert res.code == 0, res.stderr
    assert res.stdout == expected + "\n"
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    res = run_cli(
        "generate", t5_dir, "--input", src, "--output", tmp_path / "out.jsonl", "--max-new-tokens", "12"
    )
    assert res.code == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [hf_greedy(t5_dir, p, 12)[1] for p in PROMPTS]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    res = run_cli("generate", t5_dir, "--input", chat)
    assert res.code == 2 and f"{chat}:1: an encoder-decoder (seq2seq) model takes plain prompts" in res.stderr


def test_serve_on_a_t5_model_completes_with_transformers_greedy_output(t5_dir) -> None:
    _, expected = hf_greedy(t5_dir, PROMPTS[0], 10)
    app = serve.build_app(str(t5_dir), api_key=None, device="cpu")
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        body = {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "plain prompts" in r.json()["error"]["message"]


def test_generate_refuses_an_encoder_and_chat_refuses_a_seq2seq_model(t5_dir, run_cli) -> None:
    res = run_cli("generate", minilm_dir(), "--prompt", "hi")
    assert res.code == 2 and "is an encoder; generation needs a causal LM" in res.stderr
    res = run_cli("chat", t5_dir)
    assert res.code == 2 and "chat needs a causal LM" in res.stderr and "seq2seq" in res.stderr


@pytest.mark.parametrize("device", ["cuda:7", "mps", "tpu"])
def test_an_absent_device_is_exit_2_naming_the_flag(llama_dir, run_cli, tmp_path, device) -> None:
    if (
        device == "cuda:7"
        and torch.cuda.device_count() > 7
        or device == "mps"
        and torch.backends.mps.is_available()
    ):
        pytest.skip(f"this machine has {device}")
    for key, args in (
        ("--device", ["generate", llama_dir, "--prompt", "hi", "--device", device]),
        ("--device", ["chat", llama_dir, "--device", device]),
        ("serve.device", ["serve", llama_dir, "--device", device, "--port", "0"]),  # the key --device sets
    ):
        res = run_cli(*args)
        assert res.code == 2, (args, res.stderr)
        assert f"{key}: {device}" in res.stderr or f"{key}: '{device}'" in res.stderr
        assert "Traceback" not in res.stderr
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {{name_or_path: {llama_dir}}}\neval: {{data: {tmp_path / 'x.txt'}}}\n")
    (tmp_path / "x.txt").write_text("the quick brown fox\n" * 20)
    res = run_cli("eval", recipe, "--device", device)
    assert res.code == 2 and "eval.device" in res.stderr, res.stderr


def test_serve_names_its_recipe_key_for_an_absent_device(llama_dir, tmp_path, run_cli) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(f"model: {{name_or_path: {llama_dir}}}\nserve: {{device: cuda, port: 0}}\n")
    res = run_cli("serve", recipe)
    assert res.code == 2 and "serve.device: cuda requested but this machine has no CUDA device" in res.stderr


def test_device_cpu_is_honoured_by_every_entry_point(llama_dir, tmp_path, run_cli) -> None:
    from llmos_cli import LLMOS

    res = run_cli("generate", llama_dir, "--prompt", "the", "--max-new-tokens", "3", "--device", "cpu")
    assert res.code == 0, res.stderr
    app = serve.build_app(str(llama_dir), api_key=None, device="cpu")
    with TestClient(app) as http:
        assert http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
    model = LLMOS().load_model(llama_dir, device="cpu")
    assert model.device.type == "cpu" and model.model.device.type == "cpu"
    assert model.model.dtype == torch.float32  # fp32 on CPU unless asked otherwise
    (tmp_path / "x.txt").write_text("the quick brown fox jumps\n" * 40)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {llama_dir}}}\ndata: {{max_seq_len: 32}}\n"
        f"eval: {{data: {tmp_path / 'x.txt'}, device: cpu}}\nrun: {{output_dir: {tmp_path / 'ev'}}}\n"
    )
    res = run_cli("--json", "eval", recipe)
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["perplexity"] > 1


def test_encoder_runner_embeddings_are_the_api_embeddings(tmp_path) -> None:
    from llmos_cli import LLMOS

    runner = load_runner(describe_model(minilm_dir()))
    assert isinstance(runner, EncoderRunner) and not runner.is_classifier
    texts = ["a cat sat on the mat", "stock markets fell"]
    api = LLMOS().load_model(minilm_dir(), device="cpu").embed(texts)
    assert torch.allclose(torch.tensor(runner.embed(texts)), torch.tensor(api), atol=1e-6)
    with pytest.raises(UserError, match="is a encoder model; this runner generates text"):
        Runner.load(minilm_dir())


def test_api_translate_and_generate_use_the_seq2seq_runner(t5_dir) -> None:
    from llmos_cli import LLMOS

    model = LLMOS().load_model(t5_dir)
    assert model.kind == "seq2seq"
    assert (
        model.translate("house", target_language="fr", max_new_tokens=10)
        == hf_greedy(t5_dir, PROMPTS[0], 10)[1]
    )
    assert model.generate(PROMPTS, max_new_tokens=10) == [hf_greedy(t5_dir, p, 10)[1] for p in PROMPTS]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_on_a_gpu_every_inference_entry_point_puts_the_model_and_inputs_there(
    llama_dir, t5_dir, tmp_path
) -> None:
    from llmos_cli import LLMOS
    from llmos_cli.core.eval import tasks
    from llmos_cli.core.serve.runners import open_runner
    from llmos_cli.stages import evaluate

    seen: list[torch.device] = []
    runner = open_runner(describe_model(llama_dir))  # auto: CUDA first
    assert runner.model.device.type == "cuda"
    expected_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert runner.model.dtype == expected_dtype
    hook = runner.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].device), with_kwargs=True
    )
    runner.generate(["the quick"], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    hook.remove()
    assert seen and all(d.type == "cuda" for d in seen)
    assert open_runner(describe_model(t5_dir)).generate(PROMPTS, SamplingParams(max_new_tokens=4))
    app = serve.build_app(str(llama_dir), api_key=None)
    with TestClient(app) as http:
        assert http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
    model = LLMOS().load_model(llama_dir)
    assert model.model.device.type == "cuda" and model.generate("the", max_new_tokens=2) is not None
    (tmp_path / "x.txt").write_text("the quick brown fox jumps\n" * 40)
    from llmos_cli.recipe import validate_recipe

    recipe = validate_recipe(
        {
            "model": {"name_or_path": str(llama_dir)},
            "data": {"max_seq_len": 32},
            "eval": {"data": str(tmp_path / "x.txt")},
            "run": {"output_dir": str(tmp_path / "ev")},
        },
        "<test>",
    )
    assert tasks.EvalTarget.of(recipe, str(llama_dir)).device.type == "cuda"
    assert evaluate.run(recipe)["metrics"]["perplexity"] > 1


def test_the_description_reads_a_remote_code_config_only_when_trusted(llama_dir, monkeypatch) -> None:
    from transformers import AutoConfig

    seen: list[bool] = []
    real = AutoConfig.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return real(path, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    describe_model(llama_dir)
    describe_model(llama_dir, trust_remote_code=True)
    assert seen == [False, True]
