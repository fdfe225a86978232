"""Bad inputs everywhere: each is refused with the right exit code or status, names the problem, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.tiny_model import build_tiny_llama
from tests.conftest import TINY_MODEL, write_recipe
from tests.test_server import KEY, runner, server  # noqa: F401 - fixtures: a tiny model on loopback uvicorn


def recipe_body(tmp_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "run": {"name": "bad", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"arch": "llama", "config": TINY_MODEL},
        "data": {
            "train": "corpus.jsonl",
            "validation_split": 0.1,
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
            "max_seq_len": 32,
            "output": str(tmp_path / "data"),
            **data,
        },
        "train": {"max_steps": 2, "batch_size": 4},
    }


def assert_refused(result: Any, code: int, *names: str) -> None:
    text = result.stdout + result.stderr
    assert result.code == code, text
    assert "Traceback" not in text
    for name in names:
        assert name in result.stderr, (name, result.stderr)


# ---------------------------------------------------------------- recipes


def _edit(body: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        body = body.setdefault(p, {})
    body[last] = value


RECIPE_CASES = {
    "typo key": ("train.lrr", 0.1, ["train.lrr"]),
    "typo section": ("trian", {"lr": 0.1}, ["trian"]),
    "wrong type": ("train.max_steps", "many", ["train.max_steps"]),
    "negative lr": ("train.lr", -1.0, ["train.lr"]),
    "bad enum": ("data.format", "csv", ["data.format"]),
    "bad on_error": ("data.on_error", "ignore", ["data.on_error"]),
    "list for a number": ("train.batch_size", [1, 2], ["train.batch_size"]),
}


@pytest.mark.parametrize("key, value, names", RECIPE_CASES.values(), ids=list(RECIPE_CASES))
def test_bad_recipe_values(tmp_path, corpus, run_cli, key, value, names):
    body = recipe_body(tmp_path)
    _edit(body, key, value)
    recipe = write_recipe(tmp_path / "r.yaml", body)
    assert_refused(run_cli("recipe", "validate", recipe), 2, "r.yaml", *names)


def test_extends_cycle(tmp_path, run_cli):
    write_recipe(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_recipe(tmp_path / "b.yaml", {"extends": "a.yaml"})
    assert_refused(run_cli("recipe", "validate", tmp_path / "a.yaml"), 2, "a.yaml", "b.yaml")


def test_missing_extends_file(tmp_path, run_cli):
    write_recipe(tmp_path / "a.yaml", {"extends": "gone.yaml"})
    assert_refused(run_cli("recipe", "validate", tmp_path / "a.yaml"), 2, "gone.yaml")


def test_recipe_is_not_yaml(tmp_path, run_cli):
    (tmp_path / "r.yaml").write_text("train: [unclosed\n")
    assert_refused(run_cli("recipe", "validate", tmp_path / "r.yaml"), 2, "r.yaml")


def test_missing_recipe_file(tmp_path, run_cli):
    assert_refused(run_cli("recipe", "validate", tmp_path / "nope.yaml"), 2, "nope.yaml")


def test_json_mode_reports_the_error_on_stdout_too(tmp_path, run_cli):
    res = run_cli("--json", "pretrain", tmp_path / "nope.yaml")
    assert res.code == 2 and "nope.yaml" in res.stderr
    assert json.loads(res.stdout) == {
        "error": f"recipe file not found: {tmp_path / 'nope.yaml'}",
        "exit_code": 2,
    }


SET_CASES = {
    "no equals": ("train.lr", ["train.lr"]),
    "unknown key": ("train.lrr=1", ["train.lrr"]),
    "wrong type": ("train.max_steps=abc", ["train.max_steps"]),
    "empty key": ("=3", ["=3"]),
    "through a scalar": ("train.lr.x=1", ["train.lr"]),
}


@pytest.mark.parametrize("override, names", SET_CASES.values(), ids=list(SET_CASES))
def test_bad_set_overrides(tmp_path, corpus, run_cli, override, names):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_body(tmp_path))
    assert_refused(run_cli("recipe", "validate", recipe, "--set", override), 2, *names)


# ---------------------------------------------------------------- data rows


def _rows(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = [{"text": f"the cat sat on the mat number {i}"} for i in range(20)]

DATA_CASES = {
    "bad json": ({"corpus.jsonl": _rows(*GOOD[:3], "{not json", *GOOD)}, {}, ["corpus.jsonl", "4"]),
    "bad utf-8": (  # strict UTF-8; `auto` would read these bytes as cp1252
        {"corpus.jsonl": _rows(*GOOD[:2]).encode() + b'{"text": "\xff\xfe"}\n'},
        {"encoding": "utf-8"},
        ["corpus.jsonl"],
    ),
    "missing field": (
        {"corpus.jsonl": _rows(*GOOD[:5], {"body": "x"}, *GOOD)},
        {},
        ["corpus.jsonl", "6", "text"],
    ),
    "wrong field type": (
        {"corpus.jsonl": _rows(*GOOD[:1], {"text": 5}, *GOOD)},
        {},
        ["corpus.jsonl", "2", "text"],
    ),
    "empty file": ({"corpus.jsonl": ""}, {}, ["corpus.jsonl"]),
    "no files match a glob": ({}, {"train": "shards/*.jsonl"}, ["shards/*.jsonl"]),
    "missing file": ({}, {"train": "gone.jsonl"}, ["gone.jsonl"]),
    "row is not an object": ({"corpus.jsonl": _rows(*GOOD[:2], [1, 2], *GOOD)}, {}, ["corpus.jsonl", "3"]),
    "text_field absent": ({"corpus.jsonl": _rows(*GOOD)}, {"text_field": "body"}, ["corpus.jsonl", "body"]),
}


@pytest.mark.parametrize("files, data, names", DATA_CASES.values(), ids=list(DATA_CASES))
def test_bad_data_rows(tmp_path, run_cli, files, data, names):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = write_recipe(tmp_path / "r.yaml", recipe_body(tmp_path, **data))
    assert_refused(run_cli("data", recipe), 2, *names)
    assert not (tmp_path / "data").exists()


def test_on_error_skip_quarantines_bad_rows(tmp_path, run_cli):
    (tmp_path / "corpus.jsonl").write_text(_rows(*GOOD[:3], "{not json", {"body": 1}, *GOOD))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_body(tmp_path, on_error="skip"))
    result = run_cli("data", recipe)
    assert result.code == 0, result.stderr
    quarantined = (tmp_path / "data" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantined) == 2 and "Traceback" not in result.stderr


# ---------------------------------------------------------------- CLI arguments and model dirs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model"))


def pickle_only(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def tokenizer_less(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def weightless(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    return dst


CLI_CASES = {
    "unknown flag": (["generate", "{model}", "--prompt", "hi", "--temprature", "1"], "--temprature"),
    "missing argument": (["generate"], "model"),
    "bad flag value": (
        ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "zero"],
        "--max-new-tokens",
    ),
    "both prompt and input": (["generate", "{model}", "--prompt", "hi", "--input", "p.jsonl"], "--prompt"),
    "neither prompt nor input": (["generate", "{model}"], "--prompt"),
    "input file missing": (["generate", "{model}", "--input", "{tmp}/p.jsonl"], "p.jsonl"),
    "unknown verb": (["pretrian", "r.yaml"], "pretrian"),
    "serve a missing model": (["serve", "{tmp}/nowhere"], "nowhere"),
    "generate from a missing model": (["generate", "{tmp}/nowhere", "--prompt", "hi"], "nowhere"),
    "export a dir without weights": (["export", "{weightless}", "--out", "{tmp}/x"], "no model weights"),
    "export an unknown format": (["export", "{model}", "--format", "tflite", "--out", "{tmp}/x"], "tflite"),
    "pickle weights refused": (["generate", "{pickle}", "--prompt", "hi"], "--allow-pickle"),
    "export pickle refused": (["export", "{pickle}", "--out", "{tmp}/x"], "--allow-pickle"),
    "no tokenizer": (["generate", "{notok}", "--prompt", "hi"], "tokenizer"),
}


@pytest.mark.parametrize("args, name", CLI_CASES.values(), ids=list(CLI_CASES))
def test_bad_cli_arguments(tmp_path, tiny_model, run_cli, args, name):
    paths = {
        "model": tiny_model,
        "tmp": tmp_path,
        "pickle": pickle_only(tiny_model, tmp_path / "pickled"),
        "notok": tokenizer_less(tiny_model, tmp_path / "notok"),
        "weightless": weightless(tiny_model, tmp_path / "weightless"),
    }
    result = run_cli(*(a.format(**paths) for a in args))
    assert_refused(result, 2, name)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- HTTP requests

AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

HTTP_CASES = {
    "malformed json": ("/v1/completions", b'{"prompt": "hi",', AUTH, 400, None),
    "json is not an object": ("/v1/completions", b"[1, 2]", AUTH, 400, None),
    "unknown model": ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, AUTH, 400, "model"),
    "max_tokens zero": ("/v1/completions", {**COMPLETION, "max_tokens": 0}, AUTH, 400, "max_tokens"),
    "max_tokens over the window": (
        "/v1/completions",
        {**COMPLETION, "max_tokens": 10**6},
        AUTH,
        400,
        "max_tokens",
    ),
    "n over the bound": ("/v1/completions", {**COMPLETION, "n": 17}, AUTH, 400, "n"),
    "max_tokens wrong type": (
        "/v1/completions",
        {**COMPLETION, "max_tokens": "four"},
        AUTH,
        400,
        "max_tokens",
    ),
    "temperature wrong type": (
        "/v1/completions",
        {**COMPLETION, "temperature": [1]},
        AUTH,
        400,
        "temperature",
    ),
    "missing prompt": ("/v1/completions", {"model": "tiny"}, AUTH, 400, "prompt"),
    "missing messages": ("/v1/chat/completions", {"model": "tiny", "max_tokens": 4}, AUTH, 400, "messages"),
    "empty messages": ("/v1/chat/completions", {**CHAT, "messages": []}, AUTH, 400, "messages"),
    "bad role": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        AUTH,
        400,
        "messages",
    ),
    "chat max_tokens wrong type": (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": {}},
        AUTH,
        400,
        "max_tokens",
    ),
    "no api key": ("/v1/completions", COMPLETION, {}, 401, None),
    "wrong api key": ("/v1/chat/completions", CHAT, {"Authorization": "Bearer nope"}, 401, None),
    "body too large": ("/v1/completions", {**COMPLETION, "prompt": "x" * 10_000}, AUTH, 413, None),
}


@pytest.mark.parametrize("path, body, headers, status, param", HTTP_CASES.values(), ids=list(HTTP_CASES))
def test_bad_requests(server, path, body, headers, status, param):  # noqa: F811
    url = server[0] + path
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"].startswith(param) and param in error["message"], error
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_status_lines_are_not_wrapped_in_a_pipe(capsys):
    from llmos_cli.console import out

    long = "train: " + "word " * 40
    out.info(long)
    assert capsys.readouterr().err == long + "\n"
