"""Export to HF, ONNX and GGUF: each artefact's logits match the source; failures leave no output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

torch = pytest.importorskip("torch")

from llmos_cli.core.export import verify as check  # noqa: E402
from llmos_cli.errors import UserError  # noqa: E402
from llmos_cli.stages import export as export_stage  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
] * 40


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(path: Path, arch: str = "llama", **overrides) -> Path:
    """A tiny llama (or another `arch` of its layout: hidden 64, 2 layers, GQA) with a locally trained
    byte-level BPE tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch,
        **{
            "vocab_size": len(tokenizer) + 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            **overrides,
        },
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the 0.02 init give logits big enough to tell apart
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny llama, lora_B perturbed so that merging changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=200,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
    ).save_pretrained(path)
    return path


def ids_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


# ---- HF ---------------------------------------------------------------------------------------


def test_hf_merged_logits_equal_base_plus_adapter(llama_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = export_stage.run(str(adapter_dir), ["hf"], tmp_path / "merged")
    out = tmp_path / "merged"
    (result,) = summary["exports"]
    assert result["ok"] and result["max_abs_diff"] <= 1e-4
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "verify.json",
    } <= set(result["files"])
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "verify.json").read_text())["max_abs_diff"] == result["max_abs_diff"]

    ids = ids_batch(300)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(adapter_dir)
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    assert np.abs(logits_of(merged, ids) - logits_of(with_adapter, ids)).max() <= 1e-4
    assert np.abs(logits_of(merged, ids) - logits_of(base, ids)).max() > 1e-2  # the merge did something


def test_hf_keeps_adapter_when_not_merging(adapter_dir, tmp_path):
    summary = export_stage.run(str(adapter_dir), ["hf"], tmp_path / "adapter", merge_lora=False)
    assert summary["exports"][0]["ok"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "tokenizer.json").exists()  # the base's tokenizer travels with it


