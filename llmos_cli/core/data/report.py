"""The data report: counts per stage, written as report.json, shown as a table, plus a length histogram."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.console import out
from llmos_cli.core.data.gates import share


@dataclass
class DataReport:
    fingerprint: str = ""
    files: int = 0
    documents_read: int = 0
    documents_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    malformed: Counter = field(default_factory=Counter)
    redecoded: Counter = field(default_factory=Counter)  # rows read in each encoding other than UTF-8
    masked: Counter = field(default_factory=Counter)  # personal data replaced by a token, per kind
    quarantine: str | None = None
    duplicates_exact: int = 0
    duplicates_near: int = 0
    validation_overlap: int = 0  # validation documents also found in train (exact or near)
    validation_overlap_removed: int = 0
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    label_balance: dict[str, dict[str, int]] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    histogram: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = dict(self.dropped)
        d["malformed"] = dict(self.malformed)
        d["redecoded"] = dict(self.redecoded)
        d["masked"] = dict(self.masked)
        d["measures"] = self.measures()
        return d

    def measures(self) -> dict[str, Any]:
        """What data gates limit (see core/data/gates.py); None where the data has no such thing."""
        malformed, dropped = sum(self.malformed.values()), sum(self.dropped.values())
        split_docs = sum(s.get("documents", 0) for s in self.splits.values())
        train_labels = self.label_balance.get("train", {})
        return {
            "rows": self.documents_kept,
            "duplicate_share": share(self.duplicates_exact + self.duplicates_near, self.documents_read),
            "truncated_share": share(sum(s.get("truncated", 0) for s in self.splits.values()), split_docs),
            "train_validation_overlap": self.validation_overlap - self.validation_overlap_removed,
            "label_share": share(max(train_labels.values()), sum(train_labels.values()))
            if train_labels
            else None,
            "dropped_share": share(dropped + malformed, self.documents_read + malformed),
        }

    def show(self) -> None:
        rows: list[tuple[str, Any]] = [
            ("files", self.files),
            ("documents read", self.documents_read),
            *((f"decoded as {enc}", n) for enc, n in sorted(self.redecoded.items())),
            *((f"malformed: {reason}", n) for reason, n in sorted(self.malformed.items())),
            *((f"masked: {kind}", n) for kind, n in sorted(self.masked.items())),
            *((f"dropped: {reason}", n) for reason, n in sorted(self.dropped.items())),
            ("exact duplicates", self.duplicates_exact),
            ("near duplicates", self.duplicates_near),
            ("validation rows also in train", self.validation_overlap),
            ("documents kept", self.documents_kept),
        ]
        for split, stats in self.splits.items():
            for k, v in stats.items():
                if isinstance(v, dict):
                    rows += [(f"{split}: {k} {stat}", x) for stat, x in v.items()]
                else:
                    rows.append((f"{split}: {k}", v))
        for split, balance in self.label_balance.items():
            rows += [(f"{split}: label {k}", v) for k, v in balance.items()]
        rows.append(("vocab size", self.tokenizer.get("vocab_size", "")))
        out.table("data report", ["what", "count"], rows)


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    """Mean, percentiles and max of document lengths in tokens."""
    if len(lengths) == 0:
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {
        "mean": round(float(lengths.mean()), 1),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(lengths.max()),
    }


def write_length_histogram(
    lengths: dict[str, np.ndarray], path: Path, max_seq_len: int | None = None
) -> None:
    """A PNG histogram of document lengths in tokens, one series per split (matplotlib, Agg)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    top = max((int(v.max()) for v in lengths.values() if len(v)), default=1)
    bins = np.linspace(0, max(top, 1), 51)
    for name, values in lengths.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
    if max_seq_len:
        ax.axvline(
            max_seq_len, color="black", linestyle="--", linewidth=1, label=f"max_seq_len {max_seq_len}"
        )
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("document lengths")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def count_labels(values: Iterable[Any]) -> dict[str, int]:
    """How many rows carry each label value (for classification data)."""
    return dict(sorted(Counter(str(v) for v in values).items()))
