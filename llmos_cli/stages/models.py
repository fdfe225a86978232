"""`llmos models list | show | add | rm | pull`: the local model library (see core.registry)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

from llmos_cli.console import out
from llmos_cli.core.models import adapter_base, check_weights, is_adapter_dir, resolve_model_dir
from llmos_cli.core.registry import ModelEntry, Registry
from llmos_cli.errors import UserError

# Files a pull fetches: configs, tokenizers and safetensors weights; never code or pickles by default.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.md"]
PICKLE_PATTERNS = ["*.bin"]


def list_models(kind: str | None = None) -> list[dict[str, Any]]:
    entries = Registry().list(kind)
    out.table(
        "models",
        ["name", "kind", "parent", "size", "created", "metrics", "path"],
        [
            (
                e.name,
                e.kind,
                e.parent or "-",
                human_size(e.size_bytes),
                _when(e.created),
                _short_metrics(e.metrics),
                e.path,
            )
            for e in entries
        ],
    )
    return [e.to_dict() for e in entries]


def show_model(ref: str) -> dict[str, Any]:
    """One entry with its lineage (the entry, its parent, the parent's parent, ...)."""
    chain = Registry().lineage(ref)
    entry = chain[0]
    rows: list[tuple[str, Any]] = [
        ("name", entry.name),
        ("kind", entry.kind),
        ("path", entry.path),
        ("parent", entry.parent or "-"),
        ("source", entry.source or "-"),
        ("recipe hash", entry.recipe_hash or "-"),
        ("data fingerprint", entry.data_fingerprint or "-"),
        ("size", human_size(entry.size_bytes)),
        ("created", _when(entry.created)),
        *((f"metric {k}", v) for k, v in entry.metrics.items()),
    ]
    rows.append(("lineage", " <- ".join(e.name for e in chain) + _unregistered_root(chain[-1])))
    out.table(f"model {entry.name}", ["what", "value"], rows)
    return {**entry.to_dict(), "lineage": [e.name for e in chain]}


def add_model(
    path: str | Path, *, name: str | None = None, kind: str = "base", parent: str | None = None
) -> dict[str, Any]:
    """Register a HF-format model dir or run dir (its final/); an adapter's base becomes its parent."""
    model_dir = resolve_model_dir(path)
    check_weights(model_dir, allow_pickle=True)
    if parent is None and is_adapter_dir(model_dir):
        parent = _parent_ref(adapter_base(model_dir))
    entry = Registry().add(model_dir, name=name, kind=kind, parent=parent)
    out.info(f"models: added {entry.name} ({entry.path}, {human_size(entry.size_bytes)})")
    return entry.to_dict()


def remove_model(ref: str, *, delete_files: bool = False) -> dict[str, Any]:
    """Forget an entry; with delete_files, delete its folder too."""
    entry = Registry().remove(ref)
    if delete_files:
        shutil.rmtree(entry.path, ignore_errors=True)
    out.info(f"models: removed {entry.name}" + (f" and deleted {entry.path}" if delete_files else ""))
    return {**entry.to_dict(), "deleted_files": delete_files}


def pull_model(
    hub_id: str, *, name: str | None = None, revision: str | None = None, allow_pickle: bool = False
) -> dict[str, Any]:
    """Download a model from the Hugging Face Hub into LLMOS_HOME/models and register it."""
    registry = Registry()
    dest = registry.home / "models" / (hub_id.replace("/", "--") + (f"@{revision}" if revision else ""))
    name = name or hub_id.split("/")[-1] + (f"@{revision}" if revision else "")
    if registry.find(name) is not None:
        raise UserError(
            f"'{name}' is already in the registry", hint="pass --name, or `llmos models rm` it first"
        )
    if not dest.exists():
        _download(hub_id, revision, dest, allow_pickle)
    check_weights(dest, allow_pickle)
    entry = registry.add(
        dest, name=name, kind="base", source=f"hf://{hub_id}" + (f"@{revision}" if revision else "")
    )
    out.info(f"models: pulled {hub_id} as {entry.name} ({human_size(entry.size_bytes)})")
    return entry.to_dict()


def _download(hub_id: str, revision: str | None, dest: Path, allow_pickle: bool) -> None:
    """snapshot_download into a partial folder (resumable), renamed into place when complete."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise UserError(
            f"cannot pull {hub_id}: offline mode is on (HF_HUB_OFFLINE=1)",
            hint="unset HF_HUB_OFFLINE on a machine with internet access, or `llmos models add PATH` a local copy",
        )
    partial = dest.parent / f"{dest.name}.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    patterns = PULL_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        snapshot_download(hub_id, revision=revision, local_dir=partial, allow_patterns=patterns)
    except HFValidationError as err:
        raise UserError(f"'{hub_id}' is not a valid hub id (expected OWNER/NAME): {err}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(
            f"cannot pull {hub_id}: not found on the Hugging Face Hub ({type(err).__name__})"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, OSError) as err:
        raise UserError(
            f"cannot pull {hub_id}: the Hugging Face Hub is unreachable ({type(err).__name__})",
            hint="check the network, or `llmos models add PATH` a local copy",
        ) from None
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    partial.rename(dest)


def _parent_ref(base: str) -> str:
    """A base model's registry name when it is registered, else the reference as given."""
    entry = Registry().find(base)
    return entry.name if entry else base


def _unregistered_root(root: ModelEntry) -> str:
    return f" <- {root.parent} (not registered)" if root.parent else ""


def human_size(n: int) -> str:
    units, size, i = ("B", "KB", "MB", "GB", "TB"), float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{n} B" if i == 0 else f"{size:.1f} {units[i]}"


def _when(created: float) -> str:
    return dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")


def _short_metrics(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:3]]
    return " ".join(shown) or "-"
