"""The API's error type, its request bodies (bounded as the OpenAI API documents them) and its responses.

What a body model accepts is exactly what the server validates; `pin_openapi` adds what only a running server
knows (the model's name, its context window) to the OpenAPI schema, so the schema states the same bounds.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from llmos_cli.core.serve.runners import LOGIT_BIAS_RANGE, PENALTY_RANGE, REPETITION_PENALTY_RANGE

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_INPUTS = 2048  # texts in one /v1/embeddings or /v1/classify request (OpenAI's limit)
MAX_STOP = 4  # stop sequences (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries in logit_bias
MAX_N = 16  # choices per prompt
MAX_SEQUENCES = MAX_PROMPTS  # prompts x n in one request: each choice is a sequence of its own
MAX_LOGPROBS = 5  # /v1/completions' logprobs (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' top_logprobs (OpenAI's limit)
SEED_RANGE = (-(1 << 53) + 1, (1 << 53) - 1)  # integers every JSON parser reads exactly


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_bytes(status: int, message: str, type: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


# ---- requests


def _integral(value: Any) -> Any:
    """JSON Schema counts 4.0 as an integer: so does the server."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integer(**bounds: int) -> Any:
    """An integer type with `bounds` (ge, le) that also takes integral floats."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenCount = _integer(ge=1)
Seed = _integer(ge=SEED_RANGE[0], le=SEED_RANGE[1])
TopK = _integer(ge=0, le=1 << 20)


class Body(BaseModel):
    """A request body: strict types (what the schema says is all that is accepted: no "1.5" for a number, no 0
    for a boolean); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(Body):
    type: Literal["text"]
    text: str


class StreamOptions(Body):
    include_usage: bool = False


TokenId = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,8})$")]
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]


class SamplingBody(Body):
    model: str | None = None
    max_tokens: TokenCount | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: TopK = Field(default=0, description="0 disables the filter")
    repetition_penalty: float = Field(
        default=1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    frequency_penalty: float = Field(default=0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float = Field(default=0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    logit_bias: dict[TokenId, Annotated[float, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]] = (
        Field(
            default_factory=dict,
            max_length=MAX_LOGIT_BIAS,
            description="token id (in the model's vocabulary) -> bias added to its logit",
            json_schema_extra={"additionalProperties": False},
        )
    )
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: _integer(ge=1, le=MAX_N) = Field(default=1, description="choices per prompt, each sampled on its own")

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(t), b) for t, b in self.logit_bias.items())


class CompletionBody(SamplingBody):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: _integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        default=None, description="each token's log-prob and this many most likely alternatives"
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def logprob_count(self) -> int | None:
        return self.logprobs


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]

    def text(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: _integer(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        default=None, description="alternatives per token; needs logprobs: true"
    )

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EncodeBody(Body):
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


# ---- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    usage: EmbeddingUsage
    data: list[Embedding]


class Classification(BaseModel):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "error"]
    detail: str | None = None


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry documenting a route's error statuses with the error body."""
    return {status: {"model": ErrorBody} for status in statuses}


SSE = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or server-sent events with stream: true",
    }
}


def pin_openapi(
    openapi: dict[str, Any], model_name: str, context_window: int | None, vocab_size: int | None
) -> dict[str, Any]:
    """State what the served model decides: its name (the only `model` accepted), its context window
    (max_tokens' bound) and its vocabulary (the token ids logit_bias may name)."""
    for schema in openapi.get("components", {}).get("schemas", {}).values():
        props = schema.get("properties", {})
        if "model" in props and "anyOf" in props["model"]:
            props["model"] = {"anyOf": [{"enum": [model_name]}, {"type": "null"}], "title": "Model"}
        for name in ("max_tokens", "max_completion_tokens"):
            if context_window is not None and name in props:
                props[name]["anyOf"][0]["maximum"] = context_window - 1
        if vocab_size is not None and "logit_bias" in props:
            bias = props["logit_bias"]
            bias["patternProperties"] = {below(vocab_size): next(iter(bias["patternProperties"].values()))}
    return openapi


def below(n: int) -> str:
    """A regular expression matching the decimal numbers 0 .. n-1 (no leading zeros), n >= 1."""
    top = str(n - 1)
    alts = ["0"]
    for length in range(1, len(top)):  # every number with fewer digits than n-1
        alts.append("[1-9]" + "[0-9]" * (length - 1))
    for i, digit in enumerate(top):  # numbers of n-1's length: a prefix of it, then a smaller digit
        low = "1" if i == 0 else "0"
        if int(digit) > int(low):
            alts.append(top[:i] + f"[{low}-{int(digit) - 1}]" + "[0-9]" * (len(top) - i - 1))
    if top != "0":
        alts.append(top)
    return "^(" + "|".join(alts) + ")$"
