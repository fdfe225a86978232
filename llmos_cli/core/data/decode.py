"""Bytes -> text for every reader: UTF-8 first, a legacy encoding where a file needs one, never U+FFFD.

`data.encoding: auto` reads each line as UTF-8 and decodes the lines that are not with the file's
legacy encoding: Windows-1252 when charset-normalizer finds that reading plausible (it is what
spreadsheet exports on Windows write, and a superset of Latin-1's printable characters, which is why
browsers read Latin-1 as it), else charset-normalizer's best guess over every encoding, judged on
the file's non-UTF-8 lines. A UTF-16 or UTF-32 byte-order mark decodes the whole file with it (so
does charset-normalizer's verdict on a file starting with NUL bytes, which is UTF-16/32 without
one); a UTF-8 mark is dropped. Any codec name instead is strict: a line it cannot decode is a bad row.
"""

from __future__ import annotations

import codecs
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmos_cli.errors import UserError

AUTO = "auto"
WESTERN = "cp1252"
SAMPLE_BYTES = 64 * 1024  # non-UTF-8 lines charset-normalizer judges a file's legacy encoding on
HEAD_BYTES = 4096  # the start of a file looked at for UTF-16/UTF-32 without a byte-order mark
# longest first: the UTF-32-LE mark starts with the UTF-16-LE one
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class Line:
    number: int  # 1-based
    text: str | None  # None: not decodable (see `error`); line ending kept
    encoding: str | None = None  # the codec used when it was not UTF-8
    error: str = ""
    shown: str = ""  # an undecodable line for the quarantine file, bytes as \x escapes


def check_encoding(name: str) -> str:
    """`auto` or a codec Python knows (raises ValueError otherwise)."""
    if name != AUTO:
        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(
                f"unknown encoding {name!r}: use auto or a codec name (utf-8, cp1252, ...)"
            ) from None
    return name


def _label(codec: str) -> str:
    name = codecs.lookup(codec).name
    return "UTF-8" if name == "utf-8" else name


def _line_safe(codec: str) -> bool:
    """True when the codec writes a newline as the single byte \\n (so files split into lines as bytes)."""
    enc = codecs.getincrementalencoder(codec)()
    enc.encode("a")
    return enc.encode("\n") == b"\n"


def detect_legacy(sample: bytes) -> str | None:
    """The legacy encoding of `sample` (a file's lines that are not UTF-8), or None when none fits."""
    from charset_normalizer import from_bytes

    if from_bytes(sample, cp_isolation=[WESTERN]).best() is not None:
        return WESTERN
    best = from_bytes(sample).best()
    return best.encoding if best is not None else None


class Decoding:
    """How files are decoded (`data.encoding`); counts the rows decoded with each non-UTF-8 encoding."""

    def __init__(self, encoding: str = AUTO) -> None:
        self.encoding = check_encoding(encoding)
        self.redecoded: Counter[str] = Counter()

    def count_row(self, lines: list[Line]) -> None:
        """Count one row built from `lines` under each non-UTF-8 encoding they used."""
        for enc in {line.encoding for line in lines if line.encoding}:
            self.redecoded[enc] += 1

    def lines(self, path: Path) -> Iterator[Line]:
        """The lines of `path`, decoded, each with its line ending."""
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
            fh.seek(0)
            if self.encoding == AUTO:
                bom = next((codec for mark, codec in BOMS if head.startswith(mark)), None)
                wide = bom if bom in ("utf-16", "utf-32") else _wide_without_bom(head)
                if wide is not None:
                    yield from _text_lines(fh, path, wide)
                else:
                    yield from self._auto_lines(fh, path, skip_bom=bom is not None)
            elif _line_safe(self.encoding):
                yield from _strict_lines(fh, self.encoding)
            else:
                yield from _text_lines(fh, path, self.encoding)

    def _auto_lines(self, fh: io.BufferedReader, path: Path, skip_bom: bool) -> Iterator[Line]:
        legacy: str | None = ""  # "": not judged yet; None: nothing fits
        for i, raw in enumerate(fh, 1):
            if i == 1 and skip_bom:
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield Line(i, raw.decode("utf-8"))
                continue
            except UnicodeDecodeError as err:
                utf8_error = err
            if legacy == "":
                legacy = detect_legacy(_non_utf8_sample(path))
            if legacy is not None:
                try:
                    yield Line(i, raw.decode(legacy), encoding=legacy)
                    continue
                except UnicodeDecodeError:
                    pass
            also = f" nor {legacy}" if legacy else ""
            yield Line(
                i,
                None,
                error=f"not valid UTF-8{also} (byte {utf8_error.start} of the line)",
                shown=raw.decode("utf-8", "backslashreplace"),
            )


def _strict_lines(fh: io.BufferedReader, codec: str) -> Iterator[Line]:
    label = _label(codec)
    enc = None if label == "UTF-8" else label
    for i, raw in enumerate(fh, 1):
        try:
            yield Line(i, raw.decode(codec), encoding=enc)
        except UnicodeDecodeError as err:
            yield Line(
                i,
                None,
                error=f"not valid {label} (byte {err.start} of the line)",
                shown=raw.decode(codec, "backslashreplace"),
            )


def _text_lines(fh: io.BufferedReader, path: Path, codec: str) -> Iterator[Line]:
    """A codec whose newline is not one byte (UTF-16, UTF-32): decoded as a stream, strictly."""
    label = _label(codec).removesuffix("-le").removesuffix("-be")
    text = io.TextIOWrapper(fh, encoding=codec, newline="\n")
    i = 0
    try:
        for i, line in enumerate(text, 1):  # noqa: B007 - `i` names the line that failed
            yield Line(i, line, encoding=label)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}:{i + 1}: not valid {label} ({err.reason})", hint="re-save the file"
        ) from None
    finally:
        text.detach()


def _wide_without_bom(head: bytes) -> str | None:
    """UTF-16/UTF-32 without a byte-order mark: its NUL bytes are valid UTF-8, so it would be read as
    text full of NULs; a file whose `head` holds NULs is judged by charset-normalizer instead."""
    if b"\x00" not in head:
        return None
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    name = best.encoding if best is not None else ""
    return name if name.startswith(("utf_16", "utf_32")) else None


def _non_utf8_sample(path: Path) -> bytes:
    """The file's lines that are not UTF-8, up to SAMPLE_BYTES."""
    sample = bytearray()
    with path.open("rb") as fh:
        for raw in fh:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                sample += raw
                if len(sample) >= SAMPLE_BYTES:
                    break
    return bytes(sample)
