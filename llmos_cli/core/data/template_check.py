"""One example through the training path and the serving path, compared (`llmos data check`).

Training path: the row encoded exactly as `prepare_task_dataset` encodes it (the same encoder functions),
giving input_ids and labels. Serving path, per format:

- chat: the prompt `llmos serve` / `llmos chat` builds for the conversation up to its last assistant turn
  (`Runner.encode_chat`: the chat template with a generation prompt; the template is the one fine-tuning
  saves into final/, i.e. data.chat_template, else the tokenizer's, else the default).
- instruction: the prompt `llmos generate --prompt` and `/v1/completions` encode (`Runner.encode`), given
  the instruction template already filled in; serving does not apply data.template itself, so clients
  must send the rendered prompt.

The serving prompt must be a token-for-token prefix of the training sequence, and the reply that follows it
must end with a token the server stops on (the model's EOS) that carries loss; otherwise a trained model
sees prompts it never saw in training, or never learns to stop. text and pairs data have no serving prompt:
only their EOS is checked; classification has neither.
"""

from __future__ import annotations

import difflib
from itertools import islice
from pathlib import Path
from typing import Any

from llmos_cli.core.data import formats
from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.pack import Packer
from llmos_cli.core.data.prepare import tokenizer_source
from llmos_cli.core.data.read import Row, field_text, list_files, read_rows
from llmos_cli.core.models import load_tokenizer, resolve_model_dir
from llmos_cli.core.train.batches import IGNORE_INDEX
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection, Recipe

CONTEXT_TOKENS = 6  # tokens shown either side of a mismatch


def check_example(recipe: Recipe, index: int = 0) -> tuple[dict[str, Any], Any]:
    """Check example `index` of data.train; a mismatch is a finding (ok False), not an error.
    Returns the finding and the tokenizer it was checked with."""
    d = recipe.data  # the schema has checked that the format fits the task
    tokenizer = _load_tokenizer(recipe)
    row = _example(recipe, index)
    example = {"index": index, "source": row.source, "line": row.line}
    base = {"format": d.format, "example": example}
    if d.format == "classification":
        result = {
            **base,
            "ok": True,
            "checked": [],
            "not_checked": "classification predicts a label: there is no generated text, template or EOS",
            "training": None,
            "serving": None,
            "mismatch": None,
            "eos_carries_loss": None,
            "loss_tokens": 0,
            "problems": [],
        }
        return result, tokenizer
    if d.format == "chat":
        formats.set_chat_template(tokenizer, d.chat_template)  # what finetune trains with and saves to final/
    stops = stop_ids(recipe, tokenizer)
    if d.format == "chat":
        result = {**base, **_check_chat(tokenizer, row, recipe, stops)}
    elif d.format == "instruction":
        result = {**base, **_check_instruction(tokenizer, row, recipe, stops)}
    else:
        result = {**base, **_check_eos_only(tokenizer, row, recipe, stops)}
    return result, tokenizer


# ---------------------------------------------------------------- inputs


def _load_tokenizer(recipe: Recipe) -> Any:
    """The tokenizer `llmos data`/`finetune` would use: model.tokenizer, model.name_or_path, or data's trained one."""
    src = tokenizer_source(recipe)
    if src is None:
        trained = recipe.data_output / "tokenizer"
        if not trained.is_dir():
            raise UserError(
                "data check: no tokenizer to check with",
                hint="set model.name_or_path (or model.tokenizer), or run `llmos data RECIPE` to train one",
            )
        src = trained
    return load_tokenizer(src, trust_remote_code=recipe.model.trust_remote_code)


def _example(recipe: Recipe, index: int) -> Row:
    d = recipe.data
    if not d.train:
        raise UserError(f"{recipe.source}: data.train: no training data given")
    if index < 0:
        raise UserError(f"--index must be >= 0, got {index}")
    rows = read_rows(list_files(d.train, d.include), d.text_unit, decoding=Decoding(d.encoding))
    row = next(islice(rows, index, None), None)
    if row is None:
        raise UserError(f"--index {index}: data.train ({d.train}) has fewer than {index + 1} rows")
    return row


def stop_ids(recipe: Recipe, tokenizer: Any) -> list[int]:
    """The token ids generation stops on, as `Runner` picks them (`stop_token_ids`), from config files only."""
    from transformers import AutoConfig, GenerationConfig

    from llmos_cli.core.serve.runners import stop_token_ids

    eos: Any = None
    model_dir = _model_dir(recipe.model.name_or_path)
    if model_dir is not None:
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:  # no generation_config.json: loading derives it from config.json
            eos = AutoConfig.from_pretrained(str(model_dir)).get_text_config().eos_token_id
    return sorted(stop_token_ids(eos, tokenizer))


