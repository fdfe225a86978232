"""Batch `generate` (continuous batching, shared KV cache) against a plain per-prompt HF `generate` loop.

Also times transformers' own continuous-batching manager (`model.generate_batch`) on the same prompts: the
reason core/serve/runners.py runs its own batch. The loop and llmos alternate over the repeats; each figure is
the median. `run(quick)` returns the rows for bench/run.py; `python -m bench.bench_generate` prints them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve.runners import Runner, SamplingParams

TITLE = "Batch generation (generated tokens/s)"


@dataclass
class Settings:
    prompts: int = 32
    max_new_tokens: int = 64
    hidden: int = 256
    layers: int = 4
    batch_size: int = 32
    repeats: int = 3


def hf_loop(runner: Runner, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The baseline: one `model.generate` call per prompt, greedy."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = runner.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=runner.pad_id,
            )
            out.append(y[0, x.shape[1] :].tolist())
    return out


def measure(s: Settings) -> dict[str, Any]:
    """Wall and CPU seconds of the HF loop, llmos and HF generate_batch, and how many outputs agree."""
    from transformers import GenerationConfig

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner.load(build_tiny_llama(Path(tmp), hidden=s.hidden, layers=s.layers))
    prompts = [
        runner.encode(f"prompt {i}: " + "the quick brown fox " * (1 + i % 7)) for i in range(s.prompts)
    ]
    params = SamplingParams(max_new_tokens=s.max_new_tokens)
    runner.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    loop_s, loop_cpu, ours_s, ours_cpu = [], [], [], []
    for _ in range(s.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ref = hf_loop(runner, prompts, s.max_new_tokens)
        loop_s.append(time.perf_counter() - t0)
        loop_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        ours = runner.generate(prompts, params, batch_size=s.batch_size)
        ours_s.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    runner.model.generate_batch(
        prompts,
        generation_config=GenerationConfig(
            max_new_tokens=s.max_new_tokens, do_sample=False, eos_token_id=sorted(runner.eos_ids)
        ),
    )
    return {
        "tokens": sum(len(c.token_ids) for c in ours),
        "same": sum(c.token_ids == r for c, r in zip(ours, ref, strict=True)),
        "loop_s": loop_s,
        "ours_s": ours_s,
        "cpu_ratio": statistics.median(loop_cpu) / statistics.median(ours_cpu),
        "hf_cb_s": time.perf_counter() - t0,
    }


def rows(s: Settings, m: dict[str, Any]) -> list[dict[str, Any]]:
    tokens, loop, ours = m["tokens"], statistics.median(m["loop_s"]), statistics.median(m["ours_s"])
    ratios = ", ".join(f"{a / b:.1f}x" for a, b in zip(m["loop_s"], m["ours_s"], strict=True))
    setting = (
        f"llama h{s.hidden} L{s.layers}, {s.prompts} prompts x {s.max_new_tokens} new tokens "
        f"({tokens} generated), batch {s.batch_size}, greedy, {torch.get_num_threads()} threads"
    )
    return [
        {
            "name": f"generate {s.prompts} prompts: batch vs per-prompt HF generate loop",
            "baseline": tokens / loop,
            "ours": tokens / ours,
            "ratio": loop / ours,
            "unit": "tokens/s",
            "notes": f"goal >= 5x; {setting}; median of {s.repeats} alternating repeats (ratios {ratios}); "
            f"CPU-time ratio {m['cpu_ratio']:.1f}x; greedy outputs identical to the loop: "
            f"{m['same']}/{s.prompts}",
        },
        {
            "name": f"generate {s.prompts} prompts: batch vs transformers generate_batch",
            "baseline": tokens / m["hf_cb_s"],
            "ours": tokens / ours,
            "ratio": m["hf_cb_s"] / ours,
            "unit": "tokens/s",
            "notes": f"transformers' continuous-batching manager, one run; {setting}",
        },
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    s = Settings(max_new_tokens=32, repeats=2) if quick else Settings()
    return rows(s, measure(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    d = Settings()
    ap.add_argument("--prompts", type=int, default=d.prompts)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a busy box"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(args.prompts, args.max_new_tokens, args.hidden, args.layers, args.batch_size, args.repeats)
    for r in rows(s, measure(s)):
        print(
            f"{r['name']}: {r['baseline']:.1f} -> {r['ours']:.1f} {r['unit']} ({r['ratio']:.1f}x); {r['notes']}"
        )


if __name__ == "__main__":
    main()
