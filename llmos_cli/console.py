"""User-facing output: rich tables and progress on a TTY, plain lines in pipes, JSON with --json.

Human-readable messages go to stderr so that stdout stays clean for results (a completion, --json).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    @property
    def interactive(self) -> bool:
        return self.err.is_terminal and not self.json_mode

    def info(self, message: str) -> None:
        """A status line for people (stderr); silent with --quiet."""
        if not self.quiet:  # in a pipe or a CI log: one line per message, never wrapped at 80 columns
            self.err.print(message, markup=self.interactive, highlight=False, soft_wrap=not self.interactive)

    def warn(self, message: str) -> None:
        self.err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)  # one line

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table on stderr: rich on a TTY, aligned plain text otherwise. Skipped in --json mode."""
        if self.quiet or self.json_mode:
            return
        cells = [[_fmt(c) for c in row] for row in rows]
        if self.interactive:
            t = Table(title=title, title_justify="left")
            for col in columns:
                t.add_column(col, overflow="fold")
            for row in cells:
                t.add_row(*row)
            self.err.print(t)
            return
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells, strict=False)]
        lines = [title] if title else []
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=False)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
        print("\n".join(lines), file=sys.stderr)

    def emit(self, data: Any) -> None:
        """The command's machine-readable result: printed as JSON on stdout in --json mode."""
        if self.json_mode:
            print(json.dumps(data, indent=2, default=str))

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[ProgressBar]:
        bar = ProgressBar(self, description, total)
        try:
            yield bar
        finally:
            bar.close()


class ProgressBar:
    """A rich live bar on a TTY; otherwise a plain line at most every few seconds."""

    PLAIN_INTERVAL_S = 5.0

    def __init__(self, out: Output, description: str, total: int | None):
        self.out, self.description, self.total = out, description, total
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._last_plain = 0.0
        self._rich = None
        if out.interactive and not out.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=out.err,
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, status="")

    def update(self, advance: int = 1, **fields: Any) -> None:
        self.done += advance
        self.fields.update(fields)
        status = "  ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items())
        if self._rich is not None:
            self._rich.update(self._task, advance=advance, status=status)
        elif not self.out.quiet and not self.out.json_mode:
            now = time.monotonic()
            if now - self._last_plain >= self.PLAIN_INTERVAL_S or (self.total and self.done >= self.total):
                self._last_plain = now
                of = f"/{self.total}" if self.total else ""
                print(f"{self.description} {self.done}{of}  {status}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    return str(value)


out = Output()


def configure(json_mode: bool = False, quiet: bool = False) -> Output:
    """Set the process-wide output mode (called once by the CLI)."""
    out.json_mode, out.quiet = json_mode, quiet
    return out
