"""Prepared datasets kept per fingerprint: `data.output` holds the current one, and up to
`data.keep_versions` earlier ones wait beside it in `.NAME.versions/FINGERPRINT`, so switching back to
earlier settings costs a rename, not a re-encode."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from llmos_cli.core.writable import match_umask


def versions_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.versions"


def stored_report(folder: Path) -> dict | None:
    """`folder`'s report.json, or None when it holds no complete prepared dataset."""
    try:
        return json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stored_fingerprint(folder: Path) -> str | None:
    return (stored_report(folder) or {}).get("fingerprint")


def restore(target: Path, fp: str, keep: int) -> bool:
    """Bring the kept version with fingerprint `fp` back into `target` (shelving the current one)."""
    stored = versions_dir(target) / fp
    if stored_fingerprint(stored) != fp:
        return False
    claimed = target.parent / f".{target.name}.restoring-{uuid.uuid4().hex[:8]}"
    stored.rename(claimed)  # off the shelf first, so shelving the current version cannot prune it
    _shelve(target, keep)
    claimed.rename(target)
    return True


def install(staged: Path, target: Path, keep: int) -> None:
    """Move a freshly prepared `staged` folder into `target`, shelving the version it replaces."""
    match_umask(staged)
    _shelve(target, keep)
    staged.rename(target)


def _shelve(target: Path, keep: int) -> None:
    """Move `target` onto the shelf (or delete it when `keep` is 0), leaving at most `keep` versions."""
    if not target.exists():
        return
    fp = stored_fingerprint(target)
    if keep <= 0 or fp is None:
        doomed = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return
    shelf = versions_dir(target)
    shelf.mkdir(exist_ok=True)
    if (shelf / fp).exists():
        shutil.rmtree(shelf / fp)
    target.rename(shelf / fp)
    os.utime(shelf / fp)  # most recently used last to go
    for old in sorted(shelf.iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
