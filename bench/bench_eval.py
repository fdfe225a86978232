"""Evaluation throughput: llmos's loss/perplexity evaluation against a plain per-example loop.

Same model (a random llama, built as bench/tiny_model.py does), same token rows, same run:
- baseline: one forward per row, summed next-token cross-entropy (tests/test_eval.py's `reference_loss`);
- llmos: `llmos_cli.core.eval.loss.dataset_loss` (length-sorted batches, padded per batch, CAUSAL_LM).

Two kinds of rows: documents of uneven length (stdlib modules cut at top-level definitions, truncated to
the block length), where length sorting keeps padding small, and packed blocks (the documents' token
stream with EOS after each, cut into full blocks), which is what `llmos eval` scores. Both sides must give
the same summed loss to 1e-5 relative (checked here, not just timed). Both run with the host allocator
tuning that `llmos eval` applies on CPU (it keeps the batch's large logits buffers from page-faulting
every batch; the per-example loop's small buffers barely notice it). The two alternate over the repeats;
each figure is the median (spread in the notes). Row lengths 64 and 256 are both measured: on a
CPU thread a 256-token row already keeps the matmuls busy, so batching gains little there (the
per-forward overhead it saves matters for short rows and on GPUs). llmos's side forms batches by the token
budget `llmos eval` defaults to (eval.batch_size x the longest row); a row compares it with the row-count
batches (same loss to 1e-6). On the packed blocks, eval's forward MFU is set against the training step's
forward MFU (train mode, autograd recording) on batches of the same shape, both against the fp32 matmul
peak measured in the run (bench_train's `matmul_peak` and `flops_per_token`, a third of it for a forward).
`python -m bench.bench_eval [--quick]` prints the rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.bench_train import flops_per_token, matmul_peak, stdlib_documents
from bench.tiny_model import build_tiny_llama
from llmos_cli.core.allocator import retain_freed_memory
from llmos_cli.core.eval.loss import dataset_loss
from llmos_cli.core.runtime import Precision
from llmos_cli.core.train.batches import causal_lm_collate, to_device
from llmos_cli.core.train.objectives import CAUSAL_LM

TITLE = "Evaluation throughput (scored tokens/s)"
FP32 = Precision("fp32", None)


@dataclass
class Settings:
    documents: int = 400
    blocks: tuple[int, ...] = (64, 256)  # longest row, in tokens
    hidden: int = 256
    layers: int = 4
    batch_size: int = 16
    repeats: int = 3


def per_example_loss(model: Any, rows: Sequence[list[int]], device: torch.device) -> tuple[float, int]:
    """The baseline: one forward per row; summed next-token loss (float64) and the targets it covers."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row], device=device)
            logits = model(ids).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    return total, count


def token_rows(ids: list[list[int]], block: int) -> dict[str, list[list[int]]]:
    """Uneven documents (truncated to the block) and as many full packed blocks of their token stream."""
    documents = [x[:block] for x in ids if len(x) >= 2]
    stream = [t for x in ids for t in x]
    blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
    return {"documents": documents, "packed blocks": blocks[: len(documents)]}


def measure(s: Settings) -> dict[str, dict[str, Any]]:
    """Per kind of rows: seconds per repeat for both sides, the two summed losses and the target count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        retain_freed_memory()  # as `llmos eval` runs; process-wide, so the loop gets it too
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_llama(Path(tmp), hidden=s.hidden, layers=s.layers)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    collate = causal_lm_collate(tokenizer.pad_token_id)
    common = {"objective": CAUSAL_LM, "collate": collate, "batch_size": s.batch_size}
    common |= {"device": device, "precision": FP32}
    docs = stdlib_documents(None)[: s.documents]
    ids = [tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for d in docs]
    results = {}
    for block, kind, rows in [(b, k, r) for b in s.blocks for k, r in token_rows(ids, b).items()]:
        hf_rows = [{"input_ids": r} for r in rows]
        per_example_loss(model, rows[:4], device)  # warm-up
        base_s, ours_s, by_rows_s = [], [], []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            base = per_example_loss(model, rows, device)
            base_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            # The token budget `llmos eval` defaults to: eval.batch_size x max_seq_len.
            ours = dataset_loss(model, hf_rows, batch_tokens=s.batch_size * block, **common)
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            by_rows = dataset_loss(model, hf_rows, **common)
            by_rows_s.append(time.perf_counter() - t0)
        if ours[1] != base[1] or not math.isclose(ours[0], base[0], rel_tol=1e-5):
            raise AssertionError(f"{kind}: llmos loss {ours} differs from the per-example loop's {base}")
        if by_rows[1] != ours[1] or not math.isclose(by_rows[0], ours[0], rel_tol=1e-6):
            raise AssertionError(
                f"{kind}: token-budget loss {ours} differs from row-count batches' {by_rows}"
            )
        results[f"{len(rows)} {kind} (<= {block} tokens)"] = {
            "tokens": ours[1],
            "base_s": base_s,
            "ours_s": ours_s,
            "by_rows_s": by_rows_s,
            "base_loss": base[0] / base[1],
            "ours_loss": ours[0] / ours[1],
        }
        if kind == "packed blocks":
            results[f"{len(rows)} {kind} (<= {block} tokens)"]["mfu"] = forward_mfu(model, rows, s, device)
    return results


def train_forward_seconds(model: Any, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Best time of the training step's forward (train mode, autograd recording, the loss) on `batch`;
    each is followed by its backward, untimed, as in the loop."""
    model.train()
    best = math.inf
    for _ in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss = CAUSAL_LM.loss_sum(model, batch)
        elapsed = time.perf_counter() - t0
        loss.backward()
        model.zero_grad(set_to_none=True)
        best = min(best, elapsed)
    model.eval()
    return best


