"""One bad request never takes the server down: a failing sequence fails alone, a failing decode loop restarts,
the queue sheds load with 503 + Retry-After, and /health fails only when the model cannot run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from llmos_cli.core.serve import create_app
from llmos_cli.core.serve.engine import Engine, QueueFull
from llmos_cli.core.serve.runners import Completion, SamplingParams, SequenceError
from tests.conftest import wait_until
from tests.test_server import KEY, gated, runner, serve_in_thread  # noqa: F401 - runner is a fixture

PROMPTS = ["the quick", "def fib(n):", "a tokenizer maps"]
GREEDY = SamplingParams(max_new_tokens=12)


class ExplodingTokenizer:
    """A tokenizer whose decode fails: the output of the one sequence that uses it cannot be turned into text."""

    def __init__(self, real):
        self.real = real

    def decode(self, *args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")


def poison(runner, monkeypatch, prompt: str) -> None:  # noqa: F811
    """The sequence generated for `prompt` gets the exploding tokenizer; every other one the real tokenizer."""
    real, bad = runner.sequence, runner.encode(prompt)

    def sequence(prompt_ids, params, on_delta=None):
        seq = real(prompt_ids, params, on_delta)
        if list(prompt_ids) == bad:
            seq.tokenizer = ExplodingTokenizer(seq.tokenizer)
        return seq

    monkeypatch.setattr(runner, "sequence", sequence)


def test_one_failing_sequence_fails_alone(runner, monkeypatch):  # noqa: F811
    alone = {p: runner.generate([p], GREEDY)[0].text for p in PROMPTS}
    poison(runner, monkeypatch, PROMPTS[1])
    gate = gated(runner, monkeypatch)
    engine, results = Engine(runner, max_batch_size=4).start(), {}
    for p in PROMPTS:  # all wait at the gate, then decode in one batch
        engine.submit(runner.encode(p), GREEDY, on_finish=lambda r, p=p: results.__setitem__(p, r))
    gate.set()
    wait_until(
        lambda: len(results) == 3, alive=lambda: engine.healthy, what="requests did not finish", timeout=60
    )
    assert isinstance(results[PROMPTS[1]], SequenceError) and "injected" in str(results[PROMPTS[1]])
    assert {p: results[p].text for p in (PROMPTS[0], PROMPTS[2])} == {
        p: alone[p] for p in (PROMPTS[0], PROMPTS[2])
    }
    after: list[Completion] = []
    engine.submit(runner.encode(PROMPTS[0]), GREEDY, on_finish=after.append)
    engine.stop(timeout=60)
    assert (
        after[0].text == alone[PROMPTS[0]]
        and engine.stats.requests_failed == 1
        and engine.stats.restarts == 0
    )


def test_a_failing_sequence_over_http_is_a_500_and_the_next_request_succeeds(runner, monkeypatch):  # noqa: F811
    poison(runner, monkeypatch, "hi")
    with TestClient(create_app(Engine(runner), model_name="tiny")) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_error"
        streamed = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
        assert '"generation_error"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        ok = http.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        assert http.get("/health").json() == {"status": "ok"}


def test_a_prompt_the_model_fails_on_fails_alone(runner, monkeypatch):  # noqa: F811
    forward, bad = runner.model.forward, len(runner.encode("a tokenizer maps"))

    def fail_on_that_prompt(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == bad:
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", fail_on_that_prompt)
    with TestClient(create_app(Engine(runner), model_name="tiny")) as http:
        r = http.post("/v1/completions", json={"prompt": "a tokenizer maps", "max_tokens": 4})
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 200
        assert http.get("/health").json() == {"status": "ok"}


def test_a_failing_decode_loop_restarts(runner, monkeypatch):  # noqa: F811
    forward, steps = runner.model.forward, []

    def fail_one_step(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1 and kwargs.get("cache") is not None:
            steps.append(1)
            if len(steps) == 2:
                raise RuntimeError("CUDA error: an illegal memory access (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", fail_one_step)
    with TestClient(create_app(Engine(runner), model_name="tiny", retry_after_s=2)) as http:
        r = http.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 8})
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert r.json()["error"]["code"] == "engine_restarted" and "injected" in r.json()["error"]["message"]
        again = http.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 8})
        assert again.status_code == 200
        assert http.get("/health").json() == {"status": "ok"}
        assert "llmos_engine_restarts_total 1" in http.get("/metrics").text


def test_max_queue_counts_waiting_requests_only(runner, monkeypatch):  # noqa: F811
    """Issue 18: max_queue 1 with one slot took 1 of 6 concurrent requests; it takes the running one and one more."""
    gate = gated(runner, monkeypatch)
    engine, done, refused = Engine(runner, max_batch_size=1, max_queue=1).start(), [], 0
    for _ in range(6):
        try:
            engine.submit(runner.encode("hi"), SamplingParams(max_new_tokens=2), on_finish=done.append)
        except QueueFull:
            refused += 1
    assert refused == 4
    gate.set()
    engine.stop(timeout=60)
    assert [c.finish_reason for c in done] == ["length", "length"]


def test_overload_is_shed_with_503_and_retry_after(runner, monkeypatch):  # noqa: F811
    """16 clients against 4 slots and max_queue 4: 8 are served, 8 are shed at once, none fails, healthy after."""
    gate = gated(runner, monkeypatch)
    engine = Engine(runner, max_batch_size=4, max_queue=4)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 4}
    with serve_in_thread(engine) as url, httpx.Client(headers=auth, timeout=60) as client:
        shed = []

        def send(_: int) -> httpx.Response:
            r = client.post(url + "/v1/completions", json=body)
            if r.status_code == 503:
                shed.append(r)
            return r

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(send, i) for i in range(16)]
            wait_until(
                lambda: len(shed) == 8, alive=lambda: True, what=lambda: f"{len(shed)} shed", timeout=60
            )
            gate.set()
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200] * 8 + [503] * 8
        assert all(
            r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full" for r in shed
        )
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        metrics = httpx.get(url + "/metrics", headers=auth).text
        assert 'status="500"' not in metrics and "llmos_engine_restarts_total 0" in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_share_one_fate(runner, stream):  # noqa: F811
    """A request's prompts are seeded apart (issue 18) and, streamed, each gets its own index and finish."""
    with TestClient(create_app(Engine(runner), model_name="tiny")) as http:
        body = {
            "prompt": ["the quick", "the quick"],
            "max_tokens": 8,
            "temperature": 1,
            "seed": 3,
            "stream": stream,
        }
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200
        if stream:
            import json

            events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
            texts = ["", ""]
            for e in events:
                texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
            finishes = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
            assert sorted(finishes) == [0, 1]
        else:
            texts = [c["text"] for c in r.json()["choices"]]
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
        assert texts == [c.text for c in runner.generate(["the quick", "the quick"], params)]
        assert texts[0] != texts[1]
