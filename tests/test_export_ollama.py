"""`--format ollama`: the GGUF plus a Modelfile whose Go TEMPLATE renders the tokenizer's chat template,
checked by rendering it with a small Go-template renderer written here."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from llmos_cli.core.export.chat_format import SAMPLE_CONVERSATIONS  # noqa: E402
from llmos_cli.errors import UserError  # noqa: E402
from llmos_cli.stages import export as export_stage  # noqa: E402
from tests.test_export_gguf_archs import save_tiny  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen-style: a default system prompt when the conversation has none, and BOS first
WITH_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}" + CHATML
)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template the Modelfile uses: text, {{ "literal" }}, {{ .Content }},
    {{ range .Messages }}, {{ if eq .Role "r" }} / {{ else if eq .Role "r" }} / {{ else }}, {{ end }}."""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)

    def block(i: int, scope: dict[str, str] | None) -> tuple[str, int, str]:
        out = []
        while i < len(tokens):
            tok = tokens[i]
            action = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", tok)
            if action is None:
                out.append(tok)
                i += 1
                continue
            act = action.group(1)
            if act == "end" or act.startswith("else"):
                return "".join(out), i, act
            if act.startswith('"'):
                out.append(act[1:-1])
                i += 1
            elif act == ".Content":
                out.append(scope["content"])
                i += 1
            elif act == "range .Messages":
                start = i + 1
                for m in messages:
                    text, i, _ = block(start, m)
                    out.append(text)
                if not messages:
                    _, i, _ = block(start, None)
                i += 1
            elif act.startswith("if "):
                chosen, cond = None, act[3:]
                while True:
                    taken = chosen is None and _holds(cond, scope)
                    text, i, stop = block(i + 1, scope)
                    if taken:
                        chosen = text
                    if stop == "end":
                        break
                    cond = stop[len("else if ") :] if stop.startswith("else if ") else "true"
                out.append(chosen or "")
                i += 1
            else:
                raise ValueError(f"unsupported action {act!r}")
        return "".join(out), i, ""

    return block(0, None)[0]


def _holds(cond: str, scope: dict[str, str] | None) -> bool:
    if cond == "true":
        return True
    role = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    assert role is not None, cond
    return scope is not None and scope["role"] == role.group(1)


def modelfile_parts(text: str) -> tuple[str, str | None, list[str], dict[str, str]]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    params = dict(re.findall(r"^PARAMETER (?!stop)(\w+) (.*)$", text, re.M))
    return template, system.group(1) if system else None, stops, params


@pytest.mark.parametrize("chat_template", [CHATML, WITH_SYSTEM], ids=["chatml", "default-system"])
def test_modelfile_template_renders_the_chat_template(chat_template, tmp_path):
    from transformers import AutoTokenizer

    model_dir = save_tiny(tmp_path / "m", "qwen2", chat_template=chat_template)
    summary = export_stage.run(str(model_dir), ["ollama"], tmp_path / "out", gguf_dtype="q8_0")
    (result,) = summary["exports"]
    assert result["ok"] and result["checks"]["chat_template"] and result["checks"]["eot_id"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["Modelfile", "m-q8_0.gguf", "verify.json"]
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./m-q8_0.gguf\n")
    template, system, stops, params = modelfile_parts(text)
    assert stops == ["<|im_end|>", "</s>"]
    assert params == {"temperature": "0", "num_ctx": "128"}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    for conversation in SAMPLE_CONVERSATIONS:
        messages = conversation
        if system is not None and conversation[0]["role"] != "system":  # what Ollama does with SYSTEM
            messages = [{"role": "system", "content": system}, *conversation]
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_go(template, messages) == expected
    assert (system is not None) == (chat_template is WITH_SYSTEM)


def test_ollama_refuses_a_model_without_a_chat_template(tmp_path):
    model_dir = save_tiny(tmp_path / "m", "qwen2")
    with pytest.raises(UserError, match="Ollama export needs a chat template"):
        export_stage.run(str(model_dir), ["ollama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_accepts_ollama_as_an_export_format():
    from llmos_cli.recipe import validate_recipe

    assert validate_recipe({"export": {"formats": ["gguf", "ollama"]}}, "r.yaml").export.formats == [
        "gguf",
        "ollama",
    ]
    with pytest.raises(UserError, match="export.formats"):
        validate_recipe({"export": {"formats": ["tflite"]}}, "r.yaml")


def test_a_template_that_wraps_by_position_is_refused_for_ollama_but_kept_in_gguf(tmp_path):
    # Llama-2 style: the system prompt is folded into the first user turn
    folded = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}"
        "<</SYS>> {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}<|im_end|>{% endif %}"
        "{% endfor %}"
    )
    model_dir = save_tiny(tmp_path / "m", "qwen2", chat_template=folded)
    with pytest.raises(UserError, match="cannot be written as fixed text around each message"):
        export_stage.run(str(model_dir), ["ollama"], tmp_path / "out")
    (result,) = export_stage.run(str(model_dir), ["gguf"], tmp_path / "gguf")["exports"]
    assert result["ok"] and result["checks"]["chat_template"]  # embedded as Jinja all the same
