"""Check an exported model against its source: logits on a few prompts, max abs diff, tolerance.

The reference logits come from the source model as loaded (a LoRA adapter on its base, unmerged), so a
merged export is compared with base + adapter. For llama-layout GGUFs without llama-cpp-python, a llama
forward pass written here runs over the dequantised GGUF tensors, the way llama.cpp reads them (permuted
Q/K with interleaved RoPE); gguf_check holds the structural and the llama.cpp checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.core.models import model_kind

VERIFY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Hello",
)

# tolerance = atol + rtol * max|reference logit|, by the precision the export stores
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-5),
    "llama.cpp-fp32": (2e-3, 1e-3),  # another kernel order and gelu/softcap code than torch's
    "onnx-fp32": (1e-3, 1e-5),
    "bf16": (1e-3, 5e-2),
    "f16": (1e-3, 1e-2),
    "q8_0": (1e-3, 1e-1),
    "int8": (1e-3, 2.5e-1),
}

Logits = list[np.ndarray]  # one array per prompt: (seq, vocab) for a causal LM, (labels,) for a classifier


class VerificationFailed(RuntimeError):
    """An export's logits differ from its source's beyond tolerance (a bug, not a user error: exit 1)."""


@dataclass
class VerifyResult:
    format: str
    max_abs_diff: float | None
    tolerance: float | None
    ok: bool
    precision: str
    n_prompts: int
    per_prompt: list[float]
    checks: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: Path) -> Path:
        path = directory / "verify.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def encode_prompts(
    tokenizer: Any, vocab_size: int, max_len: int = 64, prompts: Sequence[str] = VERIFY_PROMPTS
) -> list[list[int]]:
    """Token ids for the verification prompts (at most `max_len` each); fixed pseudo-random ids when the
    model has no tokenizer."""
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab_size, size=min(n, max_len)).tolist() for n in (9, 5, 1)]
    encoded = [tokenizer(p)["input_ids"][:max_len] for p in prompts]
    return [[i for i in ids if i < vocab_size] or [0] for ids in encoded]


def decoder_start_id(config: Any) -> int:
    """The token an encoder-decoder's decoder starts from."""
    return config.decoder_start_token_id or 0


def decoder_ids(config: Any, ids: list[int]) -> list[int]:
    """An encoder-decoder's teacher-forced decoder input for a prompt: the start token, then the prompt."""
    return [decoder_start_id(config), *ids]


def torch_logits(model: Any, prompts: list[list[int]]) -> Logits:
    """Logits of a torch model (HF or PeftModel) for each prompt, run one at a time without padding; an
    encoder-decoder gets the prompt as encoder input and decoder_ids(prompt) as decoder input."""
    import torch

    seq2seq = model_kind(model) == "seq2seq"
    result = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            extra = {"decoder_input_ids": torch.tensor([decoder_ids(model.config, ids)])} if seq2seq else {}
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), **extra).logits
            result.append(logits[0].float().numpy())
    return result


def compare(fmt: str, precision: str, reference: Logits, got: Logits, **checks: Any) -> VerifyResult:
    """Max abs diff per prompt and overall, against atol + rtol * max|reference|."""
    per_prompt = [
        float(np.abs(r - g).max()) if r.shape == g.shape else float("inf")
        for r, g in zip(reference, got, strict=True)
    ]
    atol, rtol = TOLERANCES[precision]
    scale = max(float(np.abs(r).max()) for r in reference)
    tol = atol + rtol * scale
    diff = max(per_prompt)
    ok = diff <= tol and all(v is not False for v in checks.values())
    return VerifyResult(fmt, diff, tol, ok, precision, len(reference), per_prompt, checks)


def by_checks(
    fmt: str, precision: str, reference: Logits, got: Logits | None, checks: dict[str, Any]
) -> VerifyResult:
    """A result decided by its checks (agreement thresholds), with the max abs diff recorded when the
    export's logits were computed, for types whose logits are not near-identical by design."""
    per_prompt = (
        [] if got is None else [float(np.abs(r - g).max()) for r, g in zip(reference, got, strict=True)]
    )
    diff = max(per_prompt) if per_prompt else None
    ok = all(v is not False for v in checks.values())
    return VerifyResult(fmt, diff, None, ok, precision, len(reference), per_prompt, checks)


