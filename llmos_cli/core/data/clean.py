"""Text normalisation and length filters, each switchable from `data.clean`."""

from __future__ import annotations

import re
import unicodedata

from llmos_cli.recipe import CleanSection

# C0/C1 control characters except tab, newline and carriage return (handled as whitespace).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def clean_text(text: str, cfg: CleanSection) -> str:
    """Normalise one document; keeps indentation and any script (CJK, Arabic, ...) intact."""
    if cfg.normalize != "none":
        text = unicodedata.normalize(cfg.normalize, text)
    if cfg.control_chars:
        text = _CONTROL.sub("", text)
    if cfg.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_RUN.sub("\n\n", text).strip()
    return text


def drop_reason(text: str, cfg: CleanSection) -> str | None:
    """Why a cleaned document is dropped, or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    return None
