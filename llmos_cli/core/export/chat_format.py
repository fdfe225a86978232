"""A tokenizer's chat template read back as fixed text around each message, the form a runtime without
Jinja (Ollama's Go templates) can express, and the end-of-turn tokens it implies.

The wrappers are found by rendering the template over marker messages; the result is used only when it
renders the sample conversations exactly as `apply_chat_template` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos_cli.errors import UserError

ROLES = ("system", "user", "assistant")
_MARK = {"system": "LLMOSSYSTEMMARK", "user": "LLMOSUSERMARK", "assistant": "LLMOSASSISTANTMARK"}

SAMPLE_CONVERSATIONS: tuple[list[dict[str, str]], ...] = (
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
)


@dataclass(frozen=True)
class ChatFormat:
    """prefix, then each message as before[role] + content + after[role], then the generation prompt."""

    prefix: str
    before: dict[str, str]
    after: dict[str, str]
    generation_prompt: str
    default_system: str | None  # the system prompt the template adds when a conversation has none

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return self.prefix + body + (self.generation_prompt if add_generation_prompt else "")

    def stop_tokens(self, tokenizer: Any) -> list[str]:
        """The special tokens that end an assistant turn, then the EOS token: where generation stops."""
        specials = [t for t in tokenizer.all_special_tokens if t and t in self.after["assistant"]]
        specials.sort(key=self.after["assistant"].index)
        eos = tokenizer.eos_token
        return list(dict.fromkeys([*specials, *([eos] if eos else [])]))

    def end_of_turn_id(self, tokenizer: Any) -> int | None:
        """The id of the first special token closing an assistant turn, when it is not EOS itself."""
        stops = self.stop_tokens(tokenizer)
        if not stops or stops[0] == tokenizer.eos_token:
            return None
        return tokenizer.convert_tokens_to_ids(stops[0])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str | None, end: str | None) -> str:
    i = 0 if start is None else text.index(start) + len(start)
    j = len(text) if end is None else text.index(end, i)
    return text[i:j]


def _derive(tokenizer: Any) -> ChatFormat:
    u, a, s = (_MARK[r] for r in ("user", "assistant", "system"))
    one = _render(tokenizer, [{"role": "user", "content": u}])
    two = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    three = _render(
        tokenizer,
        [
            {"role": "user", "content": u},
            {"role": "assistant", "content": a},
            {"role": "user", "content": u + "2"},
        ],
    )
    with_gen = _render(tokenizer, [{"role": "user", "content": u}], generation=True)
    with_system = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}])

    after_a = _between(two, a, None)
    user_before = _between(three, a + after_a, u + "2")
    user_after = _between(three, u + "2", None)
    lead = _between(one, None, u).removesuffix(user_before)
    if not (one.startswith(lead) and two.startswith(one) and with_gen.startswith(one)):
        raise ValueError("the template does not build a conversation by appending messages")
    sys_lead = _between(with_system, None, s)
    bos = tokenizer.bos_token or ""
    prefix = bos if bos and sys_lead.startswith(bos) else ""
    system_before = sys_lead[len(prefix) :]
    system_after = _between(with_system, s, u).removesuffix(user_before)
    default_system = None
    if lead != prefix:  # the template adds a system prompt of its own when there is none
        if not (lead.startswith(prefix + system_before) and lead.endswith(system_after)):
            raise ValueError("text before the first message depends on the conversation")
        default_system = lead[len(prefix + system_before) : len(lead) - len(system_after)]
    return ChatFormat(
        prefix=prefix,
        before={"system": system_before, "user": user_before, "assistant": _between(two, u + user_after, a)},
        after={"system": system_after, "user": user_after, "assistant": after_a},
        generation_prompt=with_gen[len(one) :],
        default_system=default_system,
    )


def chat_format(tokenizer: Any, strict: bool = True) -> ChatFormat | None:
    """The tokenizer's chat template as a ChatFormat; None without a template. A template that does
    something per message that fixed wrappers cannot express is a UserError (None unless `strict`)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        fmt = _derive(tokenizer)
        ok = all(
            fmt.render(c, g) == _render(tokenizer, c, g) for c in SAMPLE_CONVERSATIONS for g in (True, False)
        )
    except Exception as err:  # a template that raises on the marker conversations
        if not strict:
            return None
        raise UserError(
            f"the chat template cannot be written as fixed text around each message: {err}"
        ) from None
    if not ok and not strict:
        return None
    if not ok:
        raise UserError(
            "the chat template cannot be written as fixed text around each message "
            "(it changes a message's wrapping by its position or content)",
            hint="export as --format gguf (which embeds the Jinja template) and write the Modelfile by hand",
        )
    return fmt