def forward_mfu(model: Any, rows: list[list[int]], s: Settings, device: torch.device) -> dict[str, float]:
    """Eval's forward MFU (dataset_loss over the packed blocks, best repeat) and the training step's
    forward MFU on batches of the same shape, both against the fp32 matmul peak measured here."""
    block = len(rows[0])
    flops = flops_per_token(model, block) / 3  # forward only: 2N + attention, a third of the step's
    peak = matmul_peak(torch.float32)
    batch = to_device(causal_lm_collate(0)([{"input_ids": r} for r in rows[: s.batch_size]]), device)
    train_s = train_forward_seconds(model, batch, s.repeats + 1)
    hf_rows = [{"input_ids": r} for r in rows]
    kwargs = {"batch_size": s.batch_size, "batch_tokens": s.batch_size * block}
    eval_s = math.inf
    for _ in range(s.repeats):
        t0 = time.perf_counter()
        dataset_loss(model, hf_rows, CAUSAL_LM, causal_lm_collate(0), device=device, precision=FP32, **kwargs)
        eval_s = min(eval_s, time.perf_counter() - t0)
    return {
        "train": batch["input_ids"].numel() * flops / train_s / peak,
        "eval": len(rows) * block * flops / eval_s / peak,
        "peak": peak,
        "flops": flops,
    }


def rows(s: Settings, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind, m in results.items():
        base, ours = statistics.median(m["base_s"]), statistics.median(m["ours_s"])
        ratios = ", ".join(f"{b / o:.1f}x" for b, o in zip(m["base_s"], m["ours_s"], strict=True))
        rel = abs(m["ours_loss"] - m["base_loss"]) / abs(m["base_loss"])
        out.append(
            {
                "name": f"eval loss, {kind}: batched vs per-example loop",
                "baseline": m["tokens"] / base,
                "ours": m["tokens"] / ours,
                "ratio": base / ours,
                "unit": "tokens/s",
                "notes": f"llama h{s.hidden} L{s.layers}, fp32, batch {s.batch_size}, {m['tokens']} scored "
                f"tokens; median of {s.repeats} alternating repeats (ratios {ratios}); same loss checked: "
                f"{m['ours_loss']:.6f} vs {m['base_loss']:.6f} (rel. diff {rel:.1e} <= 1e-5); "
                f"{torch.get_num_threads()} threads; allocator tuned for both; batches of <= "
                f"{s.batch_size} x longest row tokens (llmos eval's default budget)",
            }
        )
        by_rows, ours = statistics.median(m["by_rows_s"]), statistics.median(m["ours_s"])
        out.append(
            {
                "name": f"eval loss, {kind}: token-budget vs row-count batches",
                "baseline": m["tokens"] / by_rows,
                "ours": m["tokens"] / ours,
                "ratio": by_rows / ours,
                "unit": "tokens/s",
                "notes": f"budget {s.batch_size} x longest row vs {s.batch_size} rows per batch; same loss "
                f"checked to 1e-6; median of {s.repeats} alternating repeats",
            }
        )
        if mfu := m.get("mfu"):
            out.append(
                {
                    "name": f"eval forward MFU vs the training step's forward MFU, {kind}",
                    "baseline": mfu["train"],
                    "ours": mfu["eval"],
                    "ratio": mfu["eval"] / mfu["train"],
                    "unit": "fraction of peak",
                    "notes": f"goal >= 0.8x; fp32; {mfu['flops'] / 1e6:.2f} MFLOP/token forward (a third of "
                    f"bench_train's 6N + attention); measured fp32 matmul peak {mfu['peak'] / 1e9:.0f} GFLOP/s; "
                    f"training forward: train mode with autograd, batch {s.batch_size}, best of "
                    f"{s.repeats + 1}; eval: dataset_loss over all blocks, best of {s.repeats}",
                }
            )
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    s = Settings(documents=48, repeats=2) if quick else Settings()
    return rows(s, measure(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48 documents, 2 repeats")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in run(args.quick):
        print(
            f"{r['name']}: {r['baseline']:.4g} -> {r['ours']:.4g} {r['unit']} ({r['ratio']:.2f}x); {r['notes']}"
        )


if __name__ == "__main__":
    main()
