"""Write a causal LM of an architecture llama.cpp runs (see gguf_arch) and its byte-level BPE tokenizer
as one GGUF file, at any type of gguf_quant.

Follows llama.cpp's convert_hf_to_gguf.py: tensor names via gguf.TensorNameMap, each architecture's
tensor conversions, norms and other 1-D tensors kept in f32, Llama-3 RoPE scaling as a `rope_freqs`
tensor, the `tokenizer.ggml.*` keys of a "gpt2" (byte-level BPE) vocab with the chat template and the
end-of-turn token.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.core.export.chat_format import ChatFormat
from llmos_cli.core.export.gguf_arch import GgufArch, gguf_arch, llama3_rope_factors, permute_qk
from llmos_cli.core.export.gguf_arch import rope_parameters as _rope_parameters
from llmos_cli.core.export.gguf_quant import gguf_type, llama_cpp_quantize
from llmos_cli.errors import UserError

# pre-tokenizer regex of Llama 3 (tokenizer.ggml.pre "llama-bpe")
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _spec(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}


def _space_prefix(spec: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style BPE (byte fallback, spaces as "▁"): whether a "▁" is put before the
    text; None when the tokenizer is not one."""
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in steps) and not pre:
        return any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps)
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":
        return pre.get("prepend_scheme", "always") in ("first", "always")
    return None


def vocab_kind(tokenizer: Any) -> tuple[str, str]:
    """llama.cpp's tokenizer model and pre-tokenizer for this tokenizer: ("gpt2", "gpt-2" or
    "llama-bpe") for byte-level BPE, ("llama", "default") for SentencePiece-style BPE; else UserError."""
    spec = _spec(tokenizer)
    model_type = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if _space_prefix(spec) is not None:
        return "llama", "default"
    if model_type == "BPE":
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt2", "gpt-2"
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
        ):
            return "gpt2", "llama-bpe"
    raise UserError(
        "GGUF export needs a byte-level BPE tokenizer (GPT-2 or Llama-3 style) or a SentencePiece-style "
        f"BPE with byte fallback; this one is {model_type or 'not a fast tokenizer'} with pre-tokenizer "
        f"{pre.get('type')}",
        hint="train the tokenizer with `llmos data` (byte-level BPE), or export as --format hf or onnx",
    )


def check_gguf_supported(config: Any) -> GgufArch:
    """This config's GGUF architecture; UserError unless it is one this writer handles."""
    return gguf_arch(config)


def export_gguf(
    model: Any,
    tokenizer: Any,
    dest: Path,
    dtype: str = "f16",
    name: str = "model",
    chat: ChatFormat | None = None,
) -> Path:
    """Write `model` (a merged causal LM) and `tokenizer` to the GGUF file `dest` at type `dtype`; the
    K-quants are written at f32 beside `dest` and quantised by llama.cpp."""
    kind = gguf_type(dtype)
    arch = gguf_arch(model.config)
    if tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer; none was found beside the model")
    if kind.llama_ftype is None:
        return _write(model, tokenizer, dest, arch, dtype, name, chat)
    full = dest.with_name(f".{dest.name}.f32")
    try:
        _write(model, tokenizer, full, arch, "f32", name, chat)
        return llama_cpp_quantize(full, dest, kind.llama_ftype)
    finally:
        full.unlink(missing_ok=True)


def _write(
    model: Any, tokenizer: Any, dest: Path, arch: GgufArch, dtype: str, name: str, chat: ChatFormat | None
) -> Path:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    writer.add_name(runtime_name(name, tokenizer.get_vocab()))
    arch.hparams(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, tokenizer, config.vocab_size, chat)
    for tensor_name, data, qtype in _tensors(model, arch, dtype):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


# llama.cpp applies Phi-3 token fix-ups to any model whose general.name contains "phi3" or "phi-3", looking
# these pieces up with unordered_map::at: a vocab without one of them fails to load
_PHI3_NAME = re.compile(r"(phi)-?(3)", re.IGNORECASE)
_PHI3_PIECES = ("<s>", "</s>", "<unk>", "<|endoftext|>")


def runtime_name(name: str, vocab: dict[str, int]) -> str:
    """general.name for `name`: "phi3"/"phi-3" become "phi_3" unless the vocab is Phi-3's own."""
    if all(piece in vocab for piece in _PHI3_PIECES):
        return name
    return _PHI3_NAME.sub(r"\1_\2", name)


# general.file_type of each type gguf-py writes itself (llama.cpp sets its own when it quantises)
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}


def _add_vocab(writer: Any, tokenizer: Any, vocab_size: int, chat: ChatFormat | None) -> None:
    """tokenizer.ggml.*: model (gpt2 or llama), pre, tokens padded to vocab_size, types, merges (gpt2) or
    scores (llama), special ids, the chat template and the end-of-turn token."""
    import gguf

    model_kind, pre = vocab_kind(tokenizer)
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
        elif model_kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", by_id[i]):
            tokens.append(by_id[i])  # byte fallback pieces, even where they were added as specials
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(model_kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model_kind == "llama":
        writer.add_token_scores(_merge_scores(tokenizer, tokens))
        writer.add_add_space_prefix(bool(_space_prefix(_spec(tokenizer))))

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=model_kind == "gpt2", n_vocab=vocab_size)
    # what the HF tokenizer really does, rather than SpecialVocab's reading of its post-processor
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "eos": bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
    }
    # transformers v5 saves the template as chat_template.jinja, which SpecialVocab does not read
    special.chat_template = getattr(tokenizer, "chat_template", None) or None
    special.add_to_gguf(writer, quiet=True)
    eot = chat.end_of_turn_id(tokenizer) if chat is not None else None
    if eot is not None:
        writer.add_eot_token_id(eot)


def _merge_scores(tokenizer: Any, tokens: list[str]) -> list[float]:
    """SentencePiece scores from BPE merge order: llama.cpp joins the adjacent pair whose result scores
    highest, so the token of the k-th merge scores -k (earlier merges first); other tokens score 0."""
    merges = (_spec(tokenizer).get("model") or {}).get("merges") or []
    rank: dict[str, int] = {}
    for k, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, k + 1)
    return [-float(rank.get(tok, 0)) for tok in tokens]


def _tensors(model: Any, arch: GgufArch, dtype: str) -> Any:
    """(gguf name, data, raw qtype or None) for every weight, converted as llama.cpp expects."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    gguf_enum = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(gguf_enum, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(dtype)
    if _rope_parameters(config).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config), None
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {config.model_type} tensor {hf_name}")
        data = _convert(hf_name, tensor.detach().float().cpu().numpy(), arch, config)
        if data.ndim == 1 or dtype == "f32":
            yield gguf_name, data.astype(np.float32), None
        elif qtype is not None and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            yield gguf_name, quantize(data, qtype), qtype
        else:
            yield gguf_name, data.astype(np.float16), None


def _convert(hf_name: str, data: np.ndarray, arch: GgufArch, config: Any) -> np.ndarray:
    """One HF tensor in the layout llama.cpp reads for this architecture."""
    if arch.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
        return permute_qk(data, config.num_attention_heads)
    if arch.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
        return permute_qk(data, config.num_key_value_heads or config.num_attention_heads)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return data + arch.norm_shift
    if hf_name.endswith(arch.transposed):
        return np.ascontiguousarray(data.T)
    return data
