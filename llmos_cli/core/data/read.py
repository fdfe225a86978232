"""Find inputs and stream them as rows, naming file and line for anything malformed.

Every reader streams (memory stays flat however large the file), and hands a malformed row to a
`BadRows` policy instead of raising: `on_error: fail` stops with the first few bad lines shown,
`skip` counts them and writes them to a quarantine file.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llmos_cli.core.data.decode import Decoding, Line
from llmos_cli.errors import UserError

STRUCTURED = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
SUPPORTED = STRUCTURED | {".txt"}
HUB_PREFIX = "hub:"
SHOWN_BAD_ROWS = 5


@dataclass
class Row:
    data: dict[str, Any]
    source: str
    line: int  # 1-based line (or row) number in `source`


class BadRows:
    """What happens to malformed rows: `fail` raises once a few are seen (or the file ends), `skip`
    counts them per reason and appends each to a quarantine JSONL file."""

    def __init__(self, on_error: str = "fail", quarantine: Path | None = None) -> None:
        self.on_error = on_error
        self.quarantine_path = quarantine
        self.count = 0
        self.by_reason: dict[str, int] = {}
        self._pending: list[str] = []
        self._fh: TextIO | None = None

    def add(self, source: str, line: int, reason: str, message: str, raw: Any = None) -> None:
        self.count += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self.on_error == "fail":
            self._pending.append(f"{source}:{line}: {message}")
            if len(self._pending) >= SHOWN_BAD_ROWS:
                self.raise_pending()
            return
        if self.quarantine_path is not None:
            if self._fh is None:
                self._fh = self.quarantine_path.open("w", encoding="utf-8")
            record = {"source": source, "line": line, "reason": reason, "message": message, "raw": raw}
            self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def raise_pending(self) -> None:
        """In `fail` mode, raise a UserError listing the bad rows seen so far (if any)."""
        if not self._pending:
            return
        shown = self._pending
        self._pending = []
        self.close()
        first = shown[0]
        rest = "".join(f"\n  {m}" for m in shown[1:])
        raise UserError(
            first + rest,
            hint="fix the input, or set data.on_error=skip to drop bad rows into a quarantine file",
        )

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def is_hub_id(path: Path | str) -> bool:
    return str(path).startswith(HUB_PREFIX)


def list_files(spec: str | list[str], include: list[str] | None = None) -> list[Path]:
    """Expand files, folders and glob patterns, sorted. In a folder, `include` globs (relative to it:
    `*.py` top level, `**/*.py` recursive) pick files; by default every supported file, recursively.
    `hub:OWNER/NAME` names a dataset on the Hugging Face hub (online only).
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in specs:
        if is_hub_id(item):
            files.append(Path(item))
            continue
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


def read_rows(
    files: list[Path],
    text_unit: str = "document",
    bad: BadRows | None = None,
    split: str = "train",
    decoding: Decoding | None = None,
) -> Iterator[Row]:
    """Rows from every input; a plain-text file gives one row per file (or per line). Text files are
    decoded by `decoding` (default `auto`: UTF-8, else the file's legacy encoding), which counts them."""
    bad = bad or BadRows("fail")
    decoding = decoding or Decoding()
    for path in files:
        if is_hub_id(path):
            yield from _read_hub(str(path)[len(HUB_PREFIX) :], split)
        elif is_saved_dataset(path):
            yield from _read_saved(path)
        else:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(path, bad, decoding)
            elif suffix == ".json":
                yield from _read_json(path, bad, decoding)
            elif suffix in (".csv", ".tsv"):
                yield from _read_csv(path, "\t" if suffix == ".tsv" else ",", bad, decoding)
            elif suffix == ".parquet":
                yield from _read_parquet(path)
            elif text_unit == "line":
                yield from _read_text_lines(path, bad, decoding)
            else:
                yield from _read_text(path, bad, decoding)
        bad.raise_pending()  # `fail` stops at the end of the file holding the first bad row


def _whole(path: Path, decoding: Decoding) -> tuple[str | None, Line | None]:
    """The whole text of `path`, or None and its first undecodable line; counted as one row."""
    lines = list(decoding.lines(path))
    failed = next((line for line in lines if line.text is None), None)
    if failed is not None:
        return None, failed
    decoding.count_row(lines)
    return "".join(line.text for line in lines if line.text is not None), None


def _read_text(path: Path, bad: BadRows, decoding: Decoding) -> Iterator[Row]:
    text, failed = _whole(path, decoding)  # one document per file: the file is the row
    if failed is not None:
        bad.add(str(path), failed.number, "encoding", failed.error, failed.shown.rstrip("\r\n"))
    else:
        yield Row({"text": text}, str(path), 1)


