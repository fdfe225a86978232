"""The local model library: an SQLite database under LLMOS_HOME of base models, runs and exports.

Every entry records its lineage: the parent model it came from, the recipe hash, the data
fingerprint, metrics, creation time and size on disk. Each operation opens its own connection
(so threads and processes never share one), the database runs in WAL mode with a busy timeout,
and every write is one `BEGIN IMMEDIATE` transaction, so concurrent writers queue instead of
failing with "database is locked".
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmos_cli.errors import UserError

Kind = Literal["base", "run", "export"]
KINDS = ("base", "run", "export")
BUSY_TIMEOUT_S = 60.0

# Schema migrations, applied in order; PRAGMA user_version records how many have run.
MIGRATIONS = (
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('base', 'run', 'export')),
        path TEXT NOT NULL UNIQUE,
        parent TEXT,
        recipe_hash TEXT,
        data_fingerprint TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        size_bytes INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        source TEXT
    );
    CREATE INDEX models_kind ON models (kind);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
COLUMNS = (
    "name",
    "kind",
    "path",
    "parent",
    "recipe_hash",
    "data_fingerprint",
    "metrics",
    "size_bytes",
    "created",
    "source",
)


def llmos_home() -> Path:
    """LLMOS_HOME, default ~/.llmos."""
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


def dir_size(path: Path) -> int:
    """Bytes under `path` (a file or a folder), not following links."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@dataclass
