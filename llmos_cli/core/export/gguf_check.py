"""Check a GGUF export: its structure with gguf-py's reader always, and in llama.cpp itself (through
llama-cpp-python) when that is installed: tokenizer agreement, teacher-forced top-1 agreement and KL
divergence of llama.cpp's logits against the source's, with a threshold per GGUF type."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.core.export import verify as check
from llmos_cli.core.export.chat_format import ChatFormat

# tokenizer agreement is checked on text in several scripts, digits, whitespace runs and code
MULTILINGUAL_SAMPLE = (
    "The quick brown fox jumps over the lazy dog.",
    "Größere Äpfel schmecken süßer, sagt Jürgen.",
    "L'été dernier, nous sommes allés à Montréal.",
    "Съешь же ещё этих мягких французских булок.",
    "我们今天去公园散步，天气很好。",
    "東京は日本の首都です。カタカナもある。",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते, आप कैसे हैं?",
    "Emoji 🤖🚀 and numbers 1234567 3.14159",
    "def fib(n):\n\treturn n if n < 2 else fib(n - 1) + fib(n - 2)  # tabs\n\n   spaces",
)

TIE_LOGITS = 1e-2  # source logits this close (probabilities within 1%) are a tie: either token is top-1

# the least top-1 agreement and the most mean KL(source || llama.cpp) each GGUF type passes with; set
# from tiny random models (flat logits, many near-ties: the harshest case for top-1), with margin
RUNTIME_THRESHOLDS: dict[str, tuple[float, float]] = {
    "f32": (1.0, 1e-4),
    "f16": (1.0, 1e-3),
    "q8_0": (0.9, 5e-3),  # llama.cpp also rounds the activations to 8 bits in its q8_0 matmuls
    "q6_k": (0.8, 0.05),
    "q5_k_m": (0.65, 0.1),
    "q4_k_m": (0.5, 0.35),
    "q4_0": (0.35, 0.4),
}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def structure(path: Path, tokenizer: Any, arch: str, chat: ChatFormat | None) -> dict[str, Any]:
    """What the gguf reader finds: the architecture, the vocab at its ids, the special ids and the
    chat template, each True when it matches the source."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tokens = check.field_value(reader, "tokenizer.ggml.tokens") or []
    vocab = tokenizer.get_vocab()
    checks: dict[str, Any] = {
        "architecture": check.field_value(reader, "general.architecture") == arch,
        "tokenizer": all(i < len(tokens) and tokens[i] == tok for tok, i in vocab.items()),
        "eos_id": check.field_value(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id,
    }
    template = getattr(tokenizer, "chat_template", None)
    if template:
        checks["chat_template"] = check.field_value(reader, "tokenizer.chat_template") == template
    eot = chat.end_of_turn_id(tokenizer) if chat is not None else None
    if eot is not None:
        checks["eot_id"] = check.field_value(reader, "tokenizer.ggml.eot_token_id") == eot
    return checks


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def agreement(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Teacher-forced top-1 agreement and mean KL(reference || got) over every position of every prompt.
    A position agrees when llama.cpp's top token is the source's, or one the source scores within
    TIE_LOGITS of its best: a tie the source itself does not decide (f16 alone moves logits ~3e-3)."""
    ref, out = np.concatenate(reference).astype(np.float64), np.concatenate(got).astype(np.float64)
    picked = np.take_along_axis(ref, out.argmax(-1)[:, None], axis=-1)[:, 0]
    top1 = float((picked >= ref.max(-1) - TIE_LOGITS).mean())
    p, q = _softmax(ref), _softmax(out)
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)))
    return top1, max(kl, 0.0)


def in_llama_cpp(
    path: Path, tokenizer: Any, prompts: list[list[int]], reference: list[np.ndarray], dtype: str
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Load the GGUF in llama.cpp; its logits on `prompts` and the runtime checks (agreements, thresholds)."""
    import llama_cpp

    n_ctx = max(128, max(len(p) for p in prompts) + 8)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=0,  # an f32 KV cache: the comparison measures the weights' type, not the cache's
        type_v=0,
    )
    agree = sum(
        llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"]
        for text in MULTILINGUAL_SAMPLE
    )
    logits = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    top1, kl = agreement(reference, logits)
    min_top1, max_kl = RUNTIME_THRESHOLDS[dtype]
    checks: dict[str, Any] = {
        "llama_cpp": True,
        "llama_cpp_tokenizer": agree == len(MULTILINGUAL_SAMPLE),
        "llama_cpp_tokenizer_agreement": f"{agree}/{len(MULTILINGUAL_SAMPLE)}",
        "llama_cpp_eos_id": llm.token_eos() == tokenizer.eos_token_id,
        "top1_agreement": round(top1, 4),
        "kl_divergence": kl,
        "thresholds": {"min_top1_agreement": min_top1, "max_kl_divergence": max_kl},
        "llama_cpp_logits": top1 >= min_top1 and kl <= max_kl,
    }
    template = getattr(tokenizer, "chat_template", None)
    if template:
        checks["llama_cpp_chat_template"] = llm.metadata.get("tokenizer.chat_template") == template
    llm.close()
    return logits, checks


NOT_CHECKED = {
    "llama_cpp": "not checked: llama-cpp-python is not installed (pip install llama-cpp-python); "
    "llama.cpp tokenization, logits and top-1/KL agreement were not measured",
}


def verify_gguf(
    fmt: str,
    path: Path,
    config: Any,
    tokenizer: Any,
    chat: ChatFormat | None,
    prompts: list[list[int]],
    reference: list[np.ndarray],
    dtype: str,
) -> check.VerifyResult:
    """The GGUF's structure, then llama.cpp's logits when installed (exact types by max abs diff and
    agreement, the others by agreement), else a numpy llama forward pass where one applies."""
    import gguf

    from llmos_cli.core.export.gguf_arch import gguf_arch

    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, gguf_arch(config).gguf_arch)]
    checks = structure(path, tokenizer, arch, chat)
    precision = "fp32" if dtype == "f32" else dtype
    if llama_cpp_available():
        logits, runtime = in_llama_cpp(path, tokenizer, prompts, reference, dtype)
        checks.update(runtime)
        precision = "llama.cpp-fp32" if dtype == "f32" else precision
        if precision in check.TOLERANCES:
            return check.compare(fmt, precision, reference, logits, **checks)
        return check.by_checks(fmt, precision, reference, logits, checks)
    checks.update(NOT_CHECKED)
    if arch == "llama" and precision in check.TOLERANCES:
        return check.compare(fmt, precision, reference, check.gguf_llama_logits(path, prompts), **checks)
    checks["logits"] = "not checked: needs llama-cpp-python (or a llama-layout GGUF at f32, f16 or q8_0)"
    return check.by_checks(fmt, precision, reference, None, checks)
