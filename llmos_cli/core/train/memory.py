"""GPU memory: a peak estimate for a training run, and the one message a CUDA out-of-memory error ends with.

The estimate adds up what a step holds at its peak: weights, gradients, AdamW's two moments and the
activations kept for backward (Korthikanti et al. 2022, "Reducing activation recomputation": about 34
bytes per token and hidden unit per layer at 16-bit with fused attention, which keeps no score matrix),
plus the logits and their fp32 copy for the loss. It is an estimate, not a measurement: allocator
fragmentation, CUDA context (~0.5 GiB) and temporary buffers come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
ACTIVATION_VALUES = 17  # 34 bytes at 2 bytes per value, per token, hidden unit and layer
NF4_BYTES = 0.5 + 4 / 64 / 4 + 1 / 256  # 4 bits, an fp8 absmax per 64 weights, double-quantised constants

_WORKLOAD: dict[str, Any] = {}  # what the running stage is doing, for the out-of-memory message


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}"
            for name in ("weights", "gradients", "optimizer", "activations")
        )
        return f"{self.total / GIB:.2f} GiB ({parts})"


def model_dims(config: Any) -> tuple[int, int, int]:
    """(hidden size, layers, vocabulary) of a transformers config, whatever the architecture names them."""

    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"{type(config).__name__} has none of {names}")

    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    layers = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    return hidden, layers, first("vocab_size")


def estimate_training_memory(
    parameters: int,
    trainable: int,
    *,
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    layers: int,
    vocab_size: int,
    activation_bytes: int = 2,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one training step of micro-batch `batch_size` x `seq_len`.

    Weights: fp32 (the master copy the optimizer steps), or 4-bit NF4 for a QLoRA base's frozen part.
    Gradients: fp32, trainable parameters only. Optimizer: AdamW, two fp32 moments per trainable
    parameter. Activations at `activation_bytes` per value (2 under bf16/fp16 autocast, 4 in fp32); with
    gradient checkpointing only each layer's input is kept, plus one layer recomputed during backward.
    """
    frozen = parameters - trainable
    weights = trainable * 4 + frozen * (NF4_BYTES if quantized else 4)
    tokens = batch_size * seq_len
    per_layer = tokens * hidden_size * ACTIVATION_VALUES * activation_bytes
    kept = (
        tokens * hidden_size * activation_bytes * layers + per_layer
        if gradient_checkpointing
        else per_layer * layers
    )
    logits = tokens * vocab_size * (activation_bytes + 8)  # the logits, their fp32 copy and its gradient
    return MemoryEstimate(weights, trainable * 4.0, trainable * 8.0, float(kept + logits))


def count_parameters(config: Any, task: str = "causal-lm") -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory, no weights)."""
    import torch
    import transformers

    from llmos_cli.core.models import AUTO_CLASSES, KIND_OF_TASK, kind_of

    kind = KIND_OF_TASK.get(task, kind_of(config))
    auto = getattr(transformers, AUTO_CLASSES.get(kind, "AutoModel"))
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def trainable_share(method: str, parameters: int, hidden_size: int, layers: int, rank: int) -> int:
    """Trainable parameters of a method: all for full, else LoRA's A and B on ~7 projections per layer."""
    if method == "full":
        return parameters
    return min(parameters, layers * 7 * 2 * rank * hidden_size)


def free_gpu_memory(device: Any) -> tuple[float, float]:
    """(free, total) bytes on a CUDA device, as the driver reports them."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return float(free), float(total)


def note_workload(**workload: Any) -> None:
    """Remember what the stage is running (batch_size, grad_accum, seq_len, parameters, checkpoints,
    task), for `oom_message`; a later call replaces the earlier one."""
    _WORKLOAD.clear()
    _WORKLOAD.update(workload)


def oom_message() -> str:
    """The one message a CUDA out-of-memory error ends with: what failed, and the knobs to turn."""
    from llmos_cli.core.train.checkpoint import latest_checkpoint

    w = _WORKLOAD
    if "batch_size" not in w:  # inference: generate, chat, serve, eval
        return (
            "CUDA ran out of memory. Lower the batch (--batch-size, serve.max_batch_size), the prompt "
            "and generation lengths (max_new_tokens, data.max_seq_len), or use a smaller model"
        )
    size = f"{w['parameters'] / 1e6:.1f}M-parameter " if w.get("parameters") else ""
    failed = (
        f"CUDA ran out of memory training a {size}model at batch size {w['batch_size']} "
        f"(grad_accum {w.get('grad_accum', 1)}) and sequence length {w.get('seq_len', '?')}"
    )
    knobs = (
        "lower train.batch_size and raise train.grad_accum by the same factor (the same effective batch), "
        "lower data.max_seq_len, set finetune.gradient_checkpointing=true, or train adapters only "
        "(finetune.method=lora, or qlora for a 4-bit base)"
    )
    folder = w.get("checkpoints")
    last = latest_checkpoint(Path(folder)) if folder else None
    kept = f"; the last checkpoint is kept: {last}" if last else "; no checkpoint was saved yet"
    return f"{failed}. To fit: {knobs}{kept}"


def is_cuda_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's own class, without importing torch where it is not loaded)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


def training_memory_plan(
    config: Any,
    task: str,
    *,
    method: str,
    lora_rank: int,
    batch_size: int,
    seq_len: int,
    precision: str,
    gradient_checkpointing: bool,
    device: Any,
) -> str:
    """One line for a GPU `--dry-run`: the estimated peak of a step next to the card's free memory."""
    parameters = count_parameters(config, task)
    hidden, layers, vocab = model_dims(config)
    estimate = estimate_training_memory(
        parameters,
        trainable_share(method, parameters, hidden, layers, lora_rank),
        batch_size=batch_size,
        seq_len=seq_len,
        hidden_size=hidden,
        layers=layers,
        vocab_size=vocab,
        activation_bytes=4 if precision == "fp32" else 2,
        quantized=method == "qlora",
        gradient_checkpointing=gradient_checkpointing,
    )
    free, total = free_gpu_memory(device)
    verdict = "fits" if estimate.total < free else "does NOT fit: see docs/gpu.md (memory)"
    return (
        f"memory: estimated peak {estimate.describe()} for {parameters / 1e6:.1f}M parameters at batch "
        f"{batch_size} x {seq_len} tokens; {device} has {free / GIB:.1f} of {total / GIB:.1f} GiB free ({verdict})"
    )
