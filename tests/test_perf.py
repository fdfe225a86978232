"""The benchmark runner's report (no timings asserted) and the training-precision choice."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bench import run as bench_run
from llmos_cli.core import runtime


def test_bench_report_survives_a_failing_benchmark(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_run, "discover", lambda: ["bench_missing"])
    out = tmp_path / "results.md"
    code = bench_run.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert code == 1
    assert "## missing" in text and "**FAILED**" in text and "ModuleNotFoundError" in text
    assert "command: `python -m bench.run --quick --out" in text
    assert f"torch {torch.__version__}" in text and "machine:" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["env"]["mode"] == "quick" and "error" in saved["sections"][0]


def test_bench_report_renders_rows_and_previous_ratio(tmp_path: Path) -> None:
    env = bench_run.environment(False, [])
    env["machine"]["load_avg_end"] = None
    rows = [
        {"name": "x vs y", "baseline": 100.0, "ours": 250.0, "ratio": 2.5, "unit": "tokens/s", "notes": "a|b"}
    ]
    section = {"title": "Training", "rows": [bench_run.check_row(r) for r in rows], "seconds": 1.0}
    prev_file = tmp_path / "results.json"
    prev_file.write_text(
        json.dumps({"env": env, "sections": [{**section, "rows": [{**rows[0], "ratio": 3.0}]}]})
    )
    text = bench_run.render(env, [section], bench_run.previous_ratios(prev_file, env))
    assert "| x vs y | 100 | 250 | tokens/s | **2.50x** | 3.00x | a/b |" in text
    with pytest.raises(ValueError, match="lacks"):
        bench_run.check_row({"name": "no figure"})


def test_bench_child_records_a_module_without_run(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bench_norun.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "bench.bench_norun", __import__("bench_norun"))
    rows_out = tmp_path / "rows.json"
    bench_run.run_child("bench_norun", True, rows_out, None)
    assert "defines no run(quick: bool)" in json.loads(rows_out.read_text())["error"]


@pytest.mark.parametrize(("speedup", "chosen"), [(2.5, "bf16"), (1.29, "fp32"), (0.4, "fp32")])
def test_auto_precision_on_cpu_is_what_the_probe_measures(monkeypatch, speedup: float, chosen: str) -> None:
    """bf16 autocast where it measures at least 1.3x fp32 at the model's shapes, once per machine, torch
    version, thread count and shape (cached under LLMOS_HOME); inference follows the same rule."""
    from transformers import LlamaConfig

    from llmos_cli.core import precision_probe

    measured = []
    monkeypatch.setattr(
        precision_probe, "measure_bf16_speedup", lambda shape: measured.append(shape) or speedup
    )
    config = LlamaConfig(hidden_size=96, intermediate_size=200)
    cpu = torch.device("cpu")
    first = runtime.pick_precision("auto", cpu, config)
    assert (first.name, first.measured.speedup, first.measured.shape, first.measured.cached) == (
        chosen,
        speedup,
        (96, 200),
        False,
    )
    again = runtime.pick_precision("auto", cpu, config)
    assert again.name == chosen and again.measured.cached and measured == [(96, 200)]
    assert (
        runtime.inference_dtype(cpu, "auto", config=config)
        == {"bf16": torch.bfloat16, "fp32": torch.float32}[chosen]
    )
    assert runtime.pick_precision("fp32", cpu, config).name == "fp32"  # explicit choices measure nothing
    assert runtime.pick_precision("bf16", cpu, config).name == "bf16" and measured == [(96, 200)]
    assert runtime.pick_precision("auto", cpu).name == "fp32"  # shapes unknown: nothing to measure


@pytest.mark.precision_probe
def test_the_probe_measures_a_real_ratio() -> None:
    from llmos_cli.core.precision_probe import measure_bf16_speedup

    ratio = measure_bf16_speedup((64, 128), tokens=32)
    assert 0 < ratio < float("inf")


def test_a_run_records_what_auto_chose_and_a_resume_keeps_it(tiny_recipe: Path, monkeypatch) -> None:
    from llmos_cli.core import precision_probe
    from llmos_cli.recipe import load_recipe
    from llmos_cli.stages import pretrain

    monkeypatch.setattr(precision_probe, "measure_bf16_speedup", lambda shape: 2.0)
    first = pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=10"]))
    run = Path(first["run_dir"])
    assert first["precision"] == "bf16"
    record = json.loads((run / "precision.json").read_text())
    assert record == {
        "requested": "auto",
        "precision": "bf16",
        "device": "cpu",
        "bf16_speedup": 2.0,
        "probed_shape": [32, 64],
    }
    assert (
        (run / "recipe.yaml")
        .read_text()
        .rstrip()
        .splitlines()[-1]
        .startswith("# train.precision auto chose bf16: bf16 autocast measured 2.00x fp32")
    )
    # another machine (or a cleared cache) measures no gain: the resumed run still trains in bf16
    monkeypatch.setattr(precision_probe, "measure_bf16_speedup", lambda shape: 1.0)
    (Path(os.environ["LLMOS_HOME"]) / "precision-probe.json").unlink()
    resumed = pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=20"]))
    assert resumed["precision"] == "bf16" and resumed["steps"] == 20
    fresh = pretrain.run(load_recipe(tiny_recipe, ["train.max_steps=20", "train.resume=never"]))
    assert fresh["precision"] == "fp32"


def test_length_grouped_batches_cut_padding_and_stay_resumable() -> None:
    from llmos_cli.core.train.batches import ResumableBatchSampler

    lengths = [8 + (i * 37) % 120 for i in range(400)]

    def padding(sampler: ResumableBatchSampler, n: int) -> float:
        it = iter(sampler)
        batches = [next(it) for _ in range(n)]
        real = sum(lengths[i] for b in batches for i in b)
        return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = ResumableBatchSampler(400, 8, seed=3, lengths=lengths)
    assert padding(grouped, 50) < 0.05 < 0.3 < padding(ResumableBatchSampler(400, 8, seed=3), 50)
    it = iter(grouped)
    epoch = [next(it) for _ in range(50)]
    assert sorted(i for b in epoch for i in b) == list(range(400))  # every row once per epoch
    longest = [max(lengths[i] for i in b) for b in epoch]
    assert longest != sorted(longest, reverse=True)  # batches come in random order, not by length
    first_epochs = [next(it) for _ in range(60)]  # into epoch 3
    resumed = iter(ResumableBatchSampler(400, 8, seed=3, start_batch=70, lengths=lengths))
    assert [next(resumed) for _ in range(40)] == first_epochs[20:]


FAULTS_PER_ROUND = """
import resource, sys, torch
from llmos_cli.core.allocator import retain_freed_memory


