"""Batch `generate` (continuous batching, shared KV cache) against a plain per-prompt HF `generate` loop.

Also times transformers' own continuous-batching manager (`model.generate_batch`) on the same prompts: the
reason core/infer.py runs its own batch. Prints the ratios; `--markdown FILE` appends a row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tiny_model import build_tiny_llama  # noqa: E402
from llmos_cli.core.infer import Runner, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a busy box"
    )
    ap.add_argument("--markdown", type=Path, help="append a result row to this markdown file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner.load(build_tiny_llama(Path(tmp), hidden=args.hidden, layers=args.layers))
    prompts = [
        runner.encode(f"prompt {i}: " + "the quick brown fox " * (1 + i % 7)) for i in range(args.prompts)
    ]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    runner.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up

    t0, c0 = time.perf_counter(), time.process_time()
    ref = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = runner.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=runner.pad_id,
            )
            ref.append(y[0, x.shape[1] :].tolist())
    loop_s, loop_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    ours = runner.generate(prompts, params, batch_size=args.batch_size)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    same = sum(c.token_ids == r for c, r in zip(ours, ref, strict=True))

    from transformers import GenerationConfig

    t0 = time.perf_counter()
    runner.model.generate_batch(
        prompts,
        generation_config=GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=sorted(runner.eos_ids)
        ),
    )
    hf_cb_s = time.perf_counter() - t0

    tokens = sum(len(c.token_ids) for c in ours)
    ratio = loop_s / ours_s
    print(
        f"model: llama hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x "
        f"{args.max_new_tokens} new tokens ({tokens} generated); {torch.get_num_threads()} threads"
    )
    print(f"per-prompt HF generate loop : {loop_s:7.2f} s  {tokens / loop_s:8.1f} tok/s")
    print(f"llmos generate (batch {args.batch_size:>3}) : {ours_s:7.2f} s  {tokens / ours_s:8.1f} tok/s")
    print(f"transformers generate_batch : {hf_cb_s:7.2f} s  {tokens / hf_cb_s:8.1f} tok/s")
    print(f"greedy outputs identical to the HF loop: {same}/{len(prompts)}")
    print(
        f"ratio batch generate / per-prompt loop: {ratio:.1f}x wall time (goal >= 5x); "
        f"{loop_cpu / ours_cpu:.1f}x CPU time (steadier when the machine is shared)"
    )
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(
                f"| generate: batch vs per-prompt HF loop | {args.prompts} prompts, h{args.hidden} L{args.layers}, "
                f"{args.max_new_tokens} tok | {ratio:.1f}x | >= 5x | HF continuous batching: "
                f"{loop_s / hf_cb_s:.1f}x |\n"
            )


if __name__ == "__main__":
    main()
