"""ONNX export of causal LMs and classifiers: (input_ids, attention_mask) -> logits, dynamic batch and sequence.

The plain forward pass is exported (no past_key_values): a runtime that wants a KV cache should use the
HF export. Weights above ~1.5 GB go to an external data file beside model.onnx (ONNX's 2 GB limit).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from llmos_cli.errors import UserError

ONNX_TASKS = ("causal-lm", "classification")
EXTERNAL_DATA_BYTES = 1_500_000_000


def check_onnx_supported(task: str) -> None:
    if task not in ONNX_TASKS:
        raise UserError(
            f"ONNX export supports causal-lm and classification models; this one is {task}",
            hint="export it as --format hf (or use `optimum-cli export onnx` for encoder-decoder models)",
        )


def export_onnx(model: Any, dest: Path, task: str, quantize: bool = False) -> Path:
    """Write `dest/model.onnx` (int8 dynamic-quantised weights when `quantize`) and return its path."""
    import torch

    check_onnx_supported(task)
    model.eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    path = dest / "model.onnx"
    fp32_path = dest / "model.fp32.onnx" if quantize else path
    example = torch.randint(0, model.config.vocab_size, (2, 8))
    dims = {0: "batch", 1: "sequence"}
    # The exporter logs a warning per torchvision op it cannot register; none of them apply here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            logits_module(model, task),
            (example, torch.ones_like(example)),
            str(fp32_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            dynamo=True,
            external_data=big,
            verbose=False,
        )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = dest / "model.fp32.pre.onnx"
        quant_pre_process(str(fp32_path), str(prepared), save_as_external_data=big)
        quantize_dynamic(
            str(prepared),
            str(path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=big,
        )
        for leftover in dest.glob("model.fp32*"):
            leftover.unlink()
    return path


def logits_module(model: Any, task: str) -> Any:
    """A torch module taking (input_ids, attention_mask) and returning only the logits, without a KV cache."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            kwargs = {"use_cache": False} if task == "causal-lm" else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    return LogitsOnly().eval()
