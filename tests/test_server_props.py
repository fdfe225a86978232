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
from llmos_cli.core.serve.engine import Engine
from llmos_cli.core.serve.protocol import MAX_PROMPTS
from llmos_cli.core.serve.runners import Runner
from tests.test_server import KEY, serve_in_thread

AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 16  # a short context window keeps every generated request fast
# A request the schema allows may still be refused for what only its tokens tell (the prompt's length), or for a
# rule across fields the schema cannot state (prompts x n; top_logprobs without logprobs).
ALLOWED_400 = {"context_length_exceeded", "too_many_choices", "logprobs_required"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# (route, method, generation mode): what each server's schema lists. schemathesis' own pytest loader
# (from a fixture) does not run under this pytest, so each operation's strategy runs through hypothesis here.
COMMON = [("/v1/models", "GET", "positive"), ("/health", "GET", "positive"), ("/metrics", "GET", "positive")]
OPERATIONS = [
    ("/v1/completions", "POST", "positive"),
    ("/v1/completions", "POST", "negative"),
    ("/v1/chat/completions", "POST", "positive"),
    ("/v1/chat/completions", "POST", "negative"),
    *COMMON,
]
CLASSIFIER_OPERATIONS = [("/v1/classify", "POST", "positive"), ("/v1/classify", "POST", "negative"), *COMMON]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    runner = Runner.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    runner.context_window = CONTEXT
    engine = Engine(runner, max_batch_size=4, max_queue=MAX_PROMPTS)  # room for one request's every prompt
    with serve_in_thread(engine, max_body_bytes=1 << 16) as url:
        yield url, engine


@pytest.fixture(scope="module")
def api_schema(served):
    return schema_of(served[0])


def schema_of(url: str):
    return schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", headers=AUTH).json())


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT sequence classifier (minilm's tokenizer) on loopback uvicorn; yields its URL."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llmos_cli.core.serve.runners import EncoderRunner
    from tests.test_server import minilm_dir

    path = tmp_path_factory.mktemp("clf")
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    with serve_in_thread(EncoderRunner.load(path), max_body_bytes=1 << 16) as url:
        yield url


def valid_requests_are_served(response, case) -> None:
    """A request the schema allows gets 200, unless it is over the context window."""
    if not case.meta.generation.mode.is_positive or response.status_code == 200:
        return
    code = (response.json().get("error") or {}).get("code") if response.status_code == 400 else None
    assert code in ALLOWED_400, f"a valid request got {response.status_code}: {response.text[:300]}"


def check_generated_requests(api_schema, url: str, examples: int, operations=OPERATIONS) -> None:
    for path, method, mode in operations:
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
            if response.status_code == 413:  # over serve.limits.max_body_bytes: refused before validation
                assert response.json()["error"]["code"] == "request_too_large"
                return
            case.validate_response(response, checks=CHECKS)
            valid_requests_are_served(response, case)

        send()


def assert_healthy(url: str, engine: Engine | None = None) -> None:
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert engine is None or engine.stats.restarts == 0
    assert 'status="5' not in httpx.get(url + "/metrics", headers=AUTH).text


def listed(schema) -> set[tuple[str, str]]:
    return {(op.ok().path, op.ok().method.upper()) for op in schema.get_all_operations()}


def test_the_schema_lists_the_served_routes(api_schema, classifier):
    assert listed(api_schema) == {(p, m) for p, m, _ in OPERATIONS}
    assert listed(schema_of(classifier)) == {(p, m) for p, m, _ in CLASSIFIER_OPERATIONS}


def test_generated_classify_requests(classifier):
    check_generated_requests(schema_of(classifier), classifier, examples=25, operations=CLASSIFIER_OPERATIONS)
    assert_healthy(classifier)


def test_generated_requests(api_schema, served):
    check_generated_requests(api_schema, served[0], examples=25)
    assert_healthy(*served)


@pytest.mark.slow
def test_many_generated_requests(api_schema, served, classifier):
    check_generated_requests(api_schema, served[0], examples=300)
    assert_healthy(*served)
    check_generated_requests(
        schema_of(classifier), classifier, examples=300, operations=CLASSIFIER_OPERATIONS
    )
    assert_healthy(classifier)