def _read_text_lines(path: Path, bad: BadRows, decoding: Decoding) -> Iterator[Row]:
    for line in decoding.lines(path):
        if line.text is None:
            bad.add(str(path), line.number, "encoding", line.error, line.shown.rstrip("\r\n"))
            continue
        decoding.count_row([line])
        yield Row({"text": line.text.rstrip("\r\n")}, str(path), line.number)


def _read_jsonl(path: Path, bad: BadRows, decoding: Decoding) -> Iterator[Row]:
    for line in decoding.lines(path):
        i, text = line.number, line.text
        if text is None:
            bad.add(str(path), i, "encoding", line.error, line.shown.rstrip("\r\n"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            bad.add(
                str(path),
                i,
                "invalid_json",
                f"invalid JSON: {err.msg} (column {err.colno})",
                text.rstrip("\n"),
            )
            continue
        if not isinstance(obj, dict):
            bad.add(str(path), i, "not_an_object", f"expected a JSON object, got {type(obj).__name__}", obj)
            continue
        decoding.count_row([line])
        yield Row(obj, str(path), i)


def _read_json(path: Path, bad: BadRows, decoding: Decoding) -> Iterator[Row]:
    text, failed = _whole(path, decoding)  # a JSON document is parsed whole; use .jsonl for large data
    if failed is not None:
        raise UserError(f"{path}:{failed.number}: {failed.error}", hint="re-save the file as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f'{path}: expected a list of objects (or {{"data": [...]}})')
    for i, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            bad.add(
                str(path),
                i,
                "not_an_object",
                f"item {i}: expected a JSON object, got {type(item).__name__}",
                item,
            )
            continue
        yield Row(item, str(path), i)


class _LineTracker:
    """Feeds csv the decoded lines of a file, recording the physical line, the lines of the current
    record and the first that could not be decoded."""

    def __init__(self, lines: Iterator[Line]) -> None:
        self.lines, self.line, self.record, self.error = lines, 0, [], None

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            self.line = line.number
            self.record.append(line)
            if line.text is None:
                self.error = self.error or line
                yield line.shown
            else:
                yield line.text

    def take(self) -> tuple[list[Line], Line | None]:
        """The lines of the record csv just returned (the last one read ends it), and its bad line."""
        record, error = self.record, self.error
        self.record, self.error = [], None
        return record, error


def _read_csv(path: Path, delimiter: str, bad: BadRows, decoding: Decoding) -> Iterator[Row]:
    lines = _LineTracker(decoding.lines(path))
    reader = csv.reader(iter(lines), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    lines.take()
    start = lines.line + 1
    for rec in reader:
        line, start = start, lines.line + 1
        record, error = lines.take()
        if error is not None:
            bad.add(str(path), error.number, "encoding", error.error, delimiter.join(rec))
            continue
        if not rec:
            continue
        if len(rec) != len(header):
            bad.add(
                str(path),
                line,
                "wrong_field_count",
                f"{len(rec)} fields where the header has {len(header)}",
                delimiter.join(rec),
            )
            continue
        decoding.count_row(record)
        yield Row(dict(zip(header, rec, strict=True)), str(path), line)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: cannot read parquet: {err}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            i += 1
            yield Row(rec, str(path), i)


def _read_saved(path: Path) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    i = 0
    for batch in ds.iter(batch_size=1024):
        for rec in _batch_rows(batch):
            i += 1
            yield Row(rec, str(path), i)


def _read_hub(name: str, split: str) -> Iterator[Row]:
    if (
        os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    ):
        raise UserError(
            f"data: hub:{name} needs the network, but HF_HUB_OFFLINE is set",
            hint="download it once and point data.train at the saved folder or files",
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub client raises many types: not found, auth, network
        raise UserError(f"data: cannot load hub:{name} (split {split}): {err}") from None
    for i, rec in enumerate(ds, 1):
        yield Row(dict(rec), f"hub:{name}", i)


def _batch_rows(batch: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys), strict=True):
        yield dict(zip(keys, values, strict=True))


def field_text(row: Row, field: str, bad: BadRows | None = None) -> str | None:
    """The string in `field`; a missing or non-text field goes to `bad` (None) or raises a UserError."""
    if field not in row.data:
        present = ", ".join(map(str, row.data)) or "none"
        message = f"missing field '{field}' (fields present: {present})"
        reason = "missing_field"
    elif not isinstance(row.data[field], str):
        message = f"field '{field}' should be text, got {type(row.data[field]).__name__}"
        reason = "wrong_type"
    else:
        return row.data[field]
    if bad is None:
        raise UserError(
            f"{row.source}:{row.line}: {message}", hint="set data.text_field (or the format's field)"
        )
    bad.add(row.source, row.line, reason, message, row.data)
    return None