def faults_per_round() -> int:
    # A training step's pattern: the same large buffers allocated, written and freed every step.
    # (Tuned, the heap takes a few rounds to grow to its steady size.)
    for _ in range(10):
        x = torch.empty(16_000_000); x.fill_(1); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        x = torch.empty(16_000_000); x.fill_(1); del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20


untuned = faults_per_round()
print(untuned, int(retain_freed_memory()), faults_per_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_cpu_stages_keep_freed_buffers_instead_of_page_faulting_every_step() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ROUND], capture_output=True, text=True, check=True
    )
    untuned, tuned_ok, tuned = map(int, done.stdout.split())
    if not tuned_ok:
        pytest.skip("the C library is not glibc")
    assert untuned >= 10_000  # a 64 MB buffer (a step's logits) is mmapped and faulted in afresh
    assert tuned <= 10  # reused from the heap


def test_cpu_stage_setup_tunes_the_allocator(monkeypatch) -> None:
    from llmos_cli.recipe import Recipe
    from llmos_cli.stages import common

    calls = []
    monkeypatch.setattr(common, "retain_freed_memory", lambda: calls.append(1))
    recipe = Recipe()
    recipe.train.device = "cpu"
    common.device_and_precision(recipe)
    assert calls == [1]


def test_bench_short_corpora_are_deterministic_short_and_distinct() -> None:
    from bench.bench_sft import make_chats
    from bench.bench_train import short_documents

    docs = short_documents(500)
    assert docs == short_documents(500)
    words = sorted(len(d.split()) for d in docs)
    assert words[len(words) // 2] < 64 and words[-1] > 3 * words[len(words) // 2]  # most short, a long tail
    chats = make_chats(300, 1)
    assert chats == make_chats(300, 1)
    assert len({c["messages"][1]["content"] for c in chats}) == 300
