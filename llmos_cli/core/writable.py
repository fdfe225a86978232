"""Output folders the user names: refuse unwritable ones up front, and turn a full disk into one clear error."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmos_cli.errors import RunFailed, UserError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def ensure_dir(path: Path, what: str) -> Path:
    """Create folder `path` (what: the setting that names it); a path that cannot be one is a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what}: {path} is a file, not a folder", hint="choose another path") from None
    except NotADirectoryError:
        raise UserError(
            f"{what}: cannot create {path}: a part of that path is a file", hint="choose another path"
        ) from None
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise RunFailed(f"disk full while creating {path}") from None
        raise UserError(
            f"{what}: cannot create {path}: {err.strerror}", hint="choose a writable folder"
        ) from None
    _probe_write(path, what)
    return path


def _probe_write(path: Path, what: str) -> None:
    """Create and remove a file in `path`: permission bits do not tell root (or a pseudo filesystem such as
    /proc, or a read-only mount) whether a write will succeed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmos-write-check.", dir=path)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise RunFailed(f"disk full while writing in {path}") from None
        raise UserError(
            f"{what}: {path} is not writable ({err.strerror})", hint="choose a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def disk_full_is_clear(path: Path) -> Iterator[None]:
    """Re-raise ENOSPC/EDQUOT from the writes inside as RunFailed naming `path`.

    The writers inside must clean up their temp files on failure (they do: temp dir, then rename).
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise RunFailed(f"disk full while writing {path}; nothing half-written was left") from err


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere it is set and restored, which briefly races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: Path) -> None:
    """Give `path` (a folder: and all it holds) the permissions a plain open() or mkdir() would get.

    Temp files and folders (mkstemp, mkdtemp) and some writers (transformers' safetensors files) are
    owner-only; a published model, dataset or report should be readable as the user's umask allows.
    """
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                os.chmod(child, dir_mode if name in dirs else file_mode)
