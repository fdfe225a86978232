"""A bounded loopback load test: concurrent valid and malformed requests, none lost, the server stays up."""

from __future__ import annotations

import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from llmos_cli.core.serve.engine import Engine
from tests.test_server import KEY, runner, serve_in_thread  # noqa: F401 - runner is a fixture

AUTH = {"Authorization": f"Bearer {KEY}"}
N_REQUESTS, N_THREADS = 96, 8


@pytest.fixture(scope="module")
def url(runner):  # noqa: F811
    """uvicorn on 127.0.0.1 with a queue deep enough for every client thread."""
    with serve_in_thread(Engine(runner, max_batch_size=4, max_queue=4 * N_THREADS)) as base:
        yield base


def request_plan(seed: int = 0) -> list[dict[str, Any]]:
    """A shuffled mix: completions (single, batched, streamed), chat (plain, streamed) and malformed bodies."""
    rng = random.Random(seed)
    plan = []
    for i in range(N_REQUESTS):
        k, n_tokens = i % 8, rng.randint(1, 12)
        prompt = rng.choice(["the quick", "a tokenizer maps", "def fib(n):", "language models"])
        chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": n_tokens}
        done = {"model": "tiny", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0}
        if k == 0:
            plan.append({"path": "/v1/completions", "json": done, "choices": 1})
        elif k == 1:
            plan.append({"path": "/v1/completions", "json": {**done, "prompt": [prompt, "a"]}, "choices": 2})
        elif k == 2:
            body = {**done, "stream": True, "stream_options": {"include_usage": True}}
            plan.append({"path": "/v1/completions", "json": body, "stream": True})
        elif k == 3:
            plan.append({"path": "/v1/chat/completions", "json": {**chat, "seed": i}, "choices": 1})
        elif k == 4:
            body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            plan.append({"path": "/v1/chat/completions", "json": body, "stream": True})
        elif k == 5:
            plan.append({"path": "/v1/completions", "content": b'{"prompt": "x", ', "bad": 400})
        elif k == 6:
            plan.append({"path": "/v1/completions", "json": {**done, "max_tokens": -3}, "bad": 400})
        else:
            plan.append(
                {"path": "/v1/chat/completions", "json": {"model": "tiny", "messages": "hi"}, "bad": 400}
            )
    rng.shuffle(plan)
    return plan


def _tokens_ok(usage: dict[str, int], finishes: list[str], max_tokens: int, choices: int) -> bool:
    """Every choice ran to max_tokens, unless one stopped early at end-of-text."""
    if all(f == "length" for f in finishes):
        return usage["completion_tokens"] == max_tokens * choices
    return usage["completion_tokens"] <= max_tokens * choices and "stop" in finishes


def send(client: httpx.Client, base: str, item: dict[str, Any]) -> tuple[str, bool]:
    url = base + item["path"]
    if "content" in item:
        r = client.post(url, content=item["content"], headers={"Content-Type": "application/json"})
        return "bad", r.status_code == item["bad"] and "error" in r.json() and "Traceback" not in r.text
    if item.get("bad"):
        r = client.post(url, json=item["json"])
        return "bad", r.status_code == item["bad"] and "error" in r.json()
    max_tokens = item["json"]["max_tokens"]
    if item.get("stream"):
        with client.stream("POST", url, json=item["json"]) as r:
            lines = [line for line in r.iter_lines() if line]
        if r.status_code != 200 or lines[-1] != "data: [DONE]":
            return "valid", False
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        return "valid", len(finishes) == 1 and _tokens_ok(events[-1]["usage"], finishes, max_tokens, 1)
    r = client.post(url, json=item["json"])
    if r.status_code != 200:
        return "valid", False
    body = r.json()
    finishes = [c["finish_reason"] for c in body["choices"]]
    return "valid", len(body["choices"]) == item["choices"] and _tokens_ok(
        body["usage"], finishes, max_tokens, item["choices"]
    )


def test_concurrent_mixed_load(url):
    plan = request_plan()
    with httpx.Client(headers=AUTH, timeout=60) as client, ThreadPoolExecutor(N_THREADS) as pool:
        results = list(pool.map(lambda item: send(client, url, item), plan))
    assert len(results) == len(plan)  # none lost
    outcome = Counter(results)
    expected_bad = sum(1 for item in plan if "bad" in item)
    assert outcome == {("valid", True): len(plan) - expected_bad, ("bad", True): expected_bad}
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics
