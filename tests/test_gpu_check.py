"""The GPU check's CPU-runnable parts: the wheel folder (pip mocked), the `cuda` test selection (one test
per stage, skipped here), and the whole script on a tiny model with `--device cpu --tiny`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {gpu_check.canonical(Requirement(r).name) for r in requirements}


def test_the_wheel_folder_holds_the_project_but_not_the_boxs_torch_stack() -> None:
    wanted = names(gpu_check.project_requirements())
    assert {"datasets", "fastapi", "uvicorn", "httpx", "gguf", "bitsandbytes", "evaluate", "pytest"} <= wanted
    assert {"typer", "rich", "pydantic", "pyyaml", "safetensors", "tokenizers", "pytest-timeout"} <= wanted
    assert not wanted & {"torch", "transformers", "peft", "accelerate", "llmos-cli"}
    report = {
        "install": [
            {"metadata": {"name": n, "version": v}}
            for n, v in [("torch", "2.9.0"), ("nvidia-cublas-cu12", "12.8"), ("triton", "3.5"), ("peft", "0.17"),
                         ("Datasets", "4.1.0"), ("fastapi", "0.115.0"), ("llmos_cli", "0.1.0")]
        ]
    }  # fmt: skip
    assert gpu_check.pins_from_report(report) == ["datasets==4.1.0", "fastapi==0.115.0"]


def test_build_wheels_resolves_once_then_downloads_each_pin_for_the_box(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def fake_pip(cmd) -> int:
        cmd = list(cmd)
        seen.append(cmd)
        if "--report" in cmd:
            report = {"install": [{"metadata": {"name": "fastapi", "version": "1.0"}},
                                  {"metadata": {"name": "rouge-score", "version": "0.1.2"}}]}  # fmt: skip
            Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps(report))
            return 0
        return 1 if "download" in cmd and "rouge-score==0.1.2" in cmd else 0  # a source-only package

    pins = gpu_check.build_wheels(tmp_path / "wheels", "3.12", run=fake_pip)
    assert pins == ["fastapi==1.0", "rouge-score==0.1.2"]
    resolve, fastapi, rouge, rouge_built, project = seen
    assert resolve[3:6] == ["install", "--dry-run", "--ignore-installed"] and "bitsandbytes>=0.46" in resolve
    assert fastapi[3] == "download" and fastapi[-1] == "fastapi==1.0"
    for flag in ("--no-deps", "--only-binary=:all:", "manylinux_2_28_x86_64"):
        assert flag in fastapi
    assert fastapi[fastapi.index("--python-version") + 1] == "3.12"
    assert rouge_built[3] == "wheel" and rouge_built[-1] == "rouge-score==0.1.2"  # built here, pure Python
    assert project[3] == "wheel" and project[-1] == str(ROOT)  # llmos itself
    install = gpu_check.install_command(tmp_path / "wheels")
    assert "--no-index" in install and install[install.index("--find-links") + 1] == str(tmp_path / "wheels")


def collected_cuda_tests(*paths: str) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *paths,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return [line for line in done.stdout.splitlines() if "::" in line]


def missing_stages(collected: list[str]) -> list[str]:
    return [stage for stage, test in gpu_check.CUDA_STAGES.items() if not any(test in c for c in collected)]


def test_the_gpu_checks_test_files_hold_a_cuda_test_for_every_stage() -> None:
    collected = collected_cuda_tests(*gpu_check.CUDA_TESTS)
    assert collected and not missing_stages(collected)
    assert gpu_check.cuda_test_command()[1:5] == ["-m", "pytest", "-m", "cuda"]


@pytest.mark.slow
def test_collect_only_lists_a_cuda_test_for_every_stage_and_cpu_skips_them() -> None:
    import torch

    assert not missing_stages(collected_cuda_tests("tests"))
    if torch.cuda.is_available():
        return
    outcome = gpu_check.run_cuda_tests(gpu_check.CUDA_TESTS)
    assert outcome["exit_code"] == 0 and outcome.get("failed", 0) == 0
    assert outcome["skipped"] >= len(set(gpu_check.CUDA_STAGES.values()))


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_tiny_cpu_model(tmp_path: Path) -> None:
    out = tmp_path / "results-gpu.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--out", str(out),
         "--tests", "tests/test_cuda.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    assert "card: none (CPU)" in report and "transformers" in report and "skipped" in report
    assert "FAILED" not in report
    for row in (
        "bf16 matmul",
        "llmos pretrain vs HF Trainer: real tokens/s",
        "llmos pretrain: MFU",
        "llmos finetune (full) vs HF Trainer: real tokens/s",
        "QLoRA vs LoRA: peak memory",
        "QLoRA vs LoRA: real tokens/s",
        "batch vs per-prompt HF generate loop",
        "serve: 2 concurrent clients vs the per-prompt HF generate loop",
        "serve: 4 concurrent clients vs the per-prompt HF generate loop",
    ):
        assert row in report, row
