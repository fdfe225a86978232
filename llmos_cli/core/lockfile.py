"""llmos.lock helpers: file hashes cached by stat, package versions, and the checks a replay makes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from llmos_cli import __version__
from llmos_cli.core.data.cache import hash_file
from llmos_cli.errors import UserError

LOCK_VERSION = 1
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Libraries read the offline switch once, at import; these are the flags to flip when already imported.
OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))
LOCKED_PACKAGES = (
    "llmos-cli",
    "torch",
    "transformers",
    "datasets",
    "tokenizers",
    "peft",
    "safetensors",
    "accelerate",
)


class FileHashes:
    """sha256 of files, cached by (size, mtime) in pipeline.json so unchanged inputs are not re-read."""

    def __init__(self, cache: dict[str, list[Any]]):
        self.cache = cache

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = hash_file(path)
        self.cache[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def tree(self, path: Path) -> str:
        """A file's hash, or one hash over a folder's relative names and file hashes."""
        if path.is_file():
            return self.file(path)
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{self.file(f)}\n".encode())
        return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LOCKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = __version__ if name == "llmos-cli" else None
    return versions


def check_versions(locked: dict[str, str | None]) -> list[str]:
    """One line per package whose installed version differs from the locked one."""
    now = package_versions()
    return [
        f"{name} {want} locked, {now.get(name)} installed"
        for name, want in locked.items()
        if now.get(name, want) != want
    ]


def read_lock(path: Path) -> dict[str, Any]:
    try:
        lock = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"lock file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid llmos.lock ({err})") from None
    if not isinstance(lock, dict) or lock.get("lock_version") != LOCK_VERSION or "recipe" not in lock:
        raise UserError(f"{path}: not an llmos.lock this version reads (lock_version {LOCK_VERSION})")
    return lock


def verify_inputs(lock: dict[str, Any], path: Path) -> None:
    """Every locked input must exist with the locked contents."""
    hashes = FileHashes({})
    for name, digest in lock.get("inputs", {}).items():
        if not Path(name).exists():
            raise UserError(f"{path}: input {name} is missing", hint="restore it to replay this pipeline")
        if hashes.tree(Path(name)) != digest:
            raise UserError(
                f"{path}: input {name} changed since the lock was written",
                hint="restore the locked version, or `llmos run` the recipe to make a new lock",
            )


@contextmanager
def offline() -> Iterator[None]:
    """No Hugging Face Hub access for the duration (env vars and imported libraries' flags), then restore."""
    import huggingface_hub.constants  # noqa: F401 - imported so that its flag is set below

    saved_env = {var: os.environ.get(var) for var in OFFLINE_VARS}
    flags = [(sys.modules[m], attr) for m, attr in OFFLINE_FLAGS if m in sys.modules]
    saved_flags = [getattr(mod, attr) for mod, attr in flags]
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    for mod, attr in flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for (mod, attr), value in zip(flags, saved_flags, strict=True):
            setattr(mod, attr, value)
