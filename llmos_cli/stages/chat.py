"""`llmos chat`: an interactive terminal chat through the model's chat template."""

from __future__ import annotations

import sys

from llmos_cli.core.infer import Runner, SamplingParams
from llmos_cli.errors import UserError

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def run(
    model: str, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7
) -> None:
    """Read a user turn, stream the assistant's reply, repeat."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    try:
        params.check()
    except ValueError as err:
        raise UserError(f"--{str(err).replace('_', '-')}") from err
    runner = Runner.load(model)
    if not getattr(runner.tokenizer, "chat_template", None):
        raise UserError(
            f"{model}: the tokenizer has no chat template", hint="use `llmos generate` for plain text"
        )
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
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
        ids = fit_context(runner, messages, max_new_tokens)
        reply = []
        try:
            for piece in runner.stream(ids, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep the conversation
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def fit_context(runner: Runner, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
    """The prompt ids, dropping the oldest turns (keeping a system prompt) until the reply fits the context."""
    window = runner.context_window
    while True:
        ids = runner.encode_chat(messages)
        if window is None or len(ids) + max_new_tokens <= window:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise UserError(
                f"the message is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it does "
                f"not fit the model's context window of {window}"
            )
        del messages[first]
