"""The preference format: {prompt, chosen, rejected} or chat {messages, chosen, rejected} -> token pairs.

Each pair becomes two causal-LM rows sharing one prompt: `input_ids`/`labels` (the chosen response)
and `rejected_input_ids`/`rejected_labels`. Only response tokens carry loss, through the EOS (or the
chat template's end of turn) that closes them. A pair longer than data.max_seq_len loses prompt
tokens from the left first (the responses are what is compared); only when the responses alone do
not fit are they cut too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llmos_cli.core.data import IGNORE_INDEX
from llmos_cli.core.data.formats import (
    ROLES,
    TRUNCATED,
    Encoded,
    _bos,
    _ids,
    instruction_prompt,
    messages_of,
    set_chat_template,
)
from llmos_cli.core.data.read import Row, field_text
from llmos_cli.core.data.report import length_summary
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection

PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


def preference_encoder(tokenizer: Any, d: DataSection) -> Callable[[Row], Encoded]:
    """Rows with `data.messages_field` are chat rows (rendered with the chat template); others are
    prompt rows (the prompt as written, or filled into `data.template` when one is set)."""
    bos, eos = _bos(tokenizer), tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which preference data needs to end responses")
    chat_ready = False

    def texts(row: Row) -> tuple[list[int], str, str] | str:
        """The prompt's ids and the two responses' texts (chat: rendered), or why the row is dropped."""
        nonlocal chat_ready
        chosen, rejected = _response(row, d.chosen_field), _response(row, d.rejected_field)
        if chosen == rejected:
            return "identical_responses"
        if d.messages_field not in row.data:
            prompt = instruction_prompt(row, d) if d.template else field_text(row, d.prompt_field)
            if not (isinstance(chosen, str) and isinstance(rejected, str)):
                raise UserError(f"{row.source}:{row.line}: prompt rows need text responses")
            return bos + _ids(tokenizer, prompt), chosen, rejected
        if not chat_ready:  # the template the tokenizer saved with the data and the model will use
            set_chat_template(tokenizer, d.chat_template)
            chat_ready = True
        msgs = messages_of(row, d.messages_field)
        prompt = _render(tokenizer, msgs, None, row)
        return (
            _ids(tokenizer, prompt),
            _render(tokenizer, msgs, _as_turns(chosen), row)[len(prompt) :],
            _render(tokenizer, msgs, _as_turns(rejected), row)[len(prompt) :],
        )

    def response_ids(text: str, chat: bool) -> list[int]:
        ids = _ids(tokenizer, text)
        return ids if chat else [*ids, eos]

    def encode(row: Row) -> Encoded:
        found = texts(row)
        if isinstance(found, str):
            return found
        prompt, chosen_text, rejected_text = found
        chat = d.messages_field in row.data
        if not chosen_text.strip() or not rejected_text.strip():
            return "empty_response"
        prompt, chosen, rejected, cut = fit_pair(
            prompt,
            response_ids(chosen_text, chat),
            response_ids(rejected_text, chat),
            d.max_seq_len,
            len(bos),
        )
        if chosen == rejected:
            return "identical_after_truncation"
        hidden = [IGNORE_INDEX] * len(prompt)
        return {
            "input_ids": prompt + chosen,
            "labels": hidden + chosen,
            "rejected_input_ids": prompt + rejected,
            "rejected_labels": hidden + rejected,
            TRUNCATED: cut,
        }

    return encode


def fit_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_len: int, keep_head: int = 0
) -> tuple[list[int], list[int], list[int], bool]:
    """Cut a pair to `max_len` tokens per side: the prompt from the left (its first `keep_head`
    tokens, a BOS, stay), down to half the budget; then the responses from the right."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False
    keep = max(max_len - longest, min(len(prompt), max_len // 2), keep_head + 1)
    if keep < len(prompt):
        prompt = prompt[:keep_head] + prompt[len(prompt) - (keep - keep_head) :]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def preference_lengths(columns: dict[str, list]) -> dict[str, Any]:
    """What the data report says about one split's pairs: how many, and their lengths in tokens."""
    labels = columns.get("labels", [])
    prompt = np.array([sum(t == IGNORE_INDEX for t in x) for x in labels])
    chosen = np.array([len(x) for x in labels]) - prompt if labels else np.array([])
    rejected = np.array([len(x) for x in columns["rejected_labels"]]) - prompt if labels else np.array([])
    return {
        "pairs": len(labels),
        "prompt_tokens": length_summary(prompt),
        "chosen_tokens": length_summary(chosen),
        "rejected_tokens": length_summary(rejected),
    }


def _response(row: Row, field: str) -> str | list[dict[str, str]]:
    """A response: text, or (chat rows) a list of messages continuing the conversation."""
    value = row.data.get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and _is_messages(value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    present = ", ".join(map(str, row.data)) or "none"
    raise UserError(
        f"{row.source}:{row.line}: field '{field}' should be a response (text, or a list of messages), "
        f"got {value!r}",
        hint=f"fields present: {present}; set data.chosen_field / data.rejected_field",
    )


def _is_messages(value: list[Any]) -> bool:
    return all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    )


def _as_turns(response: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def _render(tokenizer: Any, msgs: list[dict[str, str]], turns: list[dict[str, str]] | None, row: Row) -> str:
    """The conversation up to the generation prompt (`turns` None), or through the response `turns`;
    the first must be a prefix of the second, or the response cannot be told from the prompt."""
    try:
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if turns is None:
            return prompt
        full = tokenizer.apply_chat_template([*msgs, *turns], tokenize=False, add_generation_prompt=False)
    except Exception as err:  # jinja raises many types for a template/data mismatch
        raise UserError(
            f"{row.source}:{row.line}: the chat template failed on this conversation: {err}"
        ) from None
    if not full.startswith(prompt):
        raise UserError(
            "data.chat_template: the conversation with its response does not start with the conversation "
            "and a generation prompt, so the response cannot be located; use a template that renders turns in order"
        )
    return full