def test_model_card_records_recipe_fingerprint_and_metrics(llama_dir, tmp_path):
    from llmos_cli.core.registry import Registry

    run_dir = tmp_path / "runs" / "my-run"
    shutil.copytree(llama_dir, run_dir / "final")
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # rebuilt since the run trained (another max_seq_len): not the run's data
    (data_dir / "report.json").write_text(json.dumps({"fingerprint": "rebuilt999"}))
    (run_dir / "recipe.yaml").write_text(
        f"task: causal-lm\ndata:\n  output: {data_dir}\ntrain:\n  lr: 0.0003\n"
    )
    (run_dir / "eval.json").write_text(
        json.dumps({"metrics": {"loss": 2.5, "perplexity": 12.18}, "data": "val.jsonl"})
    )
    Registry().add(llama_dir, name="tiny-base")
    Registry().register_run(
        run_dir / "final", name="my-run", parent=str(llama_dir), data_fingerprint="abc123def"
    )

    export_stage.run(str(run_dir), ["hf"], tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    assert "abc123def" in card and "rebuilt999" not in card  # the run's own record
    front = card.split("---")[1]
    assert "base_model: tiny-base" in front and str(llama_dir) not in front
    assert f"`tiny-base` at `{llama_dir}` (fine-tuned from it)" in card
    assert "| perplexity | 12.18 |" in card
    assert "lr: 0.0003" in card
    assert "max abs diff" in card


def test_model_card_names_an_adapters_base_by_hub_id_not_path(adapter_dir, llama_dir, tmp_path):
    from llmos_cli.core.registry import public_name

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    assert public_name(snapshot) == "acme/tiny-llama"
    assert public_name(llama_dir) is None  # neither registered nor from the hub
    export_stage.run(str(adapter_dir), ["hf"], tmp_path / "export", verify=False)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # no local path in the front matter
    assert f"Base model: `{llama_dir}` (LoRA adapter merged into it)" in card


def test_model_card_without_run_record(llama_dir, tmp_path):
    export_stage.run(str(llama_dir), ["hf"], tmp_path / "export", verify=False)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "not recorded" in card and "No eval.json" in card
    assert json.loads((tmp_path / "export" / "verify.json").read_text())["checks"] == {"verified": False}


# ---- ONNX -------------------------------------------------------------------------------------


def onnx_run(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from llmos_cli.core.export.onnx import empty_past

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask, **empty_past(session, len(ids))}
    return session.run(["logits"], feed)[0]


def test_onnx_causal_lm_runs_in_onnxruntime_with_dynamic_axes(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = export_stage.run(str(llama_dir), ["onnx"], tmp_path / "onnx")
    (result,) = summary["exports"]
    assert result["ok"] and result["max_abs_diff"] <= 1e-3
    assert result["checks"] == {"greedy_with_kv_cache": True}
    assert {"model.onnx", "config.json", "tokenizer.json", "verify.json"} <= set(result["files"])

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    for batch, seq in [(1, 1), (3, 17)]:  # neither is the export's example shape (2, 8)
        ids = torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(seq))
        got = onnx_run(tmp_path / "onnx" / "model.onnx", ids.numpy(), np.ones((batch, seq), dtype=np.int64))
        assert np.abs(got - logits_of(model, ids)).max() <= 1e-3


def test_onnx_kv_cache_generation_equals_transformers_greedily(llama_dir, tmp_path):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from llmos_cli.core.export.onnx import onnx_greedy

    export_stage.run(str(llama_dir), ["onnx"], tmp_path / "onnx", verify=False)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= names
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    prompt = [5, 17, 42, 9, 100]
    cached = onnx_greedy(session, prompt, 40)
    assert cached == check.torch_greedy(model, prompt, 40)
    assert cached == onnx_greedy(session, prompt, 40, use_cache=False)


def test_onnx_int8_quantisation(llama_dir, tmp_path):
    summary = export_stage.run(str(llama_dir), ["onnx"], tmp_path / "q", quantize=True)
    (result,) = summary["exports"]
    assert result["ok"] and result["precision"] == "int8"
    assert not list((tmp_path / "q").glob("model.fp32*"))
    assert 0 < result["max_abs_diff"] <= result["tolerance"]


def test_onnx_classification(bert_dir, tmp_path):
    from transformers import BertForSequenceClassification

    summary = export_stage.run(str(bert_dir), ["onnx"], tmp_path / "cls")
    assert summary["task"] == "classification" and summary["exports"][0]["max_abs_diff"] <= 1e-3
    model = BertForSequenceClassification.from_pretrained(str(bert_dir)).eval()
    ids = torch.randint(3, 200, (4, 6), generator=torch.Generator().manual_seed(0))
    got = onnx_run(tmp_path / "cls" / "model.onnx", ids.numpy(), np.ones((4, 6), dtype=np.int64))
    assert got.shape == (4, 3)
    assert np.abs(got - logits_of(model, ids)).max() <= 1e-3


def t5_model(path: Path) -> Path:
    """The tiny T5 with weights large enough that greedy decoding varies its tokens."""
    from transformers import T5ForConditionalGeneration

    from tests.finetune_fixtures import tiny_t5

    tiny_t5(path)
    model = T5ForConditionalGeneration.from_pretrained(str(path))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(path))
    return path


def test_onnx_t5_encoder_and_decoder_with_past_generate_as_transformers(tmp_path):
    import onnxruntime as ort
    from transformers import T5ForConditionalGeneration

    from llmos_cli.core.export.onnx_seq2seq import Seq2SeqSession, seq2seq_greedy

    t5 = t5_model(tmp_path / "t5")
    (result,) = export_stage.run(str(t5), ["onnx"], tmp_path / "onnx")["exports"]
    assert result["ok"] and result["max_abs_diff"] <= result["tolerance"]
    assert result["checks"] == {"greedy_with_kv_cache": True}
    assert {"encoder.onnx", "decoder.onnx", "decoder_with_past.onnx", "config.json"} <= set(result["files"])
    with_past = ort.InferenceSession(str(tmp_path / "onnx" / "decoder_with_past.onnx"))
    names = {i.name for i in with_past.get_inputs()}
    assert {"past_key_values.1.decoder.key", "past_key_values.1.encoder.value"} <= names

    model = T5ForConditionalGeneration.from_pretrained(str(t5)).eval()
    session, seen = Seq2SeqSession(tmp_path / "onnx"), set()
    for prompt in ([5, 6, 7, 8, 9, 3], [10, 4], list(range(3, 20))):  # not the export's example shapes
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, num_beams=1)
        tokens = ref[0].tolist()[1:]
        assert seq2seq_greedy(session, prompt, 40, 0, model.config.eos_token_id) == tokens
        seen |= set(tokens)
    assert len(seen) > 4  # a real test: the greedy tokens vary