def _model_dir(path: str | None) -> Path | None:
    """The model directory whose generation config serving will use (a fine-tune keeps its base's), if local."""
    if not path:
        return None
    try:
        model_dir = resolve_model_dir(path)
    except UserError:  # a hub id: generation stops on the tokenizer's EOS as far as we can tell offline
        return None
    return model_dir if (model_dir / "config.json").exists() else None


def _serving_runner(tokenizer: Any) -> Any:
    """A Runner holding only the tokenizer: its `encode`/`encode_chat` are what serve, chat and generate call."""
    from llmos_cli.core.serve.runners import Runner

    runner = Runner.__new__(Runner)
    runner.tokenizer = tokenizer
    return runner


# ---------------------------------------------------------------- per format


def _check_chat(tokenizer: Any, row: Row, recipe: Recipe, stops: list[int]) -> dict[str, Any]:
    d = recipe.data
    msgs = formats.messages_of(row, d.messages_field)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return _finding("this conversation has no assistant turn, so it trains nothing (it is dropped)")
    prompt_text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    serving_ids = _serving_runner(tokenizer).encode_chat(msgs[:last])
    serving = {"text": prompt_text, "tokens": len(serving_ids), "stop_tokens": _pieces(tokenizer, stops)}
    if not full_text.startswith(prompt_text):
        at = _common_prefix(prompt_text, full_text)
        return _finding(
            f"the generation prompt differs from how training renders the assistant turn, at character {at}",
            training={"text": full_text},
            serving=serving,
            mismatch={"position": at, "unit": "character", "diff": _text_diff(full_text, prompt_text, at)},
        )
    encoded = formats.chat_encoder(tokenizer, d)(row)
    if isinstance(encoded, str):
        return _finding(f"training drops this example ({encoded})", serving=serving)
    return _compare(tokenizer, encoded, serving_ids, serving, stops, d)


def _check_instruction(tokenizer: Any, row: Row, recipe: Recipe, stops: list[int]) -> dict[str, Any]:
    d = recipe.data
    prompt_text = formats.instruction_prompt(row, d)
    serving_ids = _serving_runner(tokenizer).encode(prompt_text)
    serving = {"text": prompt_text, "tokens": len(serving_ids), "stop_tokens": _pieces(tokenizer, stops)}
    encoded = formats.instruction_encoder(tokenizer, d)(row)
    if isinstance(encoded, str):
        return _finding(f"training drops this example ({encoded})", serving=serving)
    return _compare(tokenizer, encoded, serving_ids, serving, stops, d)


def _check_eos_only(tokenizer: Any, row: Row, recipe: Recipe, stops: list[int]) -> dict[str, Any]:
    """text: the document gets EOS and (pretraining puts loss on every token) it carries loss; pairs: the target ends with EOS."""
    d = recipe.data
    if d.format == "text":
        ids = tokenizer(field_text(row, d.text_field), add_special_tokens=False)["input_ids"]
        input_ids = Packer(d.max_seq_len, tokenizer.eos_token_id).single(ids)["input_ids"]
        encoded = {"input_ids": list(input_ids), "labels": list(input_ids)}
        note = "text: no serving prompt; checked that EOS ends the document and carries loss"
    else:
        encoded = formats.pairs_encoder(tokenizer, d)(row)
        if isinstance(encoded, str):
            return _finding(f"training drops this example ({encoded})")
        note = "pairs: no chat/instruction prompt to compare; checked that the target labels end with EOS"
    labels = encoded["labels"]
    eos_ok = bool(labels) and labels[-1] in stops
    return {
        "ok": eos_ok,
        "checked": [note],
        "training": _training(tokenizer, encoded),
        "serving": {"stop_tokens": _pieces(tokenizer, stops)},
        "mismatch": None,
        "eos_carries_loss": eos_ok,
        "loss_tokens": sum(1 for t in labels if t != IGNORE_INDEX),
        "problems": []
        if eos_ok
        else [f"the sequence does not end with a stop token {_pieces(tokenizer, stops)}"],
    }


# ---------------------------------------------------------------- comparison


