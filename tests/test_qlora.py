"""QLoRA: a frozen 4-bit NF4 base (bitsandbytes: CUDA, or its CPU backend) with trainable LoRA adapters;
the merged export dequantises the base and is checked against the 4-bit base + adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llmos_cli.core.models import describe_model
from llmos_cli.core.train.adapters import apply_lora, check_qlora_available, quantized_load_kwargs
from llmos_cli.errors import UserError
from llmos_cli.recipe import FinetuneSection, validate_recipe
from llmos_cli.stages import export, finetune
from tests.finetune_fixtures import instruction_rows, tiny_llama, write_jsonl

bnb = pytest.importorskip("bitsandbytes")


def _has_4bit_backend() -> bool:
    try:
        check_qlora_available(torch.device("cpu"))
    except UserError:
        return False
    return True


cpu_4bit = pytest.mark.skipif(not _has_4bit_backend(), reason="this bitsandbytes has no CPU 4-bit backend")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def qlora_recipe(tmp_path: Path, base: Path, **finetune_keys) -> object:
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(200))
    body = {
        "run": {"name": "q", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name_or_path": str(base)},
        "data": {
            "train": str(data),
            "format": "instruction",
            "template": "Q: {prompt}\nA: ",
            "validation_split": 0.1,
            "max_seq_len": 64,
        },
        "finetune": {"method": "qlora", "lora": {"r": 8, "alpha": 64}, **finetune_keys},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 5, "eval_every": 100},
    }
    return validate_recipe(body, str(tmp_path / "recipe.yaml"))


def test_the_older_qlora_flag_is_method_qlora() -> None:
    old = FinetuneSection.model_validate({"method": "lora", "qlora": True})
    assert old.method == "qlora" and old.qlora and old.adapters
    assert FinetuneSection.model_validate({"qlora": False}).method == "full"
    assert "qlora" not in old.model_dump()  # `recipe show` prints the one spelling


@cpu_4bit
def test_qlora_base_is_4bit_nf4_and_only_adapters_train(llama: Path) -> None:
    cfg = FinetuneSection(method="qlora", double_quant=False)
    kwargs = quantized_load_kwargs({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, torch.device("cpu"))
    model = describe_model(llama).load("causal-lm", **kwargs)
    model = apply_lora(model, cfg, "causal-lm")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    assert (
        q_proj.base_layer.weight.dtype == torch.uint8
        and q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} <= {torch.float32, torch.bfloat16}


@cpu_4bit
@pytest.mark.slow
def test_qlora_trains_on_cpu_and_its_merged_export_matches_the_4bit_model(
    tmp_path: Path, llama: Path
) -> None:
    summary = finetune.run(qlora_recipe(tmp_path, llama))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["method"] == "qlora" and summary["saved_as"] == "adapter"
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "quantization.json").read_text())
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"] is True

    loaded = describe_model(final).load()  # as trained: 4-bit base + adapter
    assert type(loaded.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"

    result = export.run(str(final), ["hf"], tmp_path / "merged")
    (exported,) = result["exports"]
    assert exported["ok"] and exported["max_abs_diff"] < 1e-4  # against the 4-bit base + adapter
    merged = describe_model(tmp_path / "merged").load()
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the base dequantised


def test_qlora_without_a_4bit_backend_exits_2_naming_the_key(monkeypatch) -> None:
    import bitsandbytes.functional as F

    def no_backend(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", no_backend)
    with pytest.raises(UserError, match=r"finetune.method: qlora: bitsandbytes has no 4-bit backend for cpu"):
        check_qlora_available(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UserError, match="finetune.method: qlora needs the bitsandbytes package"):
        check_qlora_available(torch.device("cpu"))


def test_qlora_refused_before_anything_is_written(tmp_path: Path, llama: Path, monkeypatch) -> None:
    import bitsandbytes.functional as F

    monkeypatch.setattr(F, "quantize_4bit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("none")))
    with pytest.raises(UserError, match="finetune.method: qlora"):
        finetune.run(qlora_recipe(tmp_path, llama))
    assert not (tmp_path / "run" / "final").exists()
