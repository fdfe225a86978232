"""`precision: auto` on a CPU chooses by measuring: bf16 autocast against fp32 on the model's own matmul
shapes, forward and backward, in well under a second. CPUs differ (one reports AVX512-BF16 yet runs bf16
matmuls at half the fp32 speed; another runs them 2.5-3x faster), so no flag decides this.

The answer is cached per machine, torch version, thread count and shape under LLMOS_HOME, so a run pays for
the probe once; the choice and the measured ratio are recorded with the run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE_VERSION = 1
MIN_SPEEDUP = 1.3  # bf16 must be at least this much faster to be chosen
PROBE_TOKENS = 128  # rows of the activation matrix: a batch of short sequences
REPEATS = 3
BATCH_SECONDS = 0.02  # each timing averages steps lasting at least this long
MAX_STEPS = 2000


@dataclass(frozen=True)
class PrecisionChoice:
    """What `precision: auto` picked on this CPU and why: fp32 time over bf16 time at the model's shapes."""

    precision: str  # "bf16" or "fp32"
    speedup: float
    shape: tuple[int, int]  # (hidden_size, intermediate_size) probed
    cached: bool = False

    def record(self) -> dict[str, object]:
        """What a run's recipe.yaml and llmos.lock keep."""
        return {
            "precision": self.precision,
            "bf16_speedup": round(self.speedup, 3),
            "probed_shape": list(self.shape),
        }


def model_shape(config: object) -> tuple[int, int]:
    """(hidden, intermediate) sizes of a transformers config (d_model / d_ff for T5-style configs)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 256
    inner = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or 4 * hidden
    return int(hidden), int(inner)


def choose_cpu_precision(shape: tuple[int, int], cache: Path | None = None) -> PrecisionChoice:
    """bf16 when autocast is at least MIN_SPEEDUP times faster than fp32 at `shape` on this CPU, else fp32."""
    cache = cache or _cache_path()
    key = _cache_key(shape)
    known = _read(cache)
    if key in known:
        return PrecisionChoice(known[key]["precision"], known[key]["speedup"], shape, cached=True)
    speedup = measure_bf16_speedup(shape)
    choice = PrecisionChoice("bf16" if speedup >= MIN_SPEEDUP else "fp32", speedup, shape)
    known[key] = {"precision": choice.precision, "speedup": speedup}
    _write(cache, known)
    return choice


def measure_bf16_speedup(shape: tuple[int, int], tokens: int = PROBE_TOKENS) -> float:
    """fp32 seconds over bf16-autocast seconds for an MLP block's matmuls (x W1, then W2), forward and
    backward, fp32 master weights as training keeps them. Each timing averages enough steps to last
    BATCH_SECONDS (tiny shapes take microseconds, where one step is noise), the best of REPEATS; bf16 is
    timed further only when its first and second (warm) steps are not already far slower, as on CPUs without bf16
    dot products."""
    hidden, inner = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    w1 = (torch.randn(hidden, inner, generator=gen) / hidden**0.5).requires_grad_()
    w2 = (torch.randn(inner, hidden, generator=gen) / inner**0.5).requires_grad_()

    def per_step(dtype: torch.dtype | None, steps: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                y = torch.nn.functional.gelu(x @ w1) @ w2
            y.float().square().mean().backward()
            w1.grad = w2.grad = None
        return (time.perf_counter() - start) / steps

    per_step(None)  # warm-up: kernel selection and allocations
    steps = max(1, min(MAX_STEPS, math.ceil(BATCH_SECONDS / max(per_step(None), 1e-9))))
    fp32 = min(per_step(None, steps) for _ in range(REPEATS))
    first = per_step(torch.bfloat16)  # also warms up; beyond 10x fp32 no warm-up explains the gap
    if first > 10 * fp32:
        return fp32 / first
    warm = per_step(torch.bfloat16)
    if warm > 2 * fp32:  # far slower once warm: no need to measure it further
        return fp32 / warm
    return fp32 / min(per_step(torch.bfloat16, steps) for _ in range(REPEATS))


def _cache_key(shape: tuple[int, int]) -> str:
    return "|".join(
        [
            f"v{PROBE_VERSION}",
            _cpu_name(),
            f"torch {torch.__version__}",
            f"{torch.get_num_threads()} threads",
            f"{shape[0]}x{shape[1]}",
        ]
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    from llmos_cli.core.registry import llmos_home

    return llmos_home() / "precision-probe.json"


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write(path: Path, known: dict[str, dict[str, object]]) -> None:
    """Best effort: an unwritable LLMOS_HOME only means the next run probes again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        tmp.replace(path)
    except OSError:
        pass
