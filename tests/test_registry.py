"""The model registry: entries with lineage, concurrent writers, schema versioning, `llmos models`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from llmos_cli.core.registry import SCHEMA_VERSION, Registry, register_run, registered_path
from llmos_cli.errors import UserError
from llmos_cli.stages import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def model_dir(root: Path, name: str, size: int = 10) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * size)
    return d


def test_add_show_lineage_and_remove(tmp_path: Path, home: Path) -> None:
    reg = Registry()
    base = reg.add(model_dir(tmp_path, "base", size=100))
    assert base.name == "base" and base.kind == "base" and base.size_bytes == 102
    run = reg.register_run(
        model_dir(tmp_path / "runs" / "ft", "final"),
        name="ft",
        parent="base",
        recipe_hash="abc",
        data_fingerprint="fp1",
        metrics={"loss": 1.5},
    )
    rerun = reg.register_run(
        tmp_path / "runs" / "ft" / "final", name="ignored", parent="base", metrics={"loss": 1.2}
    )
    assert rerun.name == "ft"  # the same path updates its own entry
    reg.register_run(
        model_dir(tmp_path, "onnx"), name="ft-onnx", kind="export", parent="ft", metrics={"x": 1}
    )

    assert [e.name for e in reg.list()] == ["base", "ft", "ft-onnx"]
    assert [e.name for e in reg.list("export")] == ["ft-onnx"]
    assert [e.name for e in reg.lineage("ft-onnx")] == ["ft-onnx", "ft", "base"]
    assert reg.get(str(tmp_path / "base")).name == "base"  # found by path too
    assert reg.get(str(tmp_path / "runs" / "ft")).name == "ft"  # a run dir names its final/
    assert (home / "registry.db").exists()
    assert run.metrics == {"loss": 1.5} and reg.get("ft").metrics == {"loss": 1.2}
    assert reg.get("ft").recipe_hash is None  # the re-run's entry replaces the old one whole

    with pytest.raises(UserError, match="already registered"):
        reg.add(tmp_path / "base", name="other")
    with pytest.raises(UserError, match="already registered"):
        reg.add(model_dir(tmp_path, "x"), name="base")
    assert reg.remove("ft-onnx").name == "ft-onnx"
    assert (tmp_path / "onnx").is_dir()  # files stay
    with pytest.raises(UserError, match="no model 'ft-onnx'"):
        reg.get("ft-onnx")


def test_run_names_are_made_unique(tmp_path: Path) -> None:
    reg = Registry()
    names = [reg.register_run(model_dir(tmp_path, f"r{i}"), name="run").name for i in range(3)]
    assert names == ["run", "run-2", "run-3"]


def test_schema_is_versioned_and_newer_schemas_are_refused(home: Path) -> None:
    reg = Registry()
    assert reg.list() == []
    with sqlite3.connect(home / "registry.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UserError, match="newer than this llmos"):
        reg.list()


def test_register_run_warns_instead_of_failing(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("LLMOS_HOME", str(blocker))
    assert register_run(model_dir(tmp_path, "m"), name="m") is None
    assert "could not record" in capsys.readouterr().err


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from llmos_cli.core.registry import Registry
    worker, root = int(sys.argv[1]), Path(sys.argv[2])
    reg = Registry()
    for i in range(25):
        reg.register_run(root / f"m{worker}-{i}", name=f"m{worker}-{i}", metrics={"i": i})
    """
)


def test_concurrent_writers_from_several_processes(tmp_path: Path, home: Path) -> None:
    """4 processes x 25 entries at once, starting on a database none has created yet."""
    root = tmp_path / "models"
    for w in range(4):
        for i in range(25):
            model_dir(root, f"m{w}-{i}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(w), str(root)], env=env, stderr=subprocess.PIPE, text=True
        )
        for w in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert not any("locked" in e for e in errors)
    entries = Registry().list()
    assert len(entries) == 100
    assert {e.name for e in entries} == {f"m{w}-{i}" for w in range(4) for i in range(25)}


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    for i in range(40):
        model_dir(tmp_path, f"t{i}")
    reg, failures = Registry(), []

    def write(start: int) -> None:
        try:
            for i in range(start, 40, 4):
                reg.register_run(tmp_path / f"t{i}", name="t")
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            failures.append(err)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(e.name for e in reg.list()) == sorted(["t"] + [f"t-{n}" for n in range(2, 41)])


def test_models_add_list_show_rm(tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "ft"
    model_dir(run, "final")
    assert models.add_model(model_dir(tmp_path, "base"), name="b")["name"] == "b"
    added = models.add_model(run, kind="run", parent="b")  # a run dir registers its final/
    assert added["name"] == "ft" and added["path"] == str((run / "final").resolve())
    listed = models.list_models()
    assert [m["name"] for m in listed] == ["b", "ft"] and "ft" in capsys.readouterr().err
    shown = models.show_model("ft")
    assert shown["lineage"] == ["ft", "b"] and shown["parent"] == "b"
    assert models.remove_model("ft", delete_files=True)["deleted_files"] and not (run / "final").exists()
    with pytest.raises(UserError, match="no model 'ft'"):
        models.show_model("ft")
    with pytest.raises(UserError, match="not found"):
        models.add_model(tmp_path / "missing")


def test_adapter_parent_is_its_base(tmp_path: Path) -> None:
    models.add_model(model_dir(tmp_path, "base"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "base")})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert models.add_model(adapter, kind="run")["parent"] == "base"


def test_pull_fails_clearly_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline mode is on"):
        models.pull_model("sentence-transformers/all-MiniLM-L6-v2")


def test_pull_downloads_safetensors_only_and_registers(tmp_path: Path, home: Path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(repo_id, *, revision, local_dir, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        model_dir(Path(local_dir).parent, Path(local_dir).name)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pulled = models.pull_model("org/tiny-model")
    assert pulled["name"] == "tiny-model" and pulled["source"] == "hf://org/tiny-model"
    assert pulled["path"] == str((home / "models" / "org--tiny-model").resolve())
    assert registered_path("org/tiny-model") == registered_path("tiny-model") == Path(pulled["path"])
    assert registered_path("unknown") is None
    assert "*.safetensors" in calls[0][2] and "*.bin" not in calls[0][2]
    with pytest.raises(UserError, match="already in the registry"):
        models.pull_model("org/tiny-model")

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(UserError, match="unreachable"):
        models.pull_model("org/other")
