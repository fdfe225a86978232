"""The model registry: entries with lineage, concurrent writers, schema versioning, `llmos models`."""

from __future__ import annotations

import json
import os
import shutil
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
        tmp_path / "runs" / "ft" / "final", name="ft", parent="base", metrics={"loss": 1.2}
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


def test_a_run_name_another_model_holds_is_refused_not_suffixed(tmp_path: Path) -> None:
    reg = Registry()
    assert reg.register_run(model_dir(tmp_path, "r0"), name="run").name == "run"
    with pytest.raises(UserError, match=r"run.name: 'run' is already registered for another model") as err:
        reg.register_run(model_dir(tmp_path, "r1"), name="run")
    assert "--set run.name=" in err.value.hint
    assert [e.name for e in reg.list()] == ["run"]
    shutil.rmtree(tmp_path / "r0")  # a run folder deleted since: its entry gives the name up
    assert reg.register_run(tmp_path / "r1", name="run").path == str((tmp_path / "r1").resolve())
    assert [e.name for e in reg.list()] == ["run"]


def test_a_rerun_in_the_same_directory_takes_its_new_name(tmp_path: Path) -> None:
    # the cause of a llama run registered as `arch-bert-3`: a rerun kept the old entry's name
    reg = Registry()
    reg.register_run(model_dir(tmp_path, "runs"), name="arch-bert")
    assert reg.register_run(tmp_path / "runs", name="arch-llama").name == "arch-llama"
    assert [e.name for e in reg.list()] == ["arch-llama"]


def test_derived_names_are_made_unique(tmp_path: Path) -> None:
    reg = Registry()
    names = [
        reg.register_run(model_dir(tmp_path, f"r{i}"), name="m-hf", kind="export", suffix_clash=True).name
        for i in range(3)
    ]
    assert names == ["m-hf", "m-hf-2", "m-hf-3"]


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
                reg.register_run(tmp_path / f"t{i}", name="t", suffix_clash=True)
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


def test_a_run_says_its_registered_name_and_a_clash_is_refused_before_it_starts(
    tiny_recipe: Path, tmp_path: Path, run_cli
) -> None:
    res = run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=2")
    assert res.code == 0, res.stderr
    assert f"registered {(tmp_path / 'run' / 'final').resolve()} as 'tiny'" in " ".join(res.stderr.split())
    elsewhere = ["--set", "train.max_steps=2", "--set", f"run.output_dir={tmp_path / 'other'}"]
    for dry_run in (["--dry-run"], []):
        res = run_cli("pretrain", tiny_recipe, *elsewhere, *dry_run)
        said = " ".join(res.stderr.split())
        assert res.code == 2 and "run.name: 'tiny' is already registered for another model" in said
        assert "--set run.name=NEW_NAME" in said
        assert not (tmp_path / "other").exists()  # refused before recipe.yaml was written
    res = run_cli("pretrain", tiny_recipe, *elsewhere, "--set", "run.name=tiny-2nd")
    assert res.code == 0 and "as 'tiny-2nd'" in res.stderr
    assert run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=2").code == 0  # its own name again
