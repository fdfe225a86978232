"""An Ollama Modelfile for a GGUF export: FROM, a Go TEMPLATE that renders the tokenizer's chat template
(as a ChatFormat), the default SYSTEM prompt, a `PARAMETER stop` per stop token and the generation
defaults of the model's generation_config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmos_cli.core.export.chat_format import ChatFormat
from llmos_cli.errors import UserError


def _literal(text: str) -> str:
    """Text as it stands in a Go template: a `{{` would open an action, so it is written as one."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(chat: ChatFormat) -> str:
    """The Go template Ollama renders over .Messages (role, content) to the same prompt as `chat`."""
    branches = " else if ".join(
        f'eq .Role "{role}" }}}}{_literal(chat.before[role])}{{{{ .Content }}}}{_literal(chat.after[role])}{{{{'
        for role in ("system", "user", "assistant")
    )
    return (
        f"{_literal(chat.prefix)}{{{{ range .Messages }}}}{{{{ if {branches} end }}}}{{{{ end }}}}"
        f"{_literal(chat.generation_prompt)}"
    )


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'Ollama export: the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def generation_defaults(model_dir: Path, context_length: int | None) -> dict[str, Any]:
    """Ollama PARAMETERs from the model's generation_config.json (sampling) and its context length."""
    params: dict[str, Any] = {}
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("do_sample"):
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if config.get(key) is not None:
                params[name] = config[key]
    else:
        params["temperature"] = 0  # the model's default decoding is greedy
    if config.get("repetition_penalty") not in (None, 1.0):
        params["repeat_penalty"] = config["repetition_penalty"]
    if context_length:
        params["num_ctx"] = int(context_length)
    return params


def modelfile(gguf_name: str, chat: ChatFormat, stops: list[str], params: dict[str, Any]) -> str:
    """The Modelfile text: `ollama create NAME -f Modelfile` in the export folder."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(chat), 'chat template')}"]
    if chat.default_system is not None:
        lines.append(f"SYSTEM {_quoted(chat.default_system, 'default system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in params.items()]
    return "\n".join(lines) + "\n"
