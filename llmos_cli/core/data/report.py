"""The data report: counts per stage, written as report.json and shown as a table."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from llmos_cli.console import out


@dataclass
class DataReport:
    fingerprint: str = ""
    files: int = 0
    documents_read: int = 0
    documents_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    duplicates_exact: int = 0
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = dict(self.dropped)
        return d

    def show(self) -> None:
        rows: list[tuple[str, Any]] = [
            ("files", self.files),
            ("documents read", self.documents_read),
            *((f"dropped: {reason}", n) for reason, n in sorted(self.dropped.items())),
            ("exact duplicates", self.duplicates_exact),
            ("documents kept", self.documents_kept),
        ]
        for split, stats in self.splits.items():
            rows += [(f"{split}: {k}", v) for k, v in stats.items()]
        rows.append(("vocab size", self.tokenizer.get("vocab_size", "")))
        out.table("data report", ["what", "count"], rows)
