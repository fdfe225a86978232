"""ONNX export of causal LMs and classifiers, dynamic batch and sequence.

A classifier is (input_ids, attention_mask) -> logits. A causal LM also takes `past_key_values.N.key`
/ `.value` (batch, kv heads, past length, head dim) and returns `present.N.key` / `.value`, so
onnxruntime generates token by token: the prompt with empty pasts (length 0), then one token at a time
with the presents fed back and an attention_mask over past + new tokens. Weights above ~1.5 GB go to an
external data file beside model.onnx (ONNX's 2 GB limit).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from llmos_cli.errors import UserError

ONNX_TASKS = ("causal-lm", "classification", "seq2seq")
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5")  # encoder-decoders onnx_seq2seq exports
EXTERNAL_DATA_BYTES = 1_500_000_000


def check_onnx_supported(task: str, config: Any = None) -> None:
    if task not in ONNX_TASKS:
        raise UserError(
            f"ONNX export supports causal-lm, classification and seq2seq (T5) models; this one is {task}",
            hint="export it as --format hf",
        )
    model_type = getattr(config, "model_type", None)
    if task == "seq2seq" and config is not None and model_type not in SEQ2SEQ_MODEL_TYPES:
        raise UserError(
            f"ONNX export of seq2seq models supports {', '.join(SEQ2SEQ_MODEL_TYPES)}; this one is {model_type}",
            hint="export it as --format hf (or use `optimum-cli export onnx`)",
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
    args: tuple[Any, ...] = (example, torch.ones_like(example))
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    shapes: dict[str, Any] = {"input_ids": dims, "attention_mask": dims}
    module = logits_module(model, task)
    if task == "causal-lm":
        module, past = _with_past(model), _example_past(model, example)
        n = len(past) // 2
        args = (example, torch.ones(2, 8 + past[0].shape[2], dtype=torch.int64), *past)
        inputs += [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        outputs += [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        shapes = {
            "input_ids": dims,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "past": tuple({0: "batch", 2: "past_sequence"} for _ in past),
        }
    # The exporter logs a warning per torchvision op it cannot register; none of them apply here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(fp32_path),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=shapes,
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


def _example_past(model: Any, example: Any) -> list[Any]:
    """Random past keys/values of the model's own cache shapes (3 past positions), flat per layer."""
    import torch

    with torch.no_grad():
        cache = model(input_ids=example[:, :3], use_cache=True).past_key_values
    return [torch.randn_like(t) for layer in cache.layers for t in (layer.keys, layer.values)]


def _with_past(model: Any) -> Any:
    """A torch module: (input_ids, attention_mask, *flat past) -> (logits, *flat present)."""
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> Any:
            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True
            )
            return (
                out.logits,
                *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)],
            )

    return WithPast().eval()


def empty_past(session: Any, batch: int) -> dict[str, Any]:
    """Zero-length past keys/values for each `past_key_values.*` input of an onnxruntime session."""
    import numpy as np

    return {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }


def onnx_greedy(session: Any, prompt: list[int], new_tokens: int, use_cache: bool = True) -> list[int]:
    """Greedy generation in onnxruntime: with the KV cache (one token a step), or without it (the whole
    sequence each step, pasts empty): the baseline the cache is measured against."""
    import numpy as np

    ids = list(prompt)
    feed_ids, past = np.array([ids], dtype=np.int64), empty_past(session, 1)
    names = [o.name for o in session.get_outputs()]
    for _ in range(new_tokens):
        feed = {"input_ids": feed_ids, "attention_mask": np.ones((1, len(ids)), dtype=np.int64), **past}
        out = dict(zip(names, session.run(None, feed), strict=True))
        ids.append(int(out["logits"][0, -1].argmax()))
        if use_cache:
            feed_ids = np.array([[ids[-1]]], dtype=np.int64)
            past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n != "logits"}
        else:
            feed_ids = np.array([ids], dtype=np.int64)
    return ids[len(prompt) :]


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
