"""Task-format rows get what text documents get: exact and near duplicates dropped within a split,
and validation rows also found in train counted and (with `clean.decontaminate`) removed.

Rows are compared by what the model reads (the format's content fields), so an id or timestamp column
does not make a repeated example look new, and a classification text repeated with another label is
still a repeat.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from llmos_cli.core.data.dedup import ExactDedup, NearDedup
from llmos_cli.core.data.read import Row
from llmos_cli.recipe import DataSection

CONTENT_FIELDS: dict[str, Callable[[DataSection], list[str]]] = {
    "instruction": lambda d: [d.prompt_field, "input", d.response_field],
    "chat": lambda d: [d.messages_field],
    "classification": lambda d: [d.text_field],
    "pairs": lambda d: [d.source_field, d.target_field],
    "preference": lambda d: [d.prompt_field, d.messages_field, d.chosen_field, d.rejected_field],
}


def row_content(row: Row, d: DataSection) -> str:
    """The text dedup compares: the format's content fields (the whole row for a format without a rule)."""
    fields = CONTENT_FIELDS.get(d.format)
    value = [row.data.get(f) for f in fields(d)] if fields else row.data
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@dataclass
class RowCounts:
    """What deduplication decided, for the data report."""

    read: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    validation_overlap: int = 0  # validation rows also in train (exact, or near with near_dedup)
    validation_overlap_removed: int = 0


class SplitRows:
    """The rows of one split kept so far: their content hashes and, with near dedup, an LSH index."""

    def __init__(self, d: DataSection) -> None:
        c = d.clean
        self.data = d
        self.exact = ExactDedup()
        self.near = (
            NearDedup(c.near_dedup_threshold, c.near_dedup_num_perm, c.near_dedup_ngram)
            if c.near_dedup
            else None
        )

    def unique(self, rows: list[Row], counts: RowCounts) -> list[Row]:
        """`rows` without repeats of a row kept before (when `clean.dedup` / `near_dedup` are on)."""
        kept = []
        for row in rows:
            counts.read += 1
            text = row_content(row, self.data)
            if self.exact.seen(text) and self.data.clean.dedup:
                counts.duplicates_exact += 1
                continue
            if self.near is not None and self.near.seen(text):
                counts.duplicates_near += 1
                continue
            kept.append(row)
        return kept


def drop_validation_overlap(
    train: list[Row], validation: list[Row], d: DataSection, counts: RowCounts, near: NearDedup | None = None
) -> list[Row]:
    """`validation` without rows also in `train` when `clean.decontaminate` is on; counts them either way.

    `near` is an LSH index of exactly the train rows (given when validation came from its own files;
    a split of one deduplicated collection holds no near pair across it)."""
    in_train = ExactDedup()
    for row in train:
        in_train.seen(row_content(row, d))
    overlap = [
        i
        for i, row in enumerate(validation)
        if (text := row_content(row, d)) in in_train or (near is not None and near.matches(text))
    ]
    counts.validation_overlap = len(overlap)
    if not (overlap and d.clean.decontaminate):
        return validation
    counts.validation_overlap_removed = len(overlap)
    drop = set(overlap)
    return [row for i, row in enumerate(validation) if i not in drop]
