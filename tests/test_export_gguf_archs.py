"""GGUF export of every architecture and type llmos writes: structure always, and in llama.cpp itself
(top-1 agreement, KL, tokenizer agreement) when llama-cpp-python is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from llmos_cli.core.export import verify as check  # noqa: E402
from llmos_cli.errors import UserError  # noqa: E402
from llmos_cli.stages import export as export_stage  # noqa: E402
from tests.test_export import make_tokenizer  # noqa: E402

# tiny configs of each architecture: hidden 64, 2 layers, 4 heads (GQA where the model has it)
DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
ARCHS = {
    "qwen2": ("qwen2", DECODER),
    "qwen3": ("qwen3", {**DECODER, "head_dim": 16}),
    "gemma2": ("gemma2", {**DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "gemma3_text": ("gemma3", {**DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "phi3": ("phi3", DECODER),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
}


def make_spm_tokenizer():
    """A SentencePiece-style BPE (spaces as "▁", a "▁" before the text, byte fallback), as Gemma and
    Llama 2 tokenizers are in tokenizer.json form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.test_export import CORPUS

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", "<pad>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny(
    path: Path, model_type: str, chat_template: str | None = None, spm: bool = False, **overrides
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_spm_tokenizer() if spm else make_tokenizer()
    if chat_template is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    kwargs = {**ARCHS[model_type][1], **ids, "vocab_size": len(tokenizer) + 4, **overrides}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    with torch.no_grad():  # larger weights than the init give logits big enough to tell apart
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def exported(model_dir: Path, out: Path, fmt: str = "gguf", dtype: str = "f32") -> tuple[dict, Path]:
    (result,) = export_stage.run(str(model_dir), [fmt], out, gguf_dtype=dtype)["exports"]
    return result, next(out.glob("*.gguf"))


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_each_architecture_writes_its_llama_cpp_arch(model_type, tmp_path):
    from gguf import GGUFReader

    model_dir = save_tiny(tmp_path / model_type, model_type)
    result, path = exported(model_dir, tmp_path / "out")
    assert result["ok"], result["checks"]
    checks = result["checks"]
    assert checks["architecture"] and checks["tokenizer"] and checks["eos_id"]
    reader = GGUFReader(path)
    arch = ARCHS[model_type][0]
    assert check.field_value(reader, "general.architecture") == arch
    assert check.field_value(reader, f"{arch}.block_count") == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_norm.weight"} <= names
    if model_type in ("qwen3", "gemma3_text"):
        assert "blk.0.attn_q_norm.weight" in names
    if model_type.startswith("gemma"):  # Gemma's (1 + w) norms are stored as w + 1
        norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
        assert abs(float(norm.data.mean()) - 1.0) < 1e-6  # HF initialises w at 0
    if model_type in ("gpt2", "phi3"):  # fused Q/K/V as the runtime reads them
        assert "blk.0.attn_qkv.weight" in names
    if model_type == "phi3":  # gate_up_proj as one ffn_up of twice the width; a name llama.cpp loads
        up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        assert sorted(int(n) for n in up.shape) == [64, 256] and "blk.0.ffn_gate.weight" not in names
        assert check.field_value(reader, "general.name") == "phi_3"
    if model_type == "gpt2":
        assert "position_embd.weight" in names
    if checks.get("llama_cpp") is True:  # identical tokens at f32
        assert checks["top1_agreement"] == 1.0 and checks["llama_cpp_tokenizer"]
        assert result["max_abs_diff"] <= result["tolerance"]
    else:
        assert "not installed" in checks["llama_cpp"]


def test_sentencepiece_style_vocab_is_a_llama_tokenizer_model(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model_dir = save_tiny(tmp_path / "g", "gemma2", spm=True)
    result, path = exported(model_dir, tmp_path / "out")
    assert result["ok"], result["checks"]
    reader = GGUFReader(path)
    field = check.field_value
    assert (
        field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.pre") == "default"
    )
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tokenizer.get_vocab()
    types, scores = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.scores")
    assert types[vocab["<0x41>"]] == 6 and types[vocab["</s>"]] == 3  # BYTE; CONTROL
    merged = [t for t in vocab if len(t) > 1 and not t.startswith("<")]
    assert merged and all(scores[vocab[t]] < 0 for t in merged)  # every merged token ranks by its merge
    if result["checks"].get("llama_cpp") is True:
        assert result["checks"]["llama_cpp_tokenizer"], result["checks"]["llama_cpp_tokenizer_agreement"]


def test_unsupported_configurations_are_refused(tmp_path):
    gemma = save_tiny(tmp_path / "g", "gemma2", query_pre_attn_scalar=256)
    with pytest.raises(UserError, match="query_pre_attn_scalar 256 != head_dim 16"):
        export_stage.run(str(gemma), ["gguf"], tmp_path / "x")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    phi = save_tiny(tmp_path / "p", "phi3", rope_parameters=rope)
    with pytest.raises(UserError, match="partial_rotary_factor 0.5"):
        export_stage.run(str(phi), ["gguf"], tmp_path / "y")


def test_a_phi3_name_is_kept_only_with_phi3s_own_vocab():
    from llmos_cli.core.export.gguf import runtime_name

    assert runtime_name("my-Phi-3-sft", {"<s>": 0}) == "my-Phi_3-sft"
    assert runtime_name("phi3", {}) == "phi_3" and runtime_name("llama", {}) == "llama"
    phi3_vocab = {"<s>": 1, "</s>": 2, "<unk>": 0, "<|endoftext|>": 3}
    assert runtime_name("phi3-mini", phi3_vocab) == "phi3-mini"


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_gguf_py_types_are_written_without_llama_cpp(dtype, tmp_path):
    from gguf import GGUFReader

    model_dir = save_tiny(tmp_path / "m", "qwen2")
    result, path = exported(model_dir, tmp_path / "out", dtype=dtype)
    assert result["ok"], result["checks"]
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
def test_llama_cpp_agreement_per_type(dtype, tmp_path):
    """In llama.cpp: identical top-1 tokens at f16, the stated agreement for q8_0 and 4/5/6-bit types."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from llmos_cli.core.export.gguf_check import RUNTIME_THRESHOLDS

    # hidden 256: K-quants pack rows in blocks of 256 (narrower rows fall back to other types)
    model_dir = save_tiny(tmp_path / "m", "qwen2", hidden_size=256, intermediate_size=512)
    result, path = exported(model_dir, tmp_path / "out", dtype=dtype)
    checks = result["checks"]
    print(dtype, json.dumps({k: checks[k] for k in ("top1_agreement", "kl_divergence")}))
    assert result["ok"], checks
    min_top1, max_kl = RUNTIME_THRESHOLDS[dtype]
    assert checks["top1_agreement"] >= min_top1 and checks["kl_divergence"] <= max_kl
    assert checks["llama_cpp_tokenizer"] and checks["llama_cpp_eos_id"]
    if dtype == "f16":
        assert checks["top1_agreement"] == 1.0
    expected = {"q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}.get(dtype)
    if expected is not None:  # llama.cpp's own mixture: mostly this type, some tensors higher
        assert expected in {t.tensor_type.name for t in GGUFReader(path).tensors}


def test_top1_agreement_counts_a_source_near_tie_as_agreeing():
    import numpy as np

    from llmos_cli.core.export.gguf_check import TIE_LOGITS, agreement

    ref = np.array([[2.0, 2.0 - TIE_LOGITS / 3, 0.0], [3.0, 1.0, 0.0]])
    flipped_tie = np.array([[2.0, 2.01, 0.0], [3.0, 1.0, 0.0]])
    flipped_real = np.array([[2.0, 1.9, 0.0], [1.0, 3.0, 0.0]])
    assert agreement([ref], [flipped_tie])[0] == 1.0
    assert agreement([ref], [flipped_real])[0] == 0.5


def trained_tiny(path: Path, steps: int = 150) -> Path:
    """A tiny qwen2 that has learned the test corpus: decisive logits, as a trained model has."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_export import CORPUS

    save_tiny(path, "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    texts = sorted(set(CORPUS))
    batch = tokenizer([f"<s>{t}</s>" for t in texts], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_a_trained_model_generates_the_same_tokens_in_llama_cpp(dtype, tmp_path):
    """Greedy generation in llama.cpp equals transformers' at f16 and q8_0 once logits are decisive
    (random tiny models' near-ties are what the per-type top-1 thresholds allow for)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = trained_tiny(tmp_path / "m")
    result, path = exported(model_dir, tmp_path / "out", dtype=dtype)
    assert result["ok"], result["checks"]
    assert result["checks"]["top1_agreement"] == 1.0
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    for text in ("<s>the quick", "<s>def fib(n):", "<s>hello"):
        ids = tokenizer(text)["input_ids"]
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(len(expected)):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        assert got == expected.tolist(), text
    llm.close()
