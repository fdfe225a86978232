"""Content-addressed fingerprints for prepared datasets, and atomic directory replacement."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmos_cli.core.writable import ensure_dir, match_umask
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection

FINGERPRINT_VERSION = 5  # bump when the prepared layout or its report changes
# How the data is read or labelled, not what it is: the label step's batch size gives the same labels.
NOT_FINGERPRINTED: dict[str, Any] = {
    **dict.fromkeys(("output", "keep_versions", "num_proc", "train", "validation", "checks"), True),
    "label": {"batch_size": True},
}


def data_settings(d: DataSection) -> dict[str, Any]:
    """The `data` settings that define a prepared dataset (the inputs are hashed separately)."""
    settings = d.model_dump(mode="json", exclude=NOT_FINGERPRINTED)
    settings["packing"] = d.packs  # the resolved choice: `auto` and its meaning fingerprint alike
    return settings


def hash_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(path: Path) -> str:
    """Hash of a file, or of every file under a folder (relative names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        hash_file(f, h)
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], inputs: Iterable[Path], tokenizer_dir: Path | None) -> str:
    """sha256 over the settings, every input file's contents and the tokenizer files.

    Content-addressed: file names count (they order the inputs) but not the folder they are in, so the
    same recipe run from another directory, or with an absolute path, reuses the prepared dataset.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINGERPRINT_VERSION, **settings}, sort_keys=True, default=str).encode())
    for path in inputs:
        h.update(Path(path).name.encode())
        h.update(hash_tree(path).encode())
    if tokenizer_dir is not None:
        h.update(hash_tree(tokenizer_dir).encode())
    return h.hexdigest()


def staging_dir(target: Path, what: str) -> Path:
    """A fresh temp folder beside `target` (same filesystem, so the final rename is atomic).

    `what` names the setting that chose `target`, for the error when it cannot be written.
    """
    if target.exists() and not target.is_dir():
        raise UserError(f"{what}: {target} is a file, not a folder", hint="choose another path")
    ensure_dir(target.parent, what)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_dir(staged: Path, target: Path) -> None:
    """Move `staged` into place at `target`, replacing any old copy without a half-written moment."""
    match_umask(staged)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
