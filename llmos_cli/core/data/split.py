"""Splits as masks over document files: which rows are train or validation, which overlap, which
are dropped by their token count. A mask costs one byte per document; the text stays on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmos_cli.core.data.clean import token_drop_reason
from llmos_cli.core.data.dedup import ExactDedup, NearDedup
from llmos_cli.core.data.report import DataReport
from llmos_cli.core.data.store import iter_column
from llmos_cli.recipe import DataSection


@dataclass
class Part:
    """One split's rows: a file of documents (and of their tokens) and which rows belong to it."""

    docs: Path
    keep: np.ndarray  # bool per row of `docs`

    @property
    def encoded(self) -> Path:
        return self.docs.with_suffix(".tokens.arrow")


def split_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `n` documents go to validation: whole documents (never blocks), drawn with `seed`."""
    is_val = np.zeros(n, bool)
    if fraction > 0 and n >= 2:
        is_val[np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))]] = True
    return is_val


def validation_overlap(train: Part, val: Part, near: NearDedup | None = None) -> list[int]:
    """Rows of `val` whose document also appears in train: exactly, or (with `near`, an LSH index of
    the train documents) as a near-duplicate."""
    if not val.keep.any():
        return []
    seen = ExactDedup()
    for text in iter_column(train.docs, "text", train.keep):
        seen.seen(text)
    found = []
    for i, (text, keep) in enumerate(zip(iter_column(val.docs, "text"), val.keep, strict=True)):
        if keep and (text in seen or (near is not None and near.matches(text))):
            found.append(i)
    return found


def filter_by_tokens(part: Part, n_tokens: np.ndarray, d: DataSection, report: DataReport) -> np.ndarray:
    """Drop `part` rows outside `clean.min_tokens`/`max_tokens`; returns the kept rows' lengths."""
    c = d.clean
    if c.min_tokens or c.max_tokens:
        for i in np.flatnonzero(part.keep):
            reason = token_drop_reason(int(n_tokens[i]), c)
            if reason:
                part.keep[i] = False
                report.dropped[reason] += 1
                report.documents_kept -= 1
    return n_tokens[part.keep]
