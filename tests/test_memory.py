"""GPU memory: the peak estimate's arithmetic, the `--dry-run` line with the CUDA queries mocked, and the
one message a CUDA out-of-memory error ends with (simulated on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmos_cli.core.train import loop
from llmos_cli.core.train.memory import NF4_BYTES, estimate_training_memory, model_dims

GIB = 1024**3
DIMS = {"batch_size": 2, "seq_len": 4, "hidden_size": 8, "layers": 3, "vocab_size": 10}


def test_estimate_adds_weights_gradients_adam_and_activations() -> None:
    full = estimate_training_memory(1000, 1000, **DIMS)
    assert (full.weights, full.gradients, full.optimizer) == (4000, 4000, 8000)  # fp32, fp32, 2 moments
    # 8 tokens x 8 hidden x 17 values x 2 bytes per layer, 3 layers; logits 8 x 10 x (2 + 8) bytes
    assert full.activations == 3 * 8 * 8 * 17 * 2 + 8 * 10 * 10
    checkpointed = estimate_training_memory(1000, 1000, gradient_checkpointing=True, **DIMS)
    assert checkpointed.activations == 3 * 8 * 8 * 2 + 8 * 8 * 17 * 2 + 8 * 10 * 10  # inputs + one layer
    fp32 = estimate_training_memory(1000, 1000, activation_bytes=4, **DIMS)
    assert fp32.activations == 3 * 8 * 8 * 17 * 4 + 8 * 10 * 12
    qlora = estimate_training_memory(1000, 100, quantized=True, **DIMS)
    assert qlora.weights == pytest.approx(100 * 4 + 900 * NF4_BYTES)
    assert (qlora.gradients, qlora.optimizer) == (400, 800)
    assert full.total == full.weights + full.gradients + full.optimizer + full.activations


def test_a_7b_lora_estimate_is_in_the_known_range() -> None:
    """Llama-2-7B (4096 hidden, 32 layers, 32000 vocab): a full bf16 fine-tune needs ~16 bytes a
    parameter before activations; its QLoRA base is ~3.6 GB."""
    n = 6_738_415_616
    full = estimate_training_memory(
        n, n, batch_size=1, seq_len=2048, hidden_size=4096, layers=32, vocab_size=32000
    )
    assert 100 < (full.weights + full.gradients + full.optimizer) / GIB < 101
    q = estimate_training_memory(
        n,
        40_000_000,
        batch_size=1,
        seq_len=2048,
        hidden_size=4096,
        layers=32,
        vocab_size=32000,
        quantized=True,
        gradient_checkpointing=True,
    )
    assert 3.2 < q.weights / GIB < 4.0 and q.total < 8 * GIB


def test_model_dims_read_any_architecture_names() -> None:
    from transformers import GPT2Config, LlamaConfig, T5Config

    assert model_dims(LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=99)) == (64, 2, 99)
    assert model_dims(GPT2Config(n_embd=32, n_layer=3, vocab_size=50)) == (32, 3, 50)
    assert model_dims(T5Config(d_model=16, num_layers=4, vocab_size=70)) == (16, 4, 70)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes a 80 GiB CUDA card with 40 GiB free is there (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * GIB, 80 * GIB))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_dry_run_on_a_gpu_prints_the_estimate_next_to_free_memory(
    tiny_recipe: Path, run_cli, fake_gpu
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    result = run_cli("pretrain", tiny_recipe, "--dry-run")
    assert result.code == 0, result.stderr
    line = next(x for x in (result.stdout + result.stderr).splitlines() if "memory: estimated peak" in x)
    assert "weights" in line and "activations" in line and "40.0 of 80.0 GiB free (fits)" in line
    assert "batch 8 x 32 tokens" in line
    assert torch.backends.cuda.matmul.allow_tf32  # a run that picks CUDA uses TF32 for fp32 matmuls
    assert not (tiny_recipe.parent / "run").exists()


def test_dry_run_on_cpu_prints_no_gpu_estimate(tiny_recipe: Path, run_cli) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("pretrain", tiny_recipe, "--dry-run")
    assert result.code == 0 and "memory: estimated peak" not in result.stdout + result.stderr


def test_cuda_out_of_memory_exits_1_naming_the_sizes_and_the_knobs(
    tiny_recipe: Path, run_cli, monkeypatch
) -> None:
    step = loop._optimizer_step
    calls = {"n": 0}

    def oom_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", oom_at_step_3)
    result = run_cli("pretrain", tiny_recipe, "--set", "train.save_every=2")
    assert result.code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: CUDA ran out of memory training a ")
    assert "M-parameter model at batch size 8 (grad_accum 1) and sequence length 32" in message
    for knob in (
        "train.batch_size",
        "train.grad_accum",
        "data.max_seq_len",
        "finetune.gradient_checkpointing",
        "finetune.method=lora",
        "qlora",
    ):
        assert knob in message
    kept = tiny_recipe.parent / "run" / "checkpoints" / "step-2"
    assert f"the last checkpoint is kept: {kept}" in message and kept.is_dir()
    assert "Traceback" not in result.stderr