class ModelEntry:
    name: str
    kind: str
    path: str
    parent: str | None = None
    recipe_hash: str | None = None
    data_fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    created: float = 0.0
    source: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelEntry:
        values = dict(zip(COLUMNS, row, strict=True))
        values["metrics"] = json.loads(values["metrics"] or "{}")
        return cls(**values)

    def to_row(self) -> tuple[Any, ...]:
        values = asdict(self)
        values["metrics"] = json.dumps(self.metrics, sort_keys=True, default=str)
        return tuple(values[c] for c in COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL once. Switching needs an exclusive lock and SQLite answers "locked" at once, without
    its busy handler, while another connection reads: retry for a while, as the busy timeout would."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Registry:
    """The model library in `<home>/registry.db` (home: LLMOS_HOME, default ~/.llmos)."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home is not None else llmos_home()
        self.db_path = self.home / "registry.db"

    # ------------------------------------------------------------ connection and schema

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.home.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a write is exactly one transaction.
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
            yield conn
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.db_path}: the registry has schema version {version}, newer than this llmos "
                f"understands ({SCHEMA_VERSION})",
                hint="upgrade llmos, or point LLMOS_HOME at another folder",
            )
        with _transaction(conn):
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------ reads

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        """Entries, oldest first; `kind` filters to base, run or export."""
        query, args = f"SELECT {', '.join(COLUMNS)} FROM models", ()
        if kind is not None:
            _check_kind(kind)
            query, args = query + " WHERE kind = ?", (kind,)
        with self._connect() as conn:
            return [ModelEntry.from_row(r) for r in conn.execute(query + " ORDER BY created, name", args)]

    def find(self, ref: str) -> ModelEntry | None:
        """The entry named `ref`, or registered at path `ref`; None when there is none."""
        with self._connect() as conn:
            return _find(conn, ref)

    def get(self, ref: str) -> ModelEntry:
        entry = self.find(ref)
        if entry is None:
            raise self._missing(ref)
        return entry

    def lineage(self, ref: str) -> list[ModelEntry]:
        """The entry and its ancestors, nearest first (a parent that is not registered ends the chain)."""
        with self._connect() as conn:
            chain: list[ModelEntry] = []
            entry = _find(conn, ref)
            while entry is not None and entry.name not in {e.name for e in chain}:
                chain.append(entry)
                entry = _find(conn, entry.parent) if entry.parent else None
        if not chain:
            raise self._missing(ref)
        return chain

    # ------------------------------------------------------------ writes

    def add(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        kind: str = "base",
        parent: str | None = None,
        recipe_hash: str | None = None,
        data_fingerprint: str | None = None,
        metrics: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> ModelEntry:
        """Register the model at `path` under `name` (default: its folder's name). The name must be new."""
        _check_kind(kind)
        entry = self._entry(path, name, kind, parent, recipe_hash, data_fingerprint, metrics, source)
        with self._connect() as conn, _transaction(conn):
            for clash in (_find(conn, entry.name), _by_path(conn, entry.path)):
                if clash is not None:
                    raise UserError(
                        f"'{clash.name}' is already registered ({clash.path})",
                        hint="pick another --name, or `llmos models rm` the old entry first",
                    )
            _insert(conn, entry)
        return entry

    def register_run(
        self,
        path: str | Path,
        *,
        name: str,
        kind: str = "run",
        parent: str | None = None,
        recipe_hash: str | None = None,
        data_fingerprint: str | None = None,
        metrics: dict[str, Any] | None = None,
        source: str | None = None,
        suffix_clash: bool = False,
    ) -> ModelEntry:
        """Add or update the entry for `path` under `name` (a re-run replaces its own entry, under the
        name it asks for now). A `name` that belongs to another existing path is refused, or with
        `suffix_clash` (names llmos derives itself, such as an export's) becomes `name-2`, `name-3`, ...;
        the entry of a folder that no longer exists gives its name up."""
        _check_kind(kind)
        entry = self._entry(path, name, kind, parent, recipe_hash, data_fingerprint, metrics, source)
        with self._connect() as conn, _transaction(conn):
            holder = _select(conn, "name", entry.name)
            if holder is not None and holder.path != entry.path and not Path(holder.path).exists():
                conn.execute("DELETE FROM models WHERE name = ?", (holder.name,))  # its folder is gone
            elif holder is not None and holder.path != entry.path:
                if not suffix_clash:
                    raise name_taken(entry.name, holder)
                entry.name = _free_name(conn, entry.name)
            old = _by_path(conn, entry.path)
            if old is not None:
                conn.execute("DELETE FROM models WHERE name = ?", (old.name,))
            _insert(conn, entry)
        return entry

    def remove(self, ref: str) -> ModelEntry:
        """Forget an entry (its files stay where they are)."""
        with self._connect() as conn, _transaction(conn):
            entry = _find(conn, ref)
            if entry is None:
                raise self._missing(ref)
            conn.execute("DELETE FROM models WHERE name = ?", (entry.name,))
        return entry

    def _missing(self, ref: str) -> UserError:
        return UserError(f"no model '{ref}' in the registry ({self.db_path})", hint="see `llmos models list`")

    def _entry(
        self,
        path: str | Path,
        name: str | None,
        kind: str,
        parent: str | None,
        recipe_hash: str | None,
        data_fingerprint: str | None,
        metrics: dict[str, Any] | None,
        source: str | None,
    ) -> ModelEntry:
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise UserError(f"model not found: {p}")
        if name is None:
            name = p.parent.name if p.name == "final" else p.name
        if not name or name != name.strip() or "/" in name:
            raise UserError(
                f"invalid model name {name!r}: use a non-empty name without '/' or surrounding spaces"
            )
        return ModelEntry(
            name=name,
            kind=kind,
            path=str(p),
            parent=parent,
            recipe_hash=recipe_hash,
            data_fingerprint=data_fingerprint,
            metrics=dict(metrics or {}),
            size_bytes=dir_size(p),
            created=time.time(),
            source=source,
        )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; IMMEDIATE takes the write lock up front (waiting up to the busy
    timeout), so a reader never has to upgrade to a writer mid-transaction, which cannot wait."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _select(conn: sqlite3.Connection, where: str, value: str) -> ModelEntry | None:
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM models WHERE {where} = ?", (value,)).fetchone()
    return ModelEntry.from_row(row) if row else None


def _by_path(conn: sqlite3.Connection, path: str) -> ModelEntry | None:
    return _select(conn, "path", path)


def _find(conn: sqlite3.Connection, ref: str) -> ModelEntry | None:
    """By name, else by hub id of a pulled model, else by path (a run dir also matches its final/)."""
    entry = _select(conn, "name", ref) or _select(conn, "source", f"hf://{ref}")
    path = Path(ref).expanduser()
    if entry is None and path.exists():
        path = path.resolve()
        entry = _by_path(conn, str(path)) or _by_path(conn, str(path / "final"))
    return entry


def name_taken(name: str, holder: ModelEntry) -> UserError:
    """The refusal of a run name the library already gives another model."""
    return UserError(
        f"run.name: '{name}' is already registered for another model ({holder.path})",
        hint=f"--set run.name=NEW_NAME for this run, or `llmos models rm {name}` to give the name to it",
    )


def _free_name(conn: sqlite3.Connection, name: str) -> str:
    candidate, n = name, 1
    while _select(conn, "name", candidate) is not None:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _insert(conn: sqlite3.Connection, entry: ModelEntry) -> None:
    marks = ", ".join("?" for _ in COLUMNS)
    conn.execute(f"INSERT INTO models ({', '.join(COLUMNS)}) VALUES ({marks})", entry.to_row())


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown model kind '{kind}' (known: {', '.join(KINDS)})")


def register_run(
    path: str | Path,
    *,
    name: str,
    kind: str = "run",
    parent: str | None = None,
    recipe_hash: str | None = None,
    data_fingerprint: str | None = None,
    metrics: dict[str, Any] | None = None,
    source: str | None = None,
    suffix_clash: bool = False,
) -> ModelEntry | None:
    """Record a finished run (or export) in the registry and say under which name. Never fails the
    caller: a registry problem (read-only home, full disk, a newer schema, a name taken meanwhile)
    becomes a warning and None."""
    from llmos_cli.console import out

    try:
        entry = Registry().register_run(
            path,
            name=name,
            kind=kind,
            parent=parent,
            recipe_hash=recipe_hash,
            data_fingerprint=data_fingerprint,
            metrics=metrics,
            source=source,
            suffix_clash=suffix_clash,
        )
    except (OSError, sqlite3.Error, UserError, ValueError) as err:
        out.warn(f"could not record {path} in the model registry ({llmos_home()}): {err}")
        return None
    out.info(f"registered {entry.path} as '{entry.name}' (llmos models show {entry.name})")
    return entry


def check_name_free(name: str, path: Path) -> None:
    """Refuse `name` when the library gives it to a model other than the one at `path` (before a run,
    so that a clash is a choice the user makes, not a name found taken after hours of training)."""
    entry = lookup(name)
    if entry is None or entry.name != name or not Path(entry.path).exists():
        return
    if Path(entry.path) != path.expanduser().resolve():
        raise name_taken(name, entry)


def registered_path(ref: str) -> Path | None:
    """The folder of the model registered as `ref` (a name or pulled hub id), for loaders that accept
    registry names; None when `ref` is an existing path, is not registered, or the registry is unusable."""
    if Path(ref).expanduser().exists():
        return None
    entry = lookup(ref)
    return Path(entry.path) if entry else None


def lookup(ref: str) -> ModelEntry | None:
    """The entry `ref` names (a name, a pulled hub id or a registered path); None when there is none or
    the registry is unusable. A lookup never creates the library."""
    registry = Registry()
    if not registry.db_path.exists():
        return None
    try:
        return registry.find(ref)
    except (OSError, sqlite3.Error, UserError):
        return None


def public_name(path: str | Path) -> str | None:
    """How others can name the model at `path`: its Hugging Face Hub id (a pulled model, or a snapshot in
    the hub cache: `.../models--OWNER--NAME/snapshots/REV`), else its registered name; None if neither."""
    parts = Path(path).parts
    for folder, below in zip(parts, parts[1:], strict=False):
        if folder.startswith("models--") and below == "snapshots":
            return folder.removeprefix("models--").replace("--", "/")
    entry = lookup(str(path))
    if entry is None:
        return None
    if entry.source and entry.source.startswith("hf://"):
        return entry.source.removeprefix("hf://")
    return entry.name
