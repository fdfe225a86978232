"""Token log-probs in the OpenAI API's two shapes: /v1/completions' parallel lists and /v1/chat/completions'
per-token objects. The numbers are the model's raw log-softmax (see `runners.TokenLogprob`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llmos_cli.core.serve.runners import TokenLogprob

Decode = Callable[[int], tuple[str, bytes]]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character each byte is spelled with, back to the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    spelled = {b: chr(b) for b in keep}
    spelled.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in spelled)})
    return {ch: b for b, ch in spelled.items()}


BYTE_LEVEL = _byte_level_alphabet()


def token_decoder(tokenizer: Any) -> Decode:
    """A token id's text and raw bytes, cached per id. A token that holds part of a multi-byte character
    (byte-level BPE, or SentencePiece's <0xNN> byte tokens) is spelled `bytes:\\xNN...`, as OpenAI does."""
    cache: dict[int, tuple[str, bytes]] = {}

    def decode(token_id: int) -> tuple[str, bytes]:
        if token_id not in cache:
            text = tokenizer.decode([token_id])
            if "\ufffd" not in text:
                cache[token_id] = (text, text.encode())
            else:
                piece = tokenizer.convert_ids_to_tokens(token_id)
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    raw = bytes([int(piece[3:5], 16)])
                elif all(ch in BYTE_LEVEL for ch in piece):
                    raw = bytes(BYTE_LEVEL[ch] for ch in piece)
                else:
                    raw = text.encode()
                cache[token_id] = ("bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw)
        return cache[token_id]

    return decode


def completion_logprobs(
    entries: Sequence[TokenLogprob], decode: Decode, text_len: int | None = None
) -> dict[str, Any]:
    """`choice.logprobs` of a completion: each token's text, log-prob, its alternatives (with the sampled
    token among them, so up to logprobs + 1, as OpenAI documents) and where it starts in the text (at most
    `text_len`: a stop sequence's tokens start at its end)."""
    top = []
    for e in entries:
        alternatives = {decode(t)[0]: lp for t, lp in e.top}
        alternatives.setdefault(decode(e.token_id)[0], e.logprob)
        top.append(alternatives)
    return {
        "tokens": [decode(e.token_id)[0] for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": [e.offset if text_len is None else min(e.offset, text_len) for e in entries],
    }


def chat_logprobs(entries: Sequence[TokenLogprob], decode: Decode) -> dict[str, Any]:
    """`choice.logprobs` of a chat completion: {content: [{token, logprob, bytes, top_logprobs}]}."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
        ]
    }
