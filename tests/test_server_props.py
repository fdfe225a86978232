"""Property-based requests generated from the server's own OpenAPI schema (schemathesis), sent to a tiny model
on loopback uvicorn: no 5xx, every response conforms to the schema, valid requests are served, invalid ones are
400, and the server is healthy afterwards. Bounded: a fixed number of examples per route (more in the slow run)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.batching import Engine
from llmos_cli.core.infer import Runner
from llmos_cli.core.server.schema import MAX_PROMPTS
from tests.test_server import KEY, serve_in_thread

AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 16  # a short context window keeps every generated request fast
# A request the schema allows may still be refused for what only its tokens tell: the prompt's length.
ALLOWED_400 = {"context_length_exceeded"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# (route, method, generation mode): what this server's schema lists. schemathesis' own pytest loader
# (from a fixture) does not run under this pytest, so each operation's strategy runs through hypothesis here.
OPERATIONS = [
    ("/v1/completions", "POST", "positive"),
    ("/v1/completions", "POST", "negative"),
    ("/v1/chat/completions", "POST", "positive"),
    ("/v1/chat/completions", "POST", "negative"),
    ("/v1/models", "GET", "positive"),
    ("/health", "GET", "positive"),
    ("/metrics", "GET", "positive"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    runner = Runner.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    runner.context_window = CONTEXT
    engine = Engine(runner, max_batch_size=4, max_queue=MAX_PROMPTS)  # room for one request's every prompt
    with serve_in_thread(engine, max_body_bytes=1 << 16) as url:
        yield url, engine


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_dict(httpx.get(served[0] + "/openapi.json", headers=AUTH).json())


def valid_requests_are_served(response, case) -> None:
    """A request the schema allows gets 200, unless it is over the context window."""
    if not case.meta.generation.mode.is_positive or response.status_code == 200:
        return
    code = (response.json().get("error") or {}).get("code") if response.status_code == 400 else None
    assert code in ALLOWED_400, f"a valid request got {response.status_code}: {response.text[:300]}"


def check_generated_requests(api_schema, url: str, examples: int) -> None:
    for path, method, mode in OPERATIONS:
        operation = api_schema[path][method]

        @settings(
            max_examples=examples if method == "POST" else 3,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        def send(case):
            response = case.call(base_url=url, headers=AUTH, timeout=30)
            case.validate_response(response, checks=CHECKS)
            valid_requests_are_served(response, case)

        send()


def assert_healthy(url: str, engine: Engine) -> None:
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert engine.stats.restarts == 0
    assert 'status="5' not in httpx.get(url + "/metrics", headers=AUTH).text


def test_the_schema_lists_the_served_routes(api_schema):
    listed = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert listed == {(p, m) for p, m, _ in OPERATIONS}


def test_generated_requests(api_schema, served):
    check_generated_requests(api_schema, served[0], examples=25)
    assert_healthy(*served)


@pytest.mark.slow
def test_many_generated_requests(api_schema, served):
    check_generated_requests(api_schema, served[0], examples=300)
    assert_healthy(*served)
