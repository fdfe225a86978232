"""LoRA, DoRA and QLoRA: wrap a loaded model with peft adapters so only they (and task heads) train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmos_cli.errors import UserError
from llmos_cli.recipe import FinetuneSection

# Task heads are trained in full (peft's modules_to_save) or left alone, never given adapters.
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "embed_out", "output"}
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def auto_target_modules(model: Any) -> list[str]:
    """The linear layers of the architecture's blocks (attention and MLP), by module name.

    Found by walking the model, so every architecture gets its own names (q_proj/up_proj for llama,
    c_attn/c_fc for gpt2, query/value/dense for bert, q/k/v/o/wi/wo for t5); output heads are excluded.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is head or leaf in HEAD_NAMES or not name:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)) or type(module).__name__ == "Linear4bit":
            names.add(leaf)
    if not names:
        raise UserError(
            f"finetune.lora.target_modules: found no linear layers in {type(model).__name__}",
            hint="list the module names to adapt, e.g. target_modules: [q_proj, v_proj]",
        )
    return sorted(names)


QUANTIZATION_FILE = "quantization.json"  # beside a QLoRA adapter: how its base is loaded (4-bit NF4)


def check_qlora_available(device: torch.device) -> None:
    """QLoRA needs bitsandbytes with a 4-bit backend for `device` (CUDA, or its CPU backend); say which
    is missing. Probed by quantising one small tensor there: the installed build decides, not its version."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        raise UserError(
            "finetune.method: qlora needs the bitsandbytes package, which is not installed",
            hint="pip install bitsandbytes, or set finetune.method=lora",
        ) from None
    try:
        bnb.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as err:  # noqa: BLE001 - any failure means no usable 4-bit backend here
        raise UserError(
            f"finetune.method: qlora: bitsandbytes has no 4-bit backend for {device} "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})",
            hint="train on a CUDA GPU, install a bitsandbytes with CPU support (>= 0.46), "
            "or set finetune.method=lora",
        ) from None


def quantization_config(cfg: FinetuneSection) -> dict[str, Any]:
    """The 4-bit NF4 settings of a QLoRA base (BitsAndBytesConfig keys); the compute dtype is the
    device's, chosen at load time (`quantized_load_kwargs`), as the 4-bit weights do not depend on it."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": cfg.double_quant}


def quantized_load_kwargs(quantization: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """Extra `from_pretrained` arguments that load a base as `quantization` says (4-bit), on `device`:
    compute in bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU."""
    if not quantization:
        return {}
    check_qlora_available(device)
    from transformers import BitsAndBytesConfig

    if device.type == "cuda":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        where: Any = device.index if device.index is not None else torch.cuda.current_device()
    else:
        compute, where = torch.float32, str(device)
    config = BitsAndBytesConfig(**quantization, bnb_4bit_compute_dtype=compute)
    return {"quantization_config": config, "device_map": {"": where}}


def adapter_quantization(adapter_dir: Path) -> dict[str, Any] | None:
    """The 4-bit settings a QLoRA adapter's base was trained with (None for plain LoRA)."""
    path = adapter_dir / QUANTIZATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_adapter_quantization(adapter_dir: Path, quantization: dict[str, Any]) -> None:
    """Write QUANTIZATION_FILE beside the adapter (to a temp file, then renamed)."""
    tmp = adapter_dir / f".{QUANTIZATION_FILE}.tmp"
    tmp.write_text(json.dumps(quantization, indent=2) + "\n")
    tmp.replace(adapter_dir / QUANTIZATION_FILE)


def apply_lora(model: Any, cfg: FinetuneSection, task: str) -> Any:
    """Wrap `model` in a peft LoRA (or DoRA) model; the base is frozen, adapters and task heads train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from llmos_cli.core.noise import quiet_known_noise

    quiet_known_noise()  # peft's is_gradient_checkpointing FutureWarning, for stages called directly too
    lora = cfg.lora
    targets = auto_target_modules(model) if lora.target_modules == "auto" else lora.target_modules
    if isinstance(targets, str):
        targets = [targets]
    if cfg.qlora:
        # checkpointing, when asked, is already on (non-reentrant: the stage enables it before this)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=cfg.dora,
        task_type=PEFT_TASK[task],
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"finetune.lora.target_modules: {err}") from None


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