def _compare(
    tokenizer: Any,
    encoded: dict[str, Any],
    serving_ids: list[int],
    serving: dict[str, Any],
    stops: list[int],
    d: DataSection,
) -> dict[str, Any]:
    ids, labels = encoded["input_ids"], encoded["labels"]
    train_on_prompt, max_len = d.train_on_prompt, d.max_seq_len
    training = _training(tokenizer, encoded)
    problems: list[str] = []
    at = next((i for i, t in enumerate(serving_ids) if i >= len(ids) or ids[i] != t), None)
    mismatch = None
    if at is not None:
        mismatch = _token_mismatch(tokenizer, ids, serving_ids, at)
        problems.append(
            f"the serving prompt is not a prefix of the training tokens: they differ at token {at} "
            f"(training {mismatch['training_token']!r}, serving {mismatch['serving_token']!r})"
        )
        eos_ok = False
    else:
        reply = ids[len(serving_ids) :]
        end = next((j for j, t in enumerate(reply) if t in stops), None)
        reply_labels = labels[len(serving_ids) :]
        if end is None:
            eos_ok = False
            cut = " (data.max_seq_len cuts it)" if len(ids) >= max_len else ""
            problems.append(
                f"the trained reply {tokenizer.decode(reply)!r}{cut} holds no token serving stops on "
                f"{_pieces(tokenizer, stops)}: the model will not learn to stop"
            )
        else:
            eos_ok = reply_labels[end] != IGNORE_INDEX
            if not eos_ok:
                problems.append("the end-of-reply token does not carry loss")
            if any(t == IGNORE_INDEX for t in reply_labels[:end]):
                problems.append("part of the reply does not carry loss")
        if not train_on_prompt and serving_ids and labels[len(serving_ids) - 1] != IGNORE_INDEX:
            problems.append("the last prompt token carries loss")
    return {
        "ok": not problems,
        "checked": ["serving prompt is a token prefix of training", "reply and its stop token carry loss"],
        "training": training,
        "serving": serving,
        "mismatch": mismatch,
        "eos_carries_loss": eos_ok,
        "loss_tokens": training["loss_tokens"],
        "problems": problems,
    }


def _finding(problem: str, **parts: Any) -> dict[str, Any]:
    return {
        "ok": False,
        "checked": [],
        "training": parts.get("training"),
        "serving": parts.get("serving"),
        "mismatch": parts.get("mismatch"),
        "eos_carries_loss": False,
        "loss_tokens": 0,
        "problems": [problem],
    }


def _training(tokenizer: Any, encoded: dict[str, Any]) -> dict[str, Any]:
    ids, labels = encoded["input_ids"], encoded["labels"]
    loss = [t != IGNORE_INDEX for t in labels] if len(labels) == len(ids) else None
    return {
        "text": tokenizer.decode(ids),
        "tokens": len(ids),
        "loss_tokens": sum(1 for t in labels if t != IGNORE_INDEX),
        "loss_text": tokenizer.decode([t for t in labels if t != IGNORE_INDEX]),
        "spans": _spans(loss) if loss is not None else None,
        "input_ids": list(ids),
        "labels": list(labels),
    }


def _spans(loss: list[bool]) -> list[list[int]]:
    """[start, end) token ranges carrying loss."""
    spans: list[list[int]] = []
    for i, on in enumerate(loss):
        if on and spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        elif on:
            spans.append([i, i + 1])
    return spans


def _token_mismatch(tokenizer: Any, ids: list[int], serving_ids: list[int], at: int) -> dict[str, Any]:
    lo = max(0, at - CONTEXT_TOKENS)

    def piece(seq: list[int], i: int) -> str | None:
        return tokenizer.decode([seq[i]]) if i < len(seq) else None

    train_lines = [repr(tokenizer.decode([t])) for t in ids[lo : at + CONTEXT_TOKENS]]
    serve_lines = [repr(tokenizer.decode([t])) for t in serving_ids[lo : at + CONTEXT_TOKENS]]
    diff = difflib.unified_diff(
        train_lines, serve_lines, "training", "serving", lineterm="", n=CONTEXT_TOKENS
    )
    return {
        "position": at,
        "unit": "token",
        "training_token": piece(ids, at),
        "serving_token": piece(serving_ids, at),
        "training_context": tokenizer.decode(ids[lo : at + CONTEXT_TOKENS]),
        "serving_context": tokenizer.decode(serving_ids[lo : at + CONTEXT_TOKENS]),
        "diff": "\n".join(diff),
    }


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _text_diff(training: str, serving: str, at: int) -> str:
    lo = max(0, at - 40)
    a, b = training[lo : at + 40].splitlines(), serving[lo : at + 40].splitlines()
    return "\n".join(difflib.unified_diff(a, b, "training", "serving", lineterm=""))


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]