def skipped(fmt: str, precision: str) -> VerifyResult:
    """The record written with --no-verify."""
    return VerifyResult(fmt, None, None, True, precision, 0, [], {"verified": False})


def padded_batch(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 input_ids and attention_mask for a batch of prompts."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
        mask[row, : len(p)] = 1
    return ids, mask


def unbatch(logits: np.ndarray, prompts: list[list[int]], causal: bool) -> Logits:
    """Split batched logits back into per-prompt arrays, dropping padded positions."""
    return [logits[row, : len(p)] if causal else logits[row] for row, p in enumerate(prompts)]


def onnx_logits(path: Path, prompts: list[list[int]], pad_id: int, causal: bool) -> Logits:
    """Run all prompts as one right-padded batch in onnxruntime; per-prompt logits without padding."""
    import onnxruntime as ort

    from llmos_cli.core.export.onnx import empty_past

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = padded_batch(prompts, pad_id)
    feed = {"input_ids": ids, "attention_mask": mask, **empty_past(session, len(prompts))}
    (logits,) = session.run(["logits"], feed)
    return unbatch(logits, prompts, causal)


def torch_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by a torch model, the whole sequence each step (no cache)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.tensor([ids])
            ids.append(
                int(
                    model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                    .logits[0, -1]
                    .argmax()
                )
            )
    return ids[len(prompt) :]


# ---- GGUF: a llama forward pass over the dequantised tensors ----------------------------------


def gguf_llama_logits(path: Path, prompts: list[list[int]]) -> Logits:
    """Logits of a llama GGUF file computed in numpy from its own metadata and tensors."""
    weights, hp = read_gguf_llama(path)
    return [_llama_forward(weights, hp, np.asarray(ids)) for ids in prompts]


def read_gguf_llama(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Dequantised float32 tensors (numpy row-major shapes) and llama hyper-parameters of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, not 'llama'")
    hp = {
        key: field_value(reader, f"llama.{key}")
        for key in (
            "block_count",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
        )
    }
    weights = {
        t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors
    }
    return weights, hp


def field_value(reader: Any, key: str) -> Any:
    """A scalar, string or array metadata value of a GGUFReader, or None when absent."""
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_interleaved(x: np.ndarray, n_dims: int, base: float, freq_factors: np.ndarray | None) -> np.ndarray:
    """llama.cpp's NORM rope: rotate adjacent pairs (2i, 2i+1) of each head. x: (heads, seq, head_dim)."""
    seq = x.shape[1]
    inv_freq = base ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    rot, rest = x[..., :n_dims], x[..., n_dims:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    out = np.empty_like(rot)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return np.concatenate([out, rest], axis=-1)


def _llama_forward(w: dict[str, np.ndarray], hp: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    n_head, n_kv = int(hp["attention.head_count"]), int(hp["attention.head_count_kv"])
    eps, base = float(hp["attention.layer_norm_rms_epsilon"]), float(hp["rope.freq_base"])
    n_rot = int(hp["rope.dimension_count"])
    freq_factors = w.get("rope_freqs.weight")
    seq = len(ids)
    causal = np.triu(np.full((seq, seq), -np.inf, dtype=np.float32), k=1)
    x = w["token_embd.weight"][ids]
    for i in range(int(hp["block_count"])):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], eps)

        def heads(t: np.ndarray, n: int) -> np.ndarray:
            return t.reshape(seq, n, -1).transpose(1, 0, 2)

        q = _rope_interleaved(heads(h @ w[p + "attn_q.weight"].T, n_head), n_rot, base, freq_factors)
        k = _rope_interleaved(heads(h @ w[p + "attn_k.weight"].T, n_kv), n_rot, base, freq_factors)
        v = heads(h @ w[p + "attn_v.weight"].T, n_kv)
        k, v = np.repeat(k, n_head // n_kv, axis=0), np.repeat(v, n_head // n_kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(seq, -1) @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T
