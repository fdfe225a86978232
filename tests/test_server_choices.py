"""`n` choices and log-probs on /v1/completions and /v1/chat/completions, through the `openai` client."""

from __future__ import annotations

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve import create_app
from llmos_cli.core.serve.engine import Engine, QueueFull, Submission
from llmos_cli.core.serve.runners import Runner, SamplingParams
from tests.test_server import KEY, gated, serve_in_thread

MESSAGES = [{"role": "user", "content": "the quick"}]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def client(runner) -> openai.OpenAI:
    with serve_in_thread(Engine(runner, max_batch_size=4, max_queue=64)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def no_eos(runner: Runner) -> dict[str, int]:
    return {str(t): -100 for t in runner.eos_ids}


def test_greedy_logprobs_are_the_models_log_softmax(runner):
    """Each token's log-prob is log_softmax of transformers' own forward pass over prompt + completion."""
    prompt = runner.encode("the quick")
    (c,) = runner.generate([prompt], SamplingParams(max_new_tokens=8, logprobs=3))
    assert [e.token_id for e in c.logprobs] == c.token_ids
    with torch.no_grad():
        logits = runner.model(torch.tensor([prompt + c.token_ids])).logits[0].float()
    ref = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    got = torch.tensor([e.logprob for e in c.logprobs])
    torch.testing.assert_close(
        got, ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4, rtol=0
    )
    for e, row in zip(c.logprobs, ref, strict=True):
        values, ids = row.topk(3)
        assert [t for t, _ in e.top] == ids.tolist() and e.top[0][0] == e.token_id  # greedy: the best
        torch.testing.assert_close(torch.tensor([lp for _, lp in e.top]), values, atol=1e-4, rtol=0)


def test_completion_logprobs_over_http(client, runner):
    r = client.completions.create(
        model="tiny", prompt="the quick", max_tokens=8, temperature=0, logprobs=3, logit_bias=no_eos(runner)
    )
    (c,) = runner.generate(["the quick"], SamplingParams(max_new_tokens=8, logprobs=3))
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in c.logprobs], abs=1e-6)
    text = r.choices[0].text
    if "\ufffd" not in text:  # a token holding part of a multi-byte character reads as U+FFFD
        assert "".join(lp.tokens) == text
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert (
        lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    )
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob and 1 <= len(top) <= 4
    assert len(lp.tokens) == r.usage.completion_tokens == 8
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].logprobs is None
    zero = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0, logprobs=0)
    assert all(len(top) == 1 for top in zero.choices[0].logprobs.top_logprobs)


def test_chat_logprobs_whole_and_streamed(client, runner):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logit_bias=no_eos(runner))
    whole = client.chat.completions.create(**args, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 10
    raw = b"".join(bytes(t.bytes) for t in content)  # a partial character's token is spelled "bytes:\\x.."
    assert raw.decode("utf-8", errors="replace") == whole.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy picks the best
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.bytes
    chunks = list(client.chat.completions.create(**args, logprobs=True, top_logprobs=2, stream=True))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    for c in chunks:  # each chunk carries its own tokens' log-probs
        delta = c.choices[0].delta.content if c.choices else None
        if delta and "\ufffd" not in delta and c.choices[0].logprobs:
            assert "".join(t.token for t in c.choices[0].logprobs.content) == delta
    assert client.chat.completions.create(**args).choices[0].logprobs is None


def test_n_choices_differ_and_reproduce(client, runner):
    def sample(**kw):
        return client.completions.create(
            model="tiny", prompt="a", max_tokens=6, temperature=1.0, seed=7, n=3, logprobs=0, **kw
        )

    r = sample()
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1 and texts == [c.text for c in sample().choices]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    one = client.completions.create(model="tiny", prompt="a", max_tokens=6)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    # choice j of prompt i is choice i * n + j; the same seeds as a request of the prompts one by one
    two = client.completions.create(
        model="tiny", prompt=["a", "b"], max_tokens=6, temperature=1.0, seed=7, n=2
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == texts[:2]
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=3
    )
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) > 1


def test_n_choices_streamed(client, runner):
    args = dict(model="tiny", max_tokens=6, temperature=1.0, seed=3, n=2)
    whole = client.completions.create(prompt="a", logprobs=1, **args)
    texts, logprobs = ["", ""], [[], []]
    stream = client.completions.create(
        prompt="a", logprobs=1, stream=True, stream_options={"include_usage": True}, **args
    )
    *chunks, usage = list(stream)
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
        if c.choices[0].logprobs:
            logprobs[c.choices[0].index] += c.choices[0].logprobs.token_logprobs
    assert texts == [c.text for c in whole.choices] and usage.usage == whole.usage
    assert logprobs == [c.logprobs.token_logprobs for c in whole.choices]  # every token's, streamed once
    chat = client.chat.completions.create(messages=MESSAGES, stream=True, **args)
    roles = [c.choices[0].index for c in chat if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]


@pytest.mark.parametrize(
    "route, kwargs, param",
    [
        ("completions", {"n": 17}, "n"),
        ("completions", {"n": 0}, "n"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"prompt": ["a"] * 33, "n": 2}, "n"),  # 66 sequences
        ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ],
)
def test_bounded_choices_and_logprobs(client, route, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kwargs)
        else:
            client.completions.create(**{"model": "tiny", "prompt": "hi", "max_tokens": 2, **kwargs})
    assert err.value.status_code == 400
    assert err.value.body["param"].split(".")[0] == param and param in err.value.body["message"]


def test_each_choice_counts_against_max_queue(runner, monkeypatch):
    """max_queue bounds waiting sequences: a request's choices are queued all or none."""
    gate = gated(runner, monkeypatch)
    engine = Engine(runner, max_batch_size=1, max_queue=2)
    with TestClient(create_app(engine, model_name="tiny")) as http:
        ids, done = runner.encode("hi"), []
        params = SamplingParams(max_new_tokens=2)
        engine.submit(ids, params, on_finish=done.append)  # takes the one slot (blocked)
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert engine.queue_depth <= 1  # nothing of the refused request stays queued
        engine.submit_all([Submission(ids, params, None, done.append)] * 2)  # exactly the room left
        with pytest.raises(QueueFull):
            engine.submit(ids, params, on_finish=done.append)
        gate.set()
    assert len(done) == 3 and all(c.finish_reason == "length" for c in done)
