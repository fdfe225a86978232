"""Unwritable outputs are exit-2 errors naming the path; a full disk is one clear error and leaves no partial dirs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bench.tiny_model import build_tiny_llama

SHORT = ["--set", "train.max_steps=4", "--set", "train.save_every=2", "--set", "train.eval_every=100"]


def no_traceback(result) -> str:
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    return result.stderr


@pytest.mark.parametrize("key", ["run.output_dir", "data.output"])
@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_file_where_a_folder_is_expected(tmp_path, tiny_recipe, run_cli, key, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    path = blocker if where == "is a file" else blocker / "sub"
    result = run_cli("pretrain", tiny_recipe, "--set", f"{key}={path}", *SHORT)
    err = no_traceback(result)
    assert result.code == 2, err
    assert key in err and str(blocker) in err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_folder(tmp_path, tiny_recipe, run_cli):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli("pretrain", tiny_recipe, "--set", f"data.output={locked / 'data'}", *SHORT)
    finally:
        locked.chmod(0o755)
    assert result.code == 2 and "data.output" in no_traceback(result) and str(locked) in result.stderr


def test_export_out_is_a_file(tmp_path, run_cli):
    model = build_tiny_llama(tmp_path / "model")
    (tmp_path / "out").write_text("keep me")
    result = run_cli("export", model, "--out", tmp_path / "out")
    assert result.code == 2 and "--out" in no_traceback(result) and str(tmp_path / "out") in result.stderr
    assert (tmp_path / "out").read_text() == "keep me"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".partial" in p.name)


def test_disk_full_while_saving_a_checkpoint(tmp_path, tiny_recipe, run_cli, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_model

    def half_then_full(model, filename, *args, **kwargs):
        real(model, filename, *args, **kwargs)  # a whole file, then the next write fails
        disk_full()

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_full)
    result = run_cli("pretrain", tiny_recipe, *SHORT)
    err = no_traceback(result)
    assert result.code == 1, err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"disk full while writing {checkpoints / 'step-2'}; nothing half-written was left" in err
    assert list(checkpoints.iterdir()) == []
    assert not (tmp_path / "run" / "final").exists()


def test_disk_full_while_saving_the_final_model(tmp_path, tiny_recipe, run_cli, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    assert run_cli("data", tiny_recipe).code == 0  # the data stage saves a tokenizer too
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    result = run_cli("pretrain", tiny_recipe, *SHORT)
    err = no_traceback(result)
    assert result.code == 1, err
    assert f"disk full while writing {tmp_path / 'run' / 'final'}; nothing half-written was left" in err
    assert not (tmp_path / "run" / "final").exists() and leftovers(tmp_path / "run") == []


def test_disk_full_while_preparing_data(tmp_path, tiny_recipe, run_cli, monkeypatch):
    from llmos_cli.core.data import prepare as data

    monkeypatch.setattr(data, "write_rows", disk_full)
    result = run_cli("data", tiny_recipe)
    err = no_traceback(result)
    assert result.code == 1, err
    assert f"disk full while writing {tmp_path / 'data'}; nothing half-written was left" in err
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []


def test_permission_denied_names_the_setting_and_path(tmp_path, monkeypatch):
    from llmos_cli.core.writable import ensure_dir
    from llmos_cli.errors import UserError

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(
        UserError, match=rf"run.output_dir: cannot create {tmp_path / 'x'}: Permission denied"
    ):
        ensure_dir(tmp_path / "x", "run.output_dir")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_export_out_where_nothing_can_be_written(tmp_path, run_cli):
    model = build_tiny_llama(tmp_path / "model")
    result = run_cli("export", model, "--format", "hf", "--out", "/proc/nope")
    err = no_traceback(result)
    assert result.code == 2, err
    assert err.startswith("error: --out /proc/nope: /proc is not writable")
