"""LoRA, DoRA and QLoRA: wrap a loaded model with peft adapters so only they (and task heads) train."""

from __future__ import annotations

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


def check_qlora_available() -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; say which is missing."""
    if not torch.cuda.is_available():
        raise UserError(
            "finetune.qlora: 4-bit QLoRA needs a CUDA GPU and none is available",
            hint="set finetune.qlora=false to train LoRA on the full-precision model",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "finetune.qlora: needs the bitsandbytes package, which is not installed",
            hint="pip install bitsandbytes, or set finetune.qlora=false",
        ) from None


def quantized_load_kwargs(cfg: FinetuneSection) -> dict[str, Any]:
    """Extra `from_pretrained` arguments that load the base in 4-bit NF4 for QLoRA (else none)."""
    if not cfg.qlora:
        return {}
    check_qlora_available()
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
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