def test_onnx_t5_int8(tmp_path):
    from tests.finetune_fixtures import tiny_t5

    t5 = tiny_t5(tmp_path / "t5")  # its own init: t5_model's larger weights lose more at int8 (docs)
    (result,) = export_stage.run(str(t5), ["onnx"], tmp_path / "q", quantize=True)["exports"]
    assert result["ok"] and result["precision"] == "int8"
    assert 0 < result["max_abs_diff"] <= result["tolerance"]
    assert not list((tmp_path / "q").glob("*.fp32.onnx"))


# ---- GGUF -------------------------------------------------------------------------------------


def test_gguf_reads_back_with_llama_names_shapes_and_tokenizer(llama_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    summary = export_stage.run(str(llama_dir), ["gguf"], tmp_path / "gguf", gguf_dtype="f16")
    (result,) = summary["exports"]
    assert result["ok"]
    assert {k: result["checks"][k] for k in ("architecture", "tokenizer", "eos_id")} == dict.fromkeys(
        ("architecture", "tokenizer", "eos_id"), True
    )
    path = tmp_path / "gguf" / f"{llama_dir.name}-f16.gguf"
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [path.name, "verify.json"]

    reader = GGUFReader(path)
    field = check.field_value
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.attention.head_count_kv") == 2
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    vocab = len(tokenizer) + 4  # the model's vocab is padded beyond the tokenizer's
    assert tensors["token_embd.weight"] == ("F16", [64, vocab])  # ggml order: ne0 = columns
    assert tensors["output.weight"] == ("F16", [64, vocab])
    assert tensors["output_norm.weight"] == ("F32", [64])
    for i in range(2):
        assert tensors[f"blk.{i}.attn_q.weight"] == ("F16", [64, 64])
        assert tensors[f"blk.{i}.attn_k.weight"] == ("F16", [64, 32])
        assert tensors[f"blk.{i}.ffn_down.weight"] == ("F16", [128, 64])
        assert tensors[f"blk.{i}.attn_norm.weight"] == ("F32", [64])
    assert len(tensors) == 3 + 2 * 9

    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == vocab and tokens[-1] == f"[PAD{vocab - 1}]"
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # specials are CONTROL
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert len(field(reader, "tokenizer.ggml.merges")) > 0


@pytest.mark.parametrize(("dtype", "tol"), [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 3e-1)])
def test_gguf_forward_matches_source(llama_dir, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    export_stage.run(str(llama_dir), ["gguf"], tmp_path, gguf_dtype=dtype, verify=False)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    prompts = [[5, 70, 200, 31, 9, 120, 44], [7]]
    got = check.gguf_llama_logits(tmp_path / f"{llama_dir.name}-{dtype}.gguf", prompts)
    for ids, logits in zip(prompts, got, strict=True):
        assert np.abs(logits - logits_of(model, torch.tensor([ids]))[0]).max() <= tol


def test_gguf_tied_embeddings_and_llama3_rope_scaling(tmp_path):
    from gguf import GGUFReader

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model_dir = save_tiny_llama(tmp_path / "llama3", tie_word_embeddings=True, rope_parameters=rope)
    summary = export_stage.run(str(model_dir), ["gguf"], tmp_path / "g", gguf_dtype="f32")
    assert summary["exports"][0]["max_abs_diff"] <= 1e-4
    names = {t.name for t in GGUFReader(tmp_path / "g" / "llama3-f32.gguf").tensors}
    assert "rope_freqs.weight" in names and "output.weight" not in names


def test_gguf_of_a_mistral_matches_it_and_sliding_windows_are_refused(tmp_path):
    from gguf import GGUFReader

    mistral = save_tiny_llama(tmp_path / "mistral", arch="mistral", sliding_window=None)
    summary = export_stage.run(str(mistral), ["gguf"], tmp_path / "g", gguf_dtype="f32")
    assert summary["exports"][0]["max_abs_diff"] <= 1e-4  # verified against transformers' Mistral
    reader = GGUFReader(tmp_path / "g" / "mistral-f32.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    windowed = save_tiny_llama(tmp_path / "windowed", arch="mistral", sliding_window=16)
    with pytest.raises(UserError, match="sliding-window attention \\(16 of 128 positions\\)"):
        export_stage.run(str(windowed), ["gguf"], tmp_path / "w")


def test_gguf_of_adapter_is_merged(adapter_dir, tmp_path):
    summary = export_stage.run(str(adapter_dir), ["gguf"], tmp_path / "g", gguf_dtype="f32")
    assert summary["exports"][0]["max_abs_diff"] <= 1e-4  # reference is base + adapter


def test_unpermuted_qk_fails_and_leaves_no_output(llama_dir, tmp_path, monkeypatch):
    from llmos_cli.core.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n_head: w)
    target = tmp_path / "bad"
    with pytest.raises(check.VerificationFailed, match="gguf export does not match"):
        export_stage.run(str(llama_dir), ["gguf"], target, gguf_dtype="f32")
    assert list(tmp_path.iterdir()) == []


# ---- several formats, and what is refused ------------------------------------------------------


def test_several_formats_go_to_subdirectories_and_replace_an_old_export(llama_dir, tmp_path):
    export_stage.run(str(llama_dir), ["hf"], tmp_path / "out" / "hf", verify=False)
    summary = export_stage.run(str(llama_dir), ["hf", "gguf"], tmp_path / "out", gguf_dtype="q8_0")
    assert [r["format"] for r in summary["exports"]] == ["hf", "gguf"]
    assert all(r["ok"] for r in summary["exports"])
    assert (tmp_path / "out" / "hf" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "hf" / "verify.json").read_text())["max_abs_diff"] is not None
    assert (tmp_path / "out" / "gguf" / f"{llama_dir.name}-q8_0.gguf").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gguf", "hf"]


