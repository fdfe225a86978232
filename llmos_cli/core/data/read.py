"""Find input files and read them into rows, naming file and line for anything malformed."""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_cli.errors import UserError

STRUCTURED = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
SUPPORTED = STRUCTURED | {".txt"}


@dataclass
class Row:
    data: dict[str, Any]
    source: str
    line: int  # 1-based line (or row) number in `source`


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def list_files(spec: str | list[str], include: list[str] | None = None) -> list[Path]:
    """Expand files, folders and glob patterns, sorted. In a folder, `include` globs (relative to it:
    `*.py` top level, `**/*.py` recursive) pick files; by default every supported file, recursively.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in specs:
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"data: no files match {item}")
            files += matches
            continue
        path = Path(item)
        if not path.exists():
            raise UserError(f"data: file or folder not found: {path}")
        if path.is_file() or is_saved_dataset(path):
            files.append(path)
            continue
        patterns = include or [f"**/*{ext}" for ext in sorted(SUPPORTED)]
        found = sorted({f for pat in patterns for f in path.glob(pat) if f.is_file()})
        if not found:
            raise UserError(f"data: {path} holds no input files matching {', '.join(patterns)}")
        files += found
    return files


def read_rows(files: list[Path], text_unit: str = "document") -> Iterator[Row]:
    """Rows from every file; plain-text files give one row per file (or per line)."""
    for path in files:
        if is_saved_dataset(path):
            yield from _read_saved(path)
            continue
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix in (".csv", ".tsv"):
            yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            yield from _read_text(path, text_unit)


def _read_text(path: Path, text_unit: str) -> Iterator[Row]:
    text = _decode(path)
    if text_unit == "line":
        for i, line in enumerate(text.splitlines(), 1):
            yield Row({"text": line}, str(path), i)
    else:
        yield Row({"text": text}, str(path), 1)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {err.start})") from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as fh:
        for i, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path}:{i}: invalid JSON: {err}") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield Row(obj, str(path), i)


def _read_json(path: Path) -> Iterator[Row]:
    try:
        obj = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f'{path}: expected a list of objects (or {{"data": [...]}})')
    for i, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, str(path), i)


def _read_csv(path: Path, delimiter: str) -> Iterator[Row]:
    text = _decode(path)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    for i, rec in enumerate(reader, 2):  # line 1 is the header
        if None in rec:
            raise UserError(f"{path}:{i}: more fields than the header has")
        yield Row(dict(rec), str(path), i)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: cannot read parquet: {err}") from None
    for i, rec in enumerate(table.to_pylist(), 1):
        yield Row(rec, str(path), i)


def _read_saved(path: Path) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, rec in enumerate(ds, 1):
        yield Row(dict(rec), str(path), i)


def field_text(row: Row, field: str) -> str:
    """The string in `field`, or a UserError naming file, line and field."""
    if field not in row.data:
        raise UserError(
            f"{row.source}:{row.line}: missing field '{field}'",
            hint=f"fields present: {', '.join(map(str, row.data)) or 'none'}; set data.text_field (or the format's field)",
        )
    value = row.data[field]
    if not isinstance(value, str):
        raise UserError(
            f"{row.source}:{row.line}: field '{field}' should be text, got {type(value).__name__}"
        )
    return value
