"""Every stage on a CUDA GPU (skipped without one; `make gpu-check` runs them): each test checks where
the model and its inputs are, the dtype (bf16 where the card has it), and a number: a loss that falls,
or logits that match the CPU run within bf16 tolerance."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from llmos_cli.core.models import describe_model
from llmos_cli.core.serve.runners import SamplingParams, open_runner
from llmos_cli.recipe import load_recipe, validate_recipe
from tests.finetune_fixtures import (
    instruction_rows,
    pair_rows,
    sentiment_rows,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    write_jsonl,
)

pytestmark = pytest.mark.cuda
BF16_TOL = {"rtol": 0.05, "atol": 0.05}  # bf16 has 8 bits of mantissa: ~1e-2 relative per op


def gpu_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-bases")
    return {"llama": tiny_llama(root / "llama"), "bert": tiny_bert(root / "bert"), "t5": tiny_t5(root / "t5")}


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def finetune_recipe(tmp_path: Path, base: Path, rows: list[dict], **sections) -> object:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    body = {
        "run": {"name": "gpu", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name_or_path": str(base)},
        "data": {"train": str(data), "validation_split": 0.1, "max_seq_len": 64, **sections.pop("data", {})},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 5, "device": "cuda"},
        **sections,
    }
    return validate_recipe(body, str(tmp_path / "recipe.yaml"))


def logits_match_cpu(model_dir: Path, prompt_ids: list[int]) -> None:
    """The model on the GPU (bf16) gives the CPU's fp32 logits within bf16 tolerance."""
    info = describe_model(model_dir)
    gpu = info.load(device=torch.device("cuda"), dtype=gpu_dtype())
    cpu = info.load()
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        on_gpu = gpu(input_ids=x.cuda()).logits.float().cpu()
        on_cpu = cpu(input_ids=x).logits
    assert next(gpu.parameters()).device.type == "cuda" and next(gpu.parameters()).dtype == gpu_dtype()
    torch.testing.assert_close(on_gpu, on_cpu, **BF16_TOL)


def test_pretrain_on_cuda_in_bf16(tiny_recipe: Path) -> None:
    from llmos_cli.stages import pretrain

    summary = pretrain.run(load_recipe(tiny_recipe, ["train.device=cuda"]))
    assert summary["device"].startswith("cuda") and summary["precision"] == (
        "bf16" if gpu_dtype() == torch.bfloat16 else "fp16"
    )
    run = tiny_recipe.parent / "run"
    assert losses(run)[-1] < 0.7 * losses(run)[0]
    assert torch.backends.cuda.matmul.allow_tf32  # fp32 matmuls on TF32 cores
    logits_match_cpu(run / "final", [1, 5, 9, 13, 17])


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_finetune_causal_on_cuda(tmp_path: Path, bases, method: str) -> None:
    from llmos_cli.stages import finetune

    recipe = finetune_recipe(
        tmp_path,
        bases["llama"],
        instruction_rows(200),
        data={"format": "instruction", "template": "Q: {prompt}\nA: "},
        finetune={
            "method": method,
            "lora": {"r": 8, "alpha": 64},
            "gradient_checkpointing": method == "qlora",
        },
    )
    summary = finetune.run(recipe)
    assert summary["device"].startswith("cuda") and summary["method"] == method
    assert losses(tmp_path / "run")[-1] < 0.5 * losses(tmp_path / "run")[0]
    model = describe_model(tmp_path / "run" / "final").load(device=torch.device("cuda"))
    if method == "qlora":
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cuda"


def test_finetune_classification_on_cuda(tmp_path: Path, bases) -> None:
    from llmos_cli.stages import finetune

    recipe = finetune_recipe(
        tmp_path,
        bases["bert"],
        sentiment_rows(256),
        task="classification",
        data={"format": "classification", "validation_split": 0.25, "max_seq_len": 16},
        finetune={"gradient_checkpointing": True},
    )
    summary = finetune.run(recipe)
    assert summary["device"].startswith("cuda")
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    assert summary["validation"]["accuracy"] > 0.6


def test_finetune_seq2seq_on_cuda(tmp_path: Path, bases) -> None:
    from llmos_cli.stages import finetune

    recipe = finetune_recipe(
        tmp_path,
        bases["t5"],
        pair_rows(200),
        task="seq2seq",
        data={"format": "pairs"},
        finetune={"method": "lora"},
    )
    summary = finetune.run(recipe)
    assert summary["device"].startswith("cuda")
    assert losses(tmp_path / "run")[-1] < 0.7 * losses(tmp_path / "run")[0]


