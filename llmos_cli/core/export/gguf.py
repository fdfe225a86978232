"""Write a llama-architecture causal LM (llama, or mistral without a sliding window) and its
byte-level BPE tokenizer as one GGUF file.

Follows llama.cpp's convert_hf_to_gguf.py for llama: its tensor names (via gguf.TensorNameMap), Q/K rows
permuted for llama.cpp's interleaved RoPE, norms and other 1-D tensors kept in f32, Llama-3 RoPE
scaling as a `rope_freqs` tensor, and the `tokenizer.ggml.*` keys of a "gpt2" (byte-level BPE) vocab.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.errors import UserError

GGUF_DTYPES = ("f32", "f16", "q8_0")

# pre-tokenizer regex of Llama 3 (tokenizer.ggml.pre "llama-bpe")
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


# Model types with llama's tensors and math, which llama.cpp loads as its "llama" architecture
# (as its convert_hf_to_gguf.py does for Mistral).
LLAMA_LAYOUT = ("llama", "mistral")


def check_gguf_supported(config: Any) -> None:
    """Raise UserError unless this config is a llama causal LM this writer handles."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_LAYOUT:
        raise UserError(
            f"GGUF export supports llama-architecture models ({', '.join(LLAMA_LAYOUT)}); this model is "
            f"'{model_type}'",
            hint="export it as --format hf or onnx, or convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise UserError(
            f"GGUF export: sliding-window attention ({window} of {config.max_position_embeddings} positions) "
            "is not supported; llama.cpp's llama architecture attends to the whole context",
            hint="export it as --format hf, or train with model.config.sliding_window: null",
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: llama models with attention_bias or mlp_bias are not supported")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise UserError(f"GGUF export: rope_type '{rope_type}' is not supported (default and llama3 are)")


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer ("gpt-2" or "llama-bpe"), else UserError."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model_type = spec.get("model", {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if model_type == "BPE":
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
        ):
            return "llama-bpe"
    raise UserError(
        "GGUF export needs a byte-level BPE tokenizer (GPT-2 or Llama-3 style); "
        f"this one is {model_type or 'not a fast tokenizer'} with pre-tokenizer {pre.get('type')}",
        hint="train the tokenizer with `llmos data` (byte-level BPE), or export as --format hf or onnx",
    )


def export_gguf(model: Any, tokenizer: Any, dest: Path, dtype: str = "f16", name: str = "model") -> Path:
    """Write `model` (a merged LlamaForCausalLM) and `tokenizer` to the GGUF file `dest`."""
    import gguf

    config = model.config
    check_gguf_supported(config)
    if tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer; none was found beside the model")
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, not '{dtype}'")

    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, name, dtype)
    _add_vocab(writer, tokenizer, config.vocab_size)
    for tensor_name, data, qtype in _tensors(model, dtype):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: Any, config: Any, name: str, dtype: str) -> None:
    import gguf

    rope = _rope_parameters(config)
    head_dim = _head_dim(config)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.*: model gpt2, pre, tokens padded to vocab_size, types, merges, special ids."""
    import gguf

    pre = pre_tokenizer_name(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}"
        )
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    # what the HF tokenizer really does, rather than SpecialVocab's reading of its post-processor
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "eos": bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
    }
    special.add_to_gguf(writer, quiet=True)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling, as convert_hf_to_gguf writes rope_freqs."""
    rope = _rope_parameters(config)
    dim = _head_dim(config)
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


def _tensors(model: Any, dtype: str) -> Any:
    """(gguf name, data, raw qtype or None) for every weight, converted as llama.cpp expects."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if _rope_parameters(config).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config), None
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for llama tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, n_kv)
        if data.ndim == 1 or dtype == "f32":
            yield gguf_name, data.astype(np.float32), None
        elif (
            dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
        ):
            yield gguf_name, quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:
            yield gguf_name, data.astype(np.float16), None
