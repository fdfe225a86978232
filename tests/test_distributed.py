"""Training on several processes (torchrun, gloo on CPU) follows the one-process run exactly.

Two processes share the global batch (batch_size x grad_accum rows per step), so their loss curve
equals the one-process curve; checkpoints hold full states and resume on any process count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmos_cli.core.distributed import ShardedBatchSampler, World, torchrun_command
from llmos_cli.core.train.batches import ResumableBatchSampler
from llmos_cli.errors import UserError
from llmos_cli.recipe import load_recipe
from llmos_cli.stages import pretrain
from tests.conftest import TINY_MODEL, toy_documents, write_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrain recipe (global batch 8 x 2 rows) and its data, prepared once for every run."""
    ws = tmp_path_factory.mktemp("dist")
    (ws / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_documents()))
    write_recipe(
        ws / "recipe.yaml",
        {
            "run": {"name": "tiny", "output_dir": str(ws / "single"), "seed": 0},
            "model": {"arch": "llama", "config": TINY_MODEL},
            "data": {
                "train": "corpus.jsonl",
                "validation_split": 0.1,
                "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                "max_seq_len": 32,
                "output": str(ws / "data"),
            },
            "train": {
                "max_steps": STEPS,
                "precision": "fp32",  # subprocesses measure auto themselves; the curves compare fp32
                "batch_size": 8,
                "grad_accum": 2,
                "lr": 3e-3,
                "warmup": 0.1,
                "log_every": 5,
                "eval_every": 10,
                "save_every": 10,
                "keep_last": 3,
            },
        },
    )
    with _module_home(ws):
        pretrain.run(load_recipe(ws / "recipe.yaml"))  # the one-process reference; also prepares the data
    return ws


