"""Text cleaning and length filters, each step switchable from `data.clean`.

Every step keeps any script intact (CJK, Arabic, Cyrillic, ...): mojibake repair only undoes
wrong-encoding damage, and width/ligature/quote rewrites that would alter CJK punctuation are off.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any

from llmos_cli.core.data.pii import mask_personal_data
from llmos_cli.recipe import CleanSection

# C0/C1 control characters except tab, newline and carriage return (handled as whitespace).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


@lru_cache(maxsize=1)
def _ftfy_config() -> Any:
    from ftfy import TextFixerConfig

    return TextFixerConfig(
        unescape_html=False,  # code and markup keep their entities
        remove_terminal_escapes=False,
        fix_latin_ligatures=False,
        fix_character_width=False,  # would turn CJK full-width punctuation into ASCII
        uncurl_quotes=False,
        fix_line_breaks=False,  # the whitespace step owns line breaks
        remove_control_chars=False,  # the control-character step owns these
        normalization=None,  # the normalize step owns this
        explain=False,
    )


def fix_mojibake(text: str) -> str:
    """Undo text decoded with the wrong codec (e.g. UTF-8 read as Windows-1252: 'cafÃ©' -> 'café')."""
    if text.isascii():
        return text
    from ftfy import fix_text

    return fix_text(text, config=_ftfy_config())


def clean_text(text: str, cfg: CleanSection, masked: Counter | None = None) -> str:
    """Apply the switched-on cleaning steps to one text; keeps indentation and every script. Personal
    data replaced by a token is counted per kind in `masked`."""
    if cfg.fix_mojibake:
        text = fix_mojibake(text)
    if cfg.normalize != "none":
        text = unicodedata.normalize(cfg.normalize, text)
    if cfg.control_chars:
        text = _CONTROL.sub("", text)
    text = mask_personal_data(text, cfg, masked)
    if cfg.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_RUN.sub("\n\n", text).strip()
    return text


def clean_fields(value: Any, cfg: CleanSection, masked: Counter | None = None) -> Any:
    """`value` with every string inside it (a row, a list of messages, ...) cleaned by `clean_text`."""
    if isinstance(value, str):
        return clean_text(value, cfg, masked)
    if isinstance(value, list):
        return [clean_fields(v, cfg, masked) for v in value]
    if isinstance(value, dict):
        return {k: clean_fields(v, cfg, masked) for k, v in value.items()}
    return value


def drop_reason(text: str, cfg: CleanSection) -> str | None:
    """Why a cleaned document is dropped by its characters, or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    return None


def token_drop_reason(n_tokens: int, cfg: CleanSection) -> str | None:
    """Why a tokenised document is dropped by its token count, or None to keep it."""
    if n_tokens < cfg.min_tokens:
        return "too_few_tokens"
    if cfg.max_tokens is not None and n_tokens > cfg.max_tokens:
        return "too_many_tokens"
    return None
