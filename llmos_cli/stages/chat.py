"""`llmos chat`: an interactive terminal chat through the model's chat template."""

from __future__ import annotations

import sys
from dataclasses import replace

from llmos_cli.core.models import describe_model
from llmos_cli.core.serve.runners import Runner, SamplingParams, open_runner
from llmos_cli.errors import UserError

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"
DEFAULT_MAX_NEW_TOKENS = 256
MIN_REPLY_TOKENS = 16  # a default-length reply shrinks to the room left in the context, down to this


def run(
    model: str,
    *,
    system: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.7,
    device: str = "auto",
) -> None:
    """Read a user turn, stream the assistant's reply, repeat. Without `max_new_tokens`, replies get up to
    256 tokens, or the room the model's context leaves after the conversation (said once)."""
    explicit = max_new_tokens is not None
    max_new_tokens = max_new_tokens if explicit else DEFAULT_MAX_NEW_TOKENS
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    try:
        params.check()
    except ValueError as err:
        raise UserError(f"--{str(err).replace('_', '-')}") from err
    info = describe_model(model)
    if info.kind != "causal":
        raise UserError(
            f"{model}: chat needs a causal LM with a chat template; {info.path} is a {info.kind} model",
            hint="use `llmos generate` for seq2seq models",
        )
    runner = open_runner(info, device=device)
    if not getattr(runner.tokenizer, "chat_template", None):
        raise UserError(
            f"{model}: the tokenizer has no chat template", hint="use `llmos generate` for plain text"
        )
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    told = False
    print(HELP, file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            messages = list(start)
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        ids, budget = fit_context(runner, messages, max_new_tokens, shrink=not explicit)
        if budget < max_new_tokens and not told:
            print(
                f"chat: replies are capped at the room the {runner.context_window}-token context leaves "
                f"({budget} tokens now); --max-new-tokens N sets a fixed length",
                file=sys.stderr,
            )
            told = True
        reply = []
        try:
            for piece in runner.stream(ids, replace(params, max_new_tokens=budget)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep the conversation
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def fit_context(
    runner: Runner, messages: list[dict[str, str]], max_new_tokens: int, *, shrink: bool = False
) -> tuple[list[int], int]:
    """The prompt ids and the reply's token budget, dropping the oldest turns (keeping a system prompt)
    until the reply fits the context; with `shrink`, the budget may fall to the room left instead."""
    window = runner.context_window
    while True:
        ids = runner.encode_chat(messages)
        room = max_new_tokens if window is None else window - len(ids)
        if room >= max_new_tokens:
            return ids, max_new_tokens
        if shrink and room >= min(MIN_REPLY_TOKENS, max_new_tokens):
            return ids, room
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise UserError(
                f"the message is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it does "
                f"not fit the model's context window of {window}"
            )
        del messages[first]