@contextlib.contextmanager
def _module_home(ws: Path) -> Iterator[None]:
    """The model library of the module-scoped runs: their own, not ~/.llmos (the per-test home of
    conftest is not set up yet when a module fixture runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOS_HOME", str(ws / "llmos-home"))
        yield


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _curve(run: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("split", "train"), r["loss"]) for r in rows]


def _assert_same_curve(a: Path, b: Path) -> None:
    ca, cb = _curve(a), _curve(b)
    assert [(s, k) for s, k, _ in ca] == [(s, k) for s, k, _ in cb]
    assert max(abs(x - y) for (_, _, x), (_, _, y) in zip(ca, cb, strict=True)) < 1e-4


@pytest.fixture(scope="module")
def ddp_run(workspace: Path) -> tuple[Path, dict]:
    """`llmos --json pretrain recipe.yaml --nproc 2`: the launcher execs torchrun, 2 gloo processes."""
    run = workspace / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "llmos_cli",
        "--json",
        "pretrain",
        str(workspace / "recipe.yaml"),
        "--nproc",
        "2",
    ]
    with _module_home(workspace):
        proc = _run([*cmd, "--set", f"run.output_dir={run}", "--set", "run.name=ddp"], workspace)
    return run, json.loads(proc.stdout)  # one JSON document: only rank 0 printed its result


def test_two_processes_follow_the_one_process_loss_curve(workspace: Path, ddp_run: tuple[Path, dict]) -> None:
    run, summary = ddp_run
    _assert_same_curve(workspace / "single", run)  # one row per log: rank 0 alone writes metrics
    rows = [json.loads(line) for line in (workspace / "single" / "metrics.jsonl").read_text().splitlines()]
    single_tokens = [r["tokens"] for r in rows if "split" not in r][-1]
    assert summary["steps"] == STEPS and summary["tokens"] == single_tokens  # counted over both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-20"]
    assert (run / "final" / "model.safetensors").exists()


def test_checkpoint_from_two_processes_resumes_on_one(workspace: Path, ddp_run: tuple[Path, dict]) -> None:
    run = workspace / "ddp-resumed"
    shutil.copytree(ddp_run[0], run)
    shutil.rmtree(run / "checkpoints" / "step-20")
    shutil.rmtree(run / "final")
    result = pretrain.run(load_recipe(workspace / "recipe.yaml", [f"run.output_dir={run}"]))
    assert result["steps"] == STEPS
    _assert_same_curve(workspace / "single", run)


def test_fsdp_on_two_processes_trains_saves_plain_final_and_resumes_on_one(workspace: Path) -> None:
    """FSDP with gradient accumulation: each rank runs 2 micro-batches of 4 rows per step.

    4 x 4 rows per step draw the same rows, in the same order, as the reference's 8 x 2 (the
    sampler's permutation does not depend on the batch size), so the curves must agree.
    """
    run = workspace / "fsdp"
    sets = [f"run.output_dir={run}", "train.batch_size=4", "train.grad_accum=4"]
    cmd = torchrun_command(2, ["pretrain", str(workspace / "recipe.yaml"), *(f"--set={s}" for s in sets)])
    cmd[cmd.index("--standalone")] = f"--master_port={_free_port()}"  # plain torchrun, env rendezvous
    _run([*cmd, "--set", "train.distributed=fsdp"], workspace)
    _assert_same_curve(workspace / "single", run)

    from transformers import AutoModelForCausalLM  # plain transformers, no llmos

    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    reference = AutoModelForCausalLM.from_pretrained(str(workspace / "single" / "final"))
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-4), name

    shutil.rmtree(run / "checkpoints" / "step-20")  # the sharded run's checkpoint, resumed on one process
    pretrain.run(load_recipe(workspace / "recipe.yaml", sets))
    _assert_same_curve(workspace / "single", run)


def test_fsdp_keeps_the_best_weights(workspace: Path) -> None:
    """keep_best under FSDP: shards are gathered for best.safetensors and scattered back at the end.

    Watching the loss with mode=max makes step 10 the best evaluation, so final/ must hold the
    step-10 weights, which differ from the step-20 ones.
    """
    from safetensors.torch import load_file

    run = workspace / "fsdp-best"
    watch = json.dumps({"metric": "loss", "mode": "max", "patience": 5})
    sets = [f"run.output_dir={run}", "train.keep_best=true", f"train.early_stopping={watch}"]
    cmd = torchrun_command(2, ["pretrain", str(workspace / "recipe.yaml"), *(f"--set={s}" for s in sets)])
    cmd[cmd.index("--standalone")] = f"--master_port={_free_port()}"
    _run([*cmd, "--set", "train.distributed=fsdp"], workspace)

    final = load_file(str(run / "final" / "model.safetensors"))
    best = load_file(str(run / "checkpoints" / "best.safetensors"))
    step10 = load_file(str(run / "checkpoints" / "step-10" / "model.safetensors"))
    step20 = load_file(str(run / "checkpoints" / "step-20" / "model.safetensors"))
    assert best.keys() <= step10.keys() and "model.layers.0.self_attn.q_proj.weight" in best
    for name, tensor in best.items():
        assert torch.equal(tensor, step10[name]) and torch.equal(final[name], step10[name]), name
    assert not torch.equal(final["model.norm.weight"], step20["model.norm.weight"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_split_each_global_step_in_the_one_process_order(world_size: int) -> None:
    def steps(sampler, n_steps: int) -> list[list[int]]:
        it = iter(sampler)
        return [[i for _ in range(sampler.micro_per_step) for i in next(it)] for _ in range(n_steps)]

    one = steps(ShardedBatchSampler(ResumableBatchSampler(50, 6, seed=3, start_batch=4), 2, World()), 12)
    ranks = [
        steps(ShardedBatchSampler(ResumableBatchSampler(50, 6, 3, 4), 2, World(r, r, world_size)), 12)
        for r in range(world_size)
    ]
    for s, rows in enumerate(one):
        assert [i for rank in ranks for i in rank[s]] == rows


def test_one_process_yields_the_global_batches_unchanged() -> None:
    plain = iter(ResumableBatchSampler(40, 8, seed=1, start_batch=3))
    sharded = iter(ShardedBatchSampler(ResumableBatchSampler(40, 8, seed=1, start_batch=3), 3, World()))
    assert [next(sharded) for _ in range(12)] == [next(plain) for _ in range(12)]


def test_a_step_that_does_not_split_over_the_processes_is_refused() -> None:
    with pytest.raises(UserError, match="do not split evenly over 4 processes"):
        ShardedBatchSampler(ResumableBatchSampler(40, 3, seed=0), 1, World(0, 0, 4))


def test_an_error_every_rank_hits_is_shown_once_with_its_exit_code(workspace: Path) -> None:
    cmd = [sys.executable, "-m", "llmos_cli", "pretrain", str(workspace / "recipe.yaml"), "--nproc", "2"]
    proc = subprocess.run(
        [*cmd, "--set", "train.batch_size=100000", "--set", f"run.output_dir={workspace / 'too-big'}"],
        cwd=workspace,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("train.batch_size: 100000 is larger than the training set") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_the_launcher_repeats_what_only_other_ranks_said(tmp_path: Path, capsys) -> None:
    from types import SimpleNamespace

    from llmos_cli.core.launch import _report

    (tmp_path / "error-rank-0.txt").write_text("error: bad recipe\n")
    (tmp_path / "error-rank-1.txt").write_text("error: bad recipe\n")  # shown by rank 0 already
    (tmp_path / "error-rank-2.txt").write_text("error: disk full\n")
    (tmp_path / "run" / "attempt_0" / "3").mkdir(parents=True)
    (tmp_path / "run" / "attempt_0" / "3" / "stderr.log").write_text("loading\nSegmentation fault\n")
    failures = {
        0: SimpleNamespace(local_rank=0, exitcode=-15, timestamp=9),  # stopped by the agent
        1: SimpleNamespace(local_rank=1, exitcode=2, timestamp=8),
        2: SimpleNamespace(local_rank=2, exitcode=2, timestamp=7),
        3: SimpleNamespace(local_rank=3, exitcode=-11, timestamp=6),  # a segfault: no message
        4: SimpleNamespace(local_rank=4, exitcode=-15, timestamp=9),  # stopped by the agent
    }
    code, message, crashed = _report(failures, tmp_path)
    assert (code, message, crashed) == (128 + 11, None, True)  # the first failure's code
    err = capsys.readouterr().err
    assert "bad recipe" not in err and "rank 2: error: disk full" in err and "rank 4" not in err
    assert "rank 3 failed (killed by SIGSEGV)" in err and err.rstrip().endswith("Segmentation fault")

    (tmp_path / "error-rank-0.txt").unlink()  # rank 0 said nothing: the first failure's words go to --json
    code, message, _ = _report({0: failures[0], 2: failures[2]}, tmp_path)
    assert (code, message) == (2, "disk full")

    # The agent stopped rank 0 within the same second as rank 2 failed: rank 2's exit is the cause.
    same_second = {0: SimpleNamespace(local_rank=0, exitcode=-15, timestamp=7), 2: failures[2]}
    code, message, _ = _report(same_second, tmp_path)
    assert (code, message) == (2, "disk full")


def test_nproc_under_torchrun_is_refused(workspace: Path, run_cli, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = run_cli("pretrain", workspace / "recipe.yaml", "--nproc", "2")
    assert res.code == 2 and "already running under torchrun" in res.stderr
