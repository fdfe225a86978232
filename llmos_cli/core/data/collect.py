"""Stream documents out of input rows: extract the text, clean it, filter it, drop duplicates.

A `Collector` keeps only hashes (exact dedup) and a MinHash-LSH index (near dedup) between rows,
so its memory does not hold the text of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from llmos_cli.core.data.clean import clean_text, drop_reason
from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.dedup import ExactDedup, NearDedup
from llmos_cli.core.data.read import BadRows, field_text, read_rows
from llmos_cli.core.data.report import DataReport
from llmos_cli.recipe import DataSection


class Collector:
    """Turns rows into clean, unique documents and counts every decision in `report`."""

    def __init__(self, data: DataSection, report: DataReport, bad: BadRows) -> None:
        self.data, self.report, self.bad = data, report, bad
        self.hashes = ExactDedup()
        c = data.clean
        self.near = (
            NearDedup(c.near_dedup_threshold, c.near_dedup_num_perm, c.near_dedup_ngram)
            if c.near_dedup
            else None
        )

    def documents(self, files: list[Path], split: str = "train") -> Iterator[str]:
        """Clean, kept documents of `files`, in order (remembered for dedup and overlap checks)."""
        d, report = self.data, self.report
        kept = 0
        decoding = Decoding(d.encoding)
        rows = read_rows(files, d.text_unit, self.bad, split=split, decoding=decoding)
        for text in self._texts(rows):
            if d.max_documents is not None and kept >= d.max_documents:
                break
            report.documents_read += 1
            text = clean_text(text, d.clean, report.masked)
            reason = drop_reason(text, d.clean)
            if reason:
                report.dropped[reason] += 1
                continue
            if d.clean.dedup and self.hashes.seen(text):
                report.duplicates_exact += 1
                continue
            if self.near is not None and self.near.seen(text):
                report.duplicates_near += 1
                continue
            kept += 1
            yield text
        report.documents_kept += kept
        report.redecoded.update(decoding.redecoded)

    def _texts(self, rows: Iterable) -> Iterator[str]:
        for row in rows:
            text = field_text(row, self.data.text_field, self.bad)
            if text is not None:  # else malformed: counted by `bad`
                yield text
