"""onnxruntime greedy generation with the exported KV cache against the same graph without it (the whole
sequence re-run each step, as the no-cache export had to). `run(quick)` returns the rows for
bench/run.py; `python -m bench.bench_onnx` prints them."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.tiny_model import build_tiny_llama

TITLE = "ONNX generation (onnxruntime, tokens/s)"


@dataclass
class Settings:
    new_tokens: int = 128
    hidden: int = 256
    layers: int = 4
    repeats: int = 3


def measure(s: Settings) -> dict[str, Any]:
    import onnxruntime as ort

    from llmos_cli.core.export.onnx import onnx_greedy
    from llmos_cli.stages import export as export_stage

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "m", hidden=s.hidden, layers=s.layers)
        export_stage.run(str(model_dir), ["onnx"], Path(tmp) / "onnx", verify=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(Path(tmp) / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        prompt = list(range(3, 19))
        cached_s, full_s, same = [], [], True
        for _ in range(s.repeats):
            t = time.perf_counter()
            full = onnx_greedy(session, prompt, s.new_tokens, use_cache=False)
            full_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            cached = onnx_greedy(session, prompt, s.new_tokens)
            cached_s.append(time.perf_counter() - t)
            same = same and cached == full
    return {"cached": statistics.median(cached_s), "full": statistics.median(full_s), "same": same}


def rows(s: Settings, m: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": f"onnxruntime greedy, {s.new_tokens} new tokens: KV cache vs no cache",
            "baseline": s.new_tokens / m["full"],
            "ours": s.new_tokens / m["cached"],
            "ratio": m["full"] / m["cached"],
            "unit": "tokens/s",
            "notes": f"goal >= 3x per token; llama h{s.hidden} L{s.layers}, 16-token prompt, fp32, 1 ORT thread; "
            f"median of {s.repeats}; tokens identical with and without the cache: {m['same']}",
        }
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    s = Settings(new_tokens=64, repeats=2) if quick else Settings()
    return rows(s, measure(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=Settings.new_tokens)
    args = ap.parse_args()
    s = Settings(new_tokens=args.new_tokens)
    for row in rows(s, measure(s)):
        print(row)


if __name__ == "__main__":
    main()
