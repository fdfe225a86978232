"""Shared fixtures: offline mode, a learnable toy corpus, tiny recipes and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def wait_until(
    ready: Callable[[], bool],
    *,
    alive: Callable[[], bool],
    what: str | Callable[[], object],
    timeout: float,
    interval: float = 0.05,
) -> None:
    """Poll `ready` while `alive` holds; fail (with `what`, a message or a function giving one) when the
    process died or `timeout` passed. A bound against hangs, not a timing check."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive() or time.monotonic() > deadline:
            pytest.fail(str(what() if callable(what) else what))
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _llmos_home(tmp_path_factory, monkeypatch):
    """Runs register themselves in the model library: keep every test's library private."""
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path_factory.mktemp("llmos-home")))


@pytest.fixture(autouse=True)
def _no_bf16_gain(request, monkeypatch):
    """`precision: auto` on a CPU measures bf16 against fp32, and some CPUs pick bf16: the tests compare
    numbers with fp32 references, so the probe measures no gain unless a test is marked `precision_probe`."""
    if request.node.get_closest_marker("precision_probe") is None:
        monkeypatch.setattr("llmos_cli.core.precision_probe.measure_bf16_speedup", lambda shape: 1.0)


@pytest.fixture(autouse=True)
def _plain_console():
    """`--json` / `--quiet` set the process-wide output mode: every test starts from the default."""
    from llmos_cli.console import configure

    configure()


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Run `llmos ARGS` in-process; returns exit code, stdout and stderr."""
    from llmos_cli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def toy_documents(n: int = 400, seed: int = 0) -> list[str]:
    """Short, highly regular sentences a tiny model learns within a few dozen steps."""
    rng = random.Random(seed)
    animals = ["cat", "dog", "bird", "fish", "fox", "owl"]
    places = ["mat", "log", "tree", "pond", "box", "hill"]
    docs = []
    for i in range(n):
        a, p = rng.choice(animals), rng.choice(places)
        count = " ".join(str(k) for k in range(i % 7, i % 7 + 6))
        docs.append(f"the {a} sat on the {p}. the {a} likes the {p}. {count}. note {i}.")
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_documents()))
    return path


def write_recipe(path: Path, body: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path, corpus: Path) -> Path:
    """A complete pretrain recipe on the toy corpus: tiny llama, 30 steps, outputs under tmp_path."""
    return write_recipe(
        tmp_path / "recipe.yaml",
        {
            "run": {"name": "tiny", "output_dir": str(tmp_path / "run"), "seed": 0},
            "model": {"arch": "llama", "config": TINY_MODEL},
            "data": {
                "train": corpus.name,
                "validation_split": 0.1,
                "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                "max_seq_len": 32,
                "output": str(tmp_path / "data"),
            },
            "train": {
                "max_steps": 30,
                "batch_size": 8,
                "lr": 3e-3,
                "warmup": 0.1,
                "log_every": 5,
                "eval_every": 15,
                "save_every": 10,
                "keep_last": 2,
            },
        },
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` are skipped, never failed, on a machine without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU box)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