def test_refusals(llama_dir, bert_dir, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(t5)
    with pytest.raises(UserError, match="GGUF export does not support the 'bert' architecture"):
        export_stage.run(str(bert_dir), ["gguf"], tmp_path / "x")
    with pytest.raises(UserError, match="GGUF export does not support the 't5' architecture"):
        export_stage.run(str(t5), ["gguf"], tmp_path / "x")
    from types import SimpleNamespace

    from llmos_cli.core.export.onnx import check_onnx_supported

    with pytest.raises(UserError, match="seq2seq models supports t5, mt5; this one is bart"):
        check_onnx_supported("seq2seq", SimpleNamespace(model_type="bart"))
    with pytest.raises(UserError, match="unknown export format tflite"):
        export_stage.run(str(llama_dir), ["tflite"], tmp_path / "x")
    with pytest.raises(UserError, match="gguf-dtype"):
        export_stage.run(str(llama_dir), ["gguf"], tmp_path / "x", gguf_dtype="q3_k")
    from llmos_cli.core.export import gguf_quant

    real = gguf_quant.importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:  # a K-quant without llama-cpp-python names the package
        mp.setattr(gguf_quant.importlib.util, "find_spec", lambda m: None if m == "llama_cpp" else real(m))
        with pytest.raises(UserError, match="q4_k_m needs the llama-cpp-python package"):
            export_stage.run(str(llama_dir), ["ollama"], tmp_path / "x", gguf_dtype="q4_k_m")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an llmos export"):
        export_stage.run(str(llama_dir), ["hf"], busy)
    assert not (tmp_path / "x").exists()


def test_llama_cpp_loads_the_gguf(llama_dir, tmp_path):
    """End to end in llama.cpp itself, when llama-cpp-python is installed (it is not a dependency)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_stage.run(str(llama_dir), ["gguf"], tmp_path, gguf_dtype="f32", verify=False)
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / f"{llama_dir.name}-f32.gguf"),
        logits_all=True,
        n_ctx=128,
        verbose=False,
        n_threads=1,
        type_k=0,
        type_v=0,
    )  # f32 KV cache
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    for text in ["The quick brown fox jumps over the lazy dog.", "def fib(n):\n    return n  # 12345"]:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
        llm.reset()
        llm.eval(ids)
        assert (
            np.abs(np.array(llm.scores[: len(ids)]) - logits_of(model, torch.tensor([ids]))[0]).max() <= 1e-3
        )
