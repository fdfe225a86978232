"""Device, precision and seeding: decided once, before the training loop."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmos_cli.errors import UserError

if TYPE_CHECKING:
    from llmos_cli.core.precision_probe import PrecisionChoice


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """The one device rule, for training and inference alike: `auto` is CUDA, then MPS, then the CPU;
    a named device that this machine lacks is a UserError naming `key` (the recipe key or CLI flag)."""
    if name == "auto":
        if torch.cuda.is_available():
            return use_tf32(torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"{key}: '{name}' is not a device (expected auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}: {name} requested but this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise UserError(f"{key}: {name} requested but this machine has {count} CUDA device(s)")
        use_tf32(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}: mps requested but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}: '{name}' is not supported (expected auto, cpu, cuda, cuda:N or mps)")
    return device


def use_tf32(device: torch.device) -> torch.device:
    """On a CUDA device, fp32 matmuls and convolutions run on TF32 tensor cores (Ampere and newer; a
    no-op before): the precision a fp32 run loses is below what training notices, the speed is 2-8x."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def use_varlen_attention(model: Any, device: torch.device) -> bool:
    """Switch a model to flash attention 2 where it can run (CUDA, the flash-attn package, a model that
    supports it): its varlen kernels take packed rows flattened, padding-free. Elsewhere the model keeps
    SDPA, which masks packed documents block-diagonally from their position ids. True when switched."""
    from transformers.utils import is_flash_attn_2_available

    if (
        device.type != "cuda"
        or not is_flash_attn_2_available()
        or not getattr(model, "_supports_flash_attn", False)
    ):
        return False
    model.set_attn_implementation("flash_attention_2")
    return True


def inference_dtype(
    device: torch.device, precision: str = "auto", key: str = "precision", config: Any = None
) -> torch.dtype:
    """The dtype inference loads weights in: `auto` is bf16 on GPUs that support it, else fp16 on a GPU;
    on the CPU, bf16 where the probe measures it at least 1.3x faster at the model's shapes (`config`),
    else fp32. `fp32`, `bf16` and `fp16` are explicit choices (fp16 needs a GPU)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        measured = _cpu_choice(config)
        return torch.bfloat16 if measured is not None and measured.precision == "bf16" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"{key}: fp16 needs a GPU; use fp32 or bf16 on CPU")
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise UserError(
            f"{key}: '{precision}' is not a precision (expected auto, fp32, bf16 or fp16)"
        ) from None


def _cpu_choice(config: Any) -> PrecisionChoice | None:
    """What `auto` picks on the CPU: the probe's choice at the model's shapes (None when they are unknown)."""
    if config is None:
        return None
    from llmos_cli.core.precision_probe import choose_cpu_precision, model_shape

    return choose_cpu_precision(model_shape(config))


@dataclass(frozen=True)
class Precision:
    """How to run forward passes: autocast dtype (None = fp32) and whether fp16 needs loss scaling."""

    name: str
    autocast_dtype: torch.dtype | None
    measured: PrecisionChoice | None = None  # what `auto` measured on this CPU to choose `name`

    @property
    def needs_scaler(self) -> bool:
        return self.autocast_dtype is torch.float16

    def autocast(self, device: torch.device) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def loss_scaling(self, device: torch.device) -> LossScaling:
        """How backward and the optimizer step run at this precision (fp16 scales the loss)."""
        return LossScaling(torch.amp.GradScaler(device.type) if self.needs_scaler else None)


@dataclass
class LossScaling:
    """fp16's gradient scaler, or plain backward and step: the loop calls these the same either way."""

    scaler: Any = None

    @property
    def skips_nonfinite_steps(self) -> bool:
        """The scaler skips a step whose gradients are not finite (and lowers its scale) by itself."""
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the gradients in their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def pick_precision(name: str, device: torch.device, config: Any = None) -> Precision:
    """`auto`: bf16 on GPUs that support it, else fp16 on a GPU; on the CPU, bf16 autocast (fp32 master
    weights) where a probe at the model's shapes (`config`) measures it at least 1.3x faster than fp32,
    else fp32 (core/precision_probe.py)."""
    measured = None
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            measured = _cpu_choice(config) if device.type == "cpu" else None
            name = measured.precision if measured is not None else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, measured)


def model_device(model: Any) -> torch.device:
    """Where a model's weights are (the CPU for one without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
