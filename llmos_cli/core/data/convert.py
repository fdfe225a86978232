"""`llmos data convert IN OUT`: rewrite a dataset in another file format and/or another layout.

Formats follow the file suffixes (.jsonl .json .csv .tsv .parquet .txt; IN may also be a folder, a
glob or a saved HF dataset). Layouts: `instruction` rows hold a prompt and a response (and an
optional system text); `chat` rows hold a list of `{role, content}` messages. Rows stream through,
so files of any size convert in flat memory; the output is written to a temp file and renamed.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmos_cli.core.data.read import SUPPORTED, BadRows, Row, list_files, read_rows
from llmos_cli.errors import UserError

LAYOUTS = ("instruction", "chat")
PARQUET_BATCH = 10_000


def convert(
    in_path: str | Path,
    out_path: str | Path,
    *,
    to_layout: str | None = None,
    prompt_field: str = "prompt",
    response_field: str = "response",
    system_field: str = "system",
    messages_field: str = "messages",
    text_field: str = "text",
) -> dict[str, Any]:
    """Convert IN to OUT; returns `{"rows": n, "in": ..., "out": ..., "layout": ...}`."""
    out_path = Path(out_path)
    check_writable_format(out_path, "convert")
    if to_layout is not None and to_layout not in LAYOUTS:
        raise UserError(f"convert: unknown layout '{to_layout}' (known: {', '.join(LAYOUTS)})")
    fields = {
        "prompt": prompt_field,
        "response": response_field,
        "system": system_field,
        "messages": messages_field,
    }
    rows = read_rows(list_files(str(in_path)), "line", bad=BadRows("fail"))  # .txt: a row per line
    if to_layout == "chat":
        records: Iterator[dict[str, Any]] = (to_chat(r, fields) for r in rows)
    elif to_layout == "instruction":
        records = (to_instruction(r, fields) for r in rows)
    else:
        records = (r.data for r in rows)

    n = write_records(records, out_path, text_field)
    return {"rows": n, "in": str(in_path), "out": str(out_path), "layout": to_layout}


# ---------------------------------------------------------------- layouts


def to_chat(row: Row, f: dict[str, str]) -> dict[str, Any]:
    """An instruction row as a chat: optional system, then user prompt, then assistant response."""
    data = dict(row.data)
    if f["messages"] in data and f["prompt"] not in data:
        return {**data, f["messages"]: _messages(row, f["messages"])}  # already a chat
    prompt, response = _text(row, f["prompt"]), _text(row, f["response"])
    system = data.pop(f["system"], None)
    for key in (f["prompt"], f["response"]):
        data.pop(key)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {f["messages"]: messages, **data}


def to_instruction(row: Row, f: dict[str, str]) -> dict[str, Any]:
    """A single-turn chat as an instruction row; a multi-turn chat cannot be one and is an error."""
    data = dict(row.data)
    if f["prompt"] in data and f["messages"] not in data:
        return data  # already instruction
    messages = _messages(row, f["messages"])
    data.pop(f["messages"])
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 2 or [m["role"] for m in turns] != ["user", "assistant"] or len(system) > 1:
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(
            f"{row.source}:{row.line}: a chat of roles [{roles}] has no instruction layout",
            hint="only chats of one user turn and one assistant reply (after an optional system) convert",
        )
    out: dict[str, Any] = {}
    if system:
        out[f["system"]] = system[0]
    out[f["prompt"]], out[f["response"]] = turns[0]["content"], turns[1]["content"]
    return {**out, **data}


def _text(row: Row, field: str) -> str:
    value = row.data.get(field)
    if not isinstance(value, str):
        got = "missing" if field not in row.data else type(value).__name__
        raise UserError(f"{row.source}:{row.line}: field '{field}' should be text ({got})")
    return value


def _messages(row: Row, field: str) -> list[dict[str, str]]:
    value = row.data.get(field)
    if isinstance(value, str):  # a chat read back from CSV/TSV holds its messages as JSON text
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise UserError(
            f"{row.source}:{row.line}: field '{field}' should be a list of {{role, content}} messages"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ---------------------------------------------------------------- writers


def check_writable_format(path: Path, command: str) -> None:
    if path.suffix.lower() not in _WRITERS:
        raise UserError(f"{command}: cannot write '{path.name}': use one of {', '.join(sorted(SUPPORTED))}")


def write_records(records: Iterable[dict[str, Any]], path: Path, text_field: str = "text") -> int:
    """Write `records` in the format `path`'s suffix names, through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        n = _WRITERS[path.suffix.lower()](iter(records), tmp, text_field)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return n


def _write_jsonl(records: Iterator[dict[str, Any]], path: Path, _: str) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def _write_json(records: Iterator[dict[str, Any]], path: Path, _: str) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[")
        for rec in records:
            fh.write(("," if n else "") + "\n  " + json.dumps(rec, ensure_ascii=False, default=str))
            n += 1
        fh.write("\n]\n")
    return n


def _cell(value: Any) -> Any:
    return (
        value
        if isinstance(value, str | int | float | bool) or value is None
        else json.dumps(value, ensure_ascii=False)
    )


def _write_table(records: Iterator[dict[str, Any]], path: Path, delimiter: str) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer: csv.DictWriter | None = None
        for rec in records:
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(rec), delimiter=delimiter)
                writer.writeheader()
            if set(rec) - set(writer.fieldnames):
                extra = ", ".join(sorted(set(rec) - set(writer.fieldnames)))
                raise UserError(
                    f"convert: row {n + 1} has fields the first row lacks ({extra}); write .jsonl instead"
                )
            writer.writerow({k: _cell(v) for k, v in rec.items()})
            n += 1
    return n


def _write_csv(records: Iterator[dict[str, Any]], path: Path, _: str) -> int:
    return _write_table(records, path, ",")


def _write_tsv(records: Iterator[dict[str, Any]], path: Path, _: str) -> int:
    return _write_table(records, path, "\t")


def _write_parquet(records: Iterator[dict[str, Any]], path: Path, _: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, batch, writer = 0, [], None
    try:
        for rec in itertools.chain(records, [None]):
            if rec is not None:
                batch.append(rec)
                n += 1
            if batch and (rec is None or len(batch) >= PARQUET_BATCH):
                table = (
                    pa.Table.from_pylist(batch)
                    if writer is None
                    else pa.Table.from_pylist(batch, writer.schema)
                )
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                batch = []
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise UserError("convert: no rows to write")
    return n


def _write_txt(records: Iterator[dict[str, Any]], path: Path, text_field: str) -> int:
    """One document per line: rows need a one-line text field (a .txt file has no other structure)."""
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            text = rec.get(text_field)
            if not isinstance(text, str):
                raise UserError(f"convert: row {n + 1} has no text field '{text_field}' to write as .txt")
            if "\n" in text:
                raise UserError(
                    f"convert: row {n + 1}: a multi-line text cannot be one .txt line; write .jsonl"
                )
            fh.write(text + "\n")
            n += 1
    return n


_WRITERS = {
    ".jsonl": _write_jsonl,
    ".json": _write_json,
    ".csv": _write_csv,
    ".tsv": _write_tsv,
    ".parquet": _write_parquet,
    ".txt": _write_txt,
}