def test_eval_on_cuda_matches_the_cpu_loss(tmp_path: Path, bases) -> None:
    from llmos_cli.stages import evaluate

    (tmp_path / "x.txt").write_text(
        "".join(r["prompt"] + " " + r["response"] + "\n" for r in instruction_rows(40))
    )
    results = {}
    for device in ("cuda", "cpu"):
        recipe = validate_recipe(
            {
                "model": {"name_or_path": str(bases["llama"])},
                "data": {"max_seq_len": 32},
                "eval": {"data": str(tmp_path / "x.txt"), "device": device},
                "run": {"output_dir": str(tmp_path / device)},
            },
            str(tmp_path / "eval.yaml"),
        )
        results[device] = evaluate.run(recipe)["metrics"]["loss"]
    assert results["cuda"] == pytest.approx(results["cpu"], rel=0.02)


def test_generate_and_chat_run_on_cuda_with_cpu_logits(bases, monkeypatch, capsys) -> None:
    from llmos_cli.stages import chat, generate

    runner = open_runner(describe_model(bases["llama"]), device="cuda")
    assert runner.model.device.type == "cuda" and runner.model.dtype == gpu_dtype()
    logits_match_cpu(bases["llama"], runner.encode("the cat"))
    texts = generate.run(
        str(bases["llama"]), SamplingParams(max_new_tokens=8), prompt="the cat", device="cuda"
    )
    assert texts and isinstance(texts[0], str)
    turns = iter(["hello"])
    monkeypatch.setattr("builtins.input", lambda *_: next(turns))  # one turn, then end of input
    with pytest.raises((StopIteration, SystemExit, EOFError)):
        chat.run(str(bases["llama"]), max_new_tokens=4, device="cuda")


def test_serve_batches_concurrent_clients_on_cuda(bases) -> None:
    from fastapi.testclient import TestClient

    from llmos_cli.stages import serve

    app = serve.build_app(str(bases["llama"]), api_key=None, device="cuda")
    with TestClient(app) as http:
        body = {"prompt": "the", "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: http.post("/v1/completions", json=body).status_code, range(16)))
        assert codes == [200] * 16
        assert http.get("/health").status_code == 200


def test_python_api_on_cuda(bases) -> None:
    from llmos_cli import LLMOS

    model = LLMOS().load_model(bases["llama"], device="cuda")
    assert model.model.device.type == "cuda" and model.model.dtype == gpu_dtype()
    assert isinstance(model.generate("the", max_new_tokens=4), str)


def test_export_of_a_gpu_trained_qlora_adapter_verifies(tmp_path: Path, bases) -> None:
    from llmos_cli.stages import export, finetune

    recipe = finetune_recipe(
        tmp_path,
        bases["llama"],
        instruction_rows(100),
        data={"format": "instruction", "template": "Q: {prompt}\nA: "},
        finetune={"method": "qlora"},
        train={"max_steps": 10, "batch_size": 8, "lr": 1e-2, "device": "cuda"},
    )
    finetune.run(recipe)
    result = export.run(str(tmp_path / "run" / "final"), ["hf"], tmp_path / "merged")
    assert result["exports"][0]["ok"]  # the dequantised merge against the 4-bit base + adapter
    kept = export.run(str(tmp_path / "run" / "final"), ["hf"], tmp_path / "adapter", merge_lora=False)
    assert kept["exports"][0]["ok"]
    from llmos_cli.core.train.adapters import adapter_quantization

    assert adapter_quantization(tmp_path / "adapter") == adapter_quantization(tmp_path / "run" / "final")


def test_llmos_run_pipeline_on_cuda(tiny_recipe: Path) -> None:
    import yaml

    from llmos_cli.stages import pipeline

    body = yaml.safe_load(tiny_recipe.read_text())
    body["train"].update(max_steps=6, eval_every=6, save_every=3, log_every=2, device="cuda")
    body["pipeline"] = {"stages": ["data", "pretrain", "eval"]}
    tiny_recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    result = pipeline.run(tiny_recipe, [])
    stages = {s["stage"]: s for s in result["stages"]}
    assert [s["status"] for s in stages.values()] == ["ran", "ran", "ran"]
    assert stages["pretrain"]["result"]["device"].startswith("cuda")
