"""`llmos generate`: one completion streamed to stdout, or a JSONL file of prompts completed in batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llmos_cli.console import out
from llmos_cli.core.models import describe_model
from llmos_cli.core.rundir import write_atomic
from llmos_cli.core.serve.runners import Runner, SamplingParams, open_runner
from llmos_cli.errors import UserError


def run(
    model: str,
    params: SamplingParams,
    *,
    prompt: str | None = None,
    input_path: Path | None = None,
    output_path: Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> list[str]:
    """Complete `prompt` (printed as it is generated) or every line of `input_path` (written to `output_path`)."""
    if (prompt is None) == (input_path is None):
        raise UserError("pass exactly one of --prompt TEXT or --input prompts.jsonl")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    try:
        params.check()
    except ValueError as err:
        raise UserError(f"--{str(err).replace('_', '-')}") from err
    rows = read_prompts(input_path) if input_path is not None else None
    runner = generation_runner(model, device)

    if rows is None:
        ids, pieces = runner.encode(prompt), []
        check_fits(runner, ids, params.max_new_tokens, where="--prompt")
        echo = not out.json_mode  # with --json, the CLI prints the completion inside its JSON result
        for piece in runner.stream(ids, params):
            pieces.append(piece)
            if echo:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if echo:
            sys.stdout.write("\n")
        return ["".join(pieces)]

    prompts = []
    for n, row in rows:
        try:
            ids = runner.encode_chat(row["messages"]) if "messages" in row else runner.encode(row["prompt"])
        except ValueError as err:  # no chat template, or a seq2seq model given messages
            raise UserError(f"{input_path}:{n}: {err}") from err
        check_fits(runner, ids, params.max_new_tokens, where=f"{input_path}:{n}")
        prompts.append(ids)
    with out.progress("generating", total=len(prompts)) as bar:
        results = runner.generate(prompts, params, batch_size=batch_size, on_done=lambda i, c: bar.update(1))
    lines = [
        json.dumps({**row, "completion": c.text, "finish_reason": c.finish_reason}, ensure_ascii=False)
        for (_, row), c in zip(rows, results, strict=True)
    ]
    if output_path is None:
        print("\n".join(lines))
    else:
        write_atomic(output_path, "\n".join(lines) + "\n")
        out.info(f"wrote {len(lines)} completions to {output_path}")
    return [c.text for c in results]


def generation_runner(model: str, device: str) -> Runner:
    """The model's decoder or seq2seq runner on `device`; an encoder or classifier is refused."""
    info = describe_model(model)
    if not info.generates:
        raise UserError(
            f"{model}: {info.path} is {'a classifier' if info.kind == 'classifier' else 'an encoder'}; "
            "generation needs a causal LM or an encoder-decoder (seq2seq) model",
            hint="`llmos serve` gives encoders /v1/embeddings and classifiers /v1/classify",
        )
    return open_runner(info, device=device)


def check_fits(runner: Runner, ids: list[int], max_new_tokens: int, *, where: str) -> None:
    window = runner.context_window
    if window is not None and len(ids) + max_new_tokens > window:
        raise UserError(
            f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it is "
            f"over the model's context window of {window} tokens"
        )


def read_prompts(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for JSON lines with a "prompt" string or a chat "messages" list; errors name the line."""
    if not path.is_file():
        raise UserError(f"--input: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n}: not valid JSON: {err.msg}") from err
        ok_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str)
        ok_chat = isinstance(row, dict) and isinstance(row.get("messages"), list)
        if not (ok_prompt or ok_chat):
            raise UserError(f'{path}:{n}: expected an object with a "prompt" string or a "messages" list')
        rows.append((n, row))
    if not rows:
        raise UserError(f"{path} holds no prompts")
    return rows
