"""The causal-LM architectures llmos writes as GGUF: each transformers model_type mapped to its llama.cpp
architecture, the hyper-parameter keys llama.cpp reads for it, and how its tensors are converted.

Learned from llama.cpp's convert_hf_to_gguf (conversion/{llama,qwen,gemma,phi,gpt2}.py) and its model
loaders (src/models/*.cpp); tensor names come from gguf-py's TensorNameMap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos_cli.errors import UserError


@dataclass(frozen=True)
class GgufArch:
    """How one model_type becomes a llama.cpp architecture."""

    gguf_arch: str  # the gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama arch uses interleaved RoPE: Q/K rows are reordered
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + w): llama.cpp stores w + 1
    transposed: tuple[str, ...] = ()  # GPT-2's Conv1D weights are stored (in, out)
    check: Callable[[Any], None] = lambda config: None
    hparams: Callable[[Any, Any], None] = lambda writer, config: None


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters of `config` (those of `layer_type` when they are given per layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    return dict(params.get(layer_type, params)) if layer_type in params else params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _refuse(model_type: str, what: str, hint: str | None = None) -> None:
    raise UserError(f"GGUF export of a {model_type} model: {what} is not supported", hint=hint)


def _rope_kinds(config: Any, allowed: tuple[str, ...]) -> None:
    for layer_type in ("full_attention", "sliding_attention"):
        rope_type = rope_parameters(config, layer_type).get("rope_type", "default")
        if rope_type not in allowed:
            _refuse(config.model_type, f"rope_type '{rope_type}'", f"supported: {', '.join(allowed)}")


def _no_sliding_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", True)
    if use and window is not None and window < config.max_position_embeddings:
        _refuse(
            config.model_type,
            f"sliding-window attention ({window} of {config.max_position_embeddings} positions)",
            "export it as --format hf, or train with model.config.sliding_window: null",
        )


def _check_llama(config: Any) -> None:
    _no_sliding_window(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        _refuse(config.model_type, "attention_bias or mlp_bias")
    _rope_kinds(config, ("default", "llama3"))


def _check_qwen(config: Any) -> None:
    _no_sliding_window(config)
    if config.model_type == "qwen3" and getattr(config, "attention_bias", False):
        _refuse("qwen3", "attention_bias")
    _rope_kinds(config, ("default",))


def _check_gemma(config: Any) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) only for the 27B sizes)
    if getattr(config, "query_pre_attn_scalar", head_dim(config)) != head_dim(config):
        _refuse(
            config.model_type,
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim(config)}",
        )
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        _refuse(config.model_type, f"hidden_activation '{config.hidden_activation}'")
    if config.model_type == "gemma2" and not getattr(config, "tie_word_embeddings", True):
        _refuse("gemma2", "an untied lm_head (llama.cpp's gemma2 reuses the embeddings)")
    if getattr(config, "attention_bias", False):
        _refuse(config.model_type, "attention_bias")
    _rope_kinds(config, ("default",))


def _check_phi3(config: Any) -> None:
    _no_sliding_window(config)
    _rope_kinds(config, ("default",))  # longrope (Phi-3 128k) needs rope_factors_{long,short}
    rotary = rope_parameters(config).get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
    )
    if rotary != 1.0:
        _refuse("phi3", f"partial_rotary_factor {rotary}")
    if getattr(config, "hidden_act", "silu") != "silu":
        _refuse("phi3", f"hidden_act '{config.hidden_act}'")


def _check_gpt2(config: Any) -> None:
    if config.activation_function != "gelu_new":
        _refuse("gpt2", f"activation_function '{config.activation_function}'")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
        config, "reorder_and_upcast_attn", False
    ):
        _refuse("gpt2", "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")


def _decoder_hparams(writer: Any, config: Any) -> None:
    """The keys every RMSNorm decoder here shares (convert_hf_to_gguf's TextModel defaults)."""
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)


def _gemma_hparams(writer: Any, config: Any) -> None:
    _decoder_hparams(writer, config)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    layer_types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        local = rope_parameters(config, "sliding_attention").get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))
    elif config.model_type == "gemma2":
        writer.add_sliding_window(0)


def _phi3_hparams(writer: Any, config: Any) -> None:
    """Phi-3's fused qkv_proj and gate_up_proj are the runtime's attn_qkv and ffn_up (2x wide, gate
    first) as they are; it also reads the original context length and a sliding window (0: none)."""
    _decoder_hparams(writer, config)
    original = getattr(config, "original_max_position_embeddings", None)
    writer.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
    writer.add_sliding_window(0)


def _gpt2_hparams(writer: Any, config: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


GGUF_ARCHS: dict[str, GgufArch] = {
    # Mistral without a sliding window is llama's math: llama.cpp loads it as "llama" (as convert does)
    "llama": GgufArch("LLAMA", permute_qk=True, check=_check_llama, hparams=_decoder_hparams),
    "mistral": GgufArch("LLAMA", permute_qk=True, check=_check_llama, hparams=_decoder_hparams),
    "qwen2": GgufArch("QWEN2", check=_check_qwen, hparams=_decoder_hparams),
    "qwen3": GgufArch("QWEN3", check=_check_qwen, hparams=_decoder_hparams),
    "gemma2": GgufArch("GEMMA2", norm_shift=1.0, check=_check_gemma, hparams=_gemma_hparams),
    "gemma3_text": GgufArch("GEMMA3", norm_shift=1.0, check=_check_gemma, hparams=_gemma_hparams),
    "phi3": GgufArch("PHI3", check=_check_phi3, hparams=_phi3_hparams),
    "gpt2": GgufArch(
        "GPT2",
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        check=_check_gpt2,
        hparams=_gpt2_hparams,
    ),
}


def gguf_arch(config: Any) -> GgufArch:
    """The GGUF mapping of this config's architecture; UserError naming it when there is none."""
    model_type = getattr(config, "model_type", None)
    arch = GGUF_ARCHS.get(model_type)
    if arch is None:
        raise UserError(
            f"GGUF export does not support the '{model_type}' architecture "
            f"(supported: {', '.join(GGUF_ARCHS)})",
            hint="export it as --format hf or onnx, or convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    arch.check(config)
    return arch


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling, as convert_hf_to_gguf writes rope_freqs."""
    rope = rope_parameters(config)
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
