"""Serving against llama.cpp: the same tiny model through `llmos serve` and llama.cpp's OpenAI server.

- baseline: llama-cpp-python's server (`python -m llama_cpp.server`) on the model exported to GGUF by
  llmos's own exporter (f32), with n_threads (and n_threads_batch) set to llmos's torch threads;
- llmos: `llmos serve` on the Hugging Face checkpoint, at fp32 (the same weights, unrounded on both sides).

Both get the same streaming /v1/completions requests (bench_serve's prompts), the same max_tokens, greedy
(temperature 0) and EOS suppressed by logit_bias -100 (both honour it; neither has `ignore_eos`), so every
request generates exactly max_tokens tokens on both sides. Reported: aggregate generated tokens/s with 1
client (sequential requests) and 16 concurrent clients, and p50/p99 time to first token at each. Both
servers stay up; llama.cpp's serves one request at a time (queued, not interrupted), llmos's batches
them continuously. Their phases alternate over the repeats and the best of each is kept. Without
llama_cpp.server (`pip install 'llama-cpp-python[server]'`) the section is one row saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.bench_serve import Settings, free_port, pct, run_clients, start_llmos, stop, wait_healthy
from bench.tiny_model import build_tiny_llama

TITLE = "Serving vs llama.cpp"
PHASES = ("1 client", "16 clients")


def server_available() -> bool:
    try:
        return importlib.util.find_spec("llama_cpp.server.app") is not None
    except ImportError:  # llama_cpp.server is there, a dependency of its app is not
        return False


def export_gguf_of(model_dir: Path, dest: Path) -> tuple[Path, int]:
    """`model_dir` written as f32 GGUF by llmos's exporter; returns (the file, the EOS id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos_cli.core.export.gguf import export_gguf

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return export_gguf(model, tokenizer, dest, dtype="f32"), tokenizer.eos_token_id


def start_llama_cpp(gguf: Path, threads: int, n_ctx: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
        + ["--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
        + ["--n_ctx", str(n_ctx), "--verbose", "False"]
        # Its default drops a streaming request when the next one arrives; queue them instead.
        + ["--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, path="/v1/models")
    except BaseException:
        stop(server)
        raise
    return url, server


def phases(url: str, s: Settings, extra: dict[str, Any]) -> dict[str, tuple[float, list[float]]]:
    """(tokens/s, TTFTs) with 1 sequential client and with `s.clients` concurrent ones."""
    return {
        PHASES[0]: asyncio.run(run_clients(url, 1, s.sequential_requests, s.max_tokens, extra)),
        PHASES[1]: asyncio.run(run_clients(url, s.clients, s.requests_per_client, s.max_tokens, extra)),
    }


def measure(s: Settings) -> dict[str, dict[str, tuple[float, list[float]]]]:
    """Per server ("llama.cpp", "llmos"), per phase: the best (tokens/s, TTFTs) over the repeats."""
    best: dict[str, dict[str, tuple[float, list[float]]]] = {"llama.cpp": {}, "llmos": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model", hidden=s.hidden, layers=s.layers)
        gguf, eos = export_gguf_of(model, Path(tmp) / "model.gguf")
        extra = {"logit_bias": {str(eos): -100}}
        servers = [start_llama_cpp(gguf, s.threads, n_ctx=512)]
        try:
            servers.append(start_llmos(model, s.clients, s.threads, precision="fp32"))
            urls = dict(zip(best, (url for url, _ in servers), strict=True))
            for url in urls.values():  # warm-up: llama.cpp's first requests run several times slower
                asyncio.run(run_clients(url, 1, 2, s.max_tokens, extra))
                asyncio.run(run_clients(url, s.clients, 1, 8, extra))
            for _ in range(s.repeats):
                for name, url in urls.items():
                    for phase, result in phases(url, s, extra).items():
                        best[name][phase] = max(best[name].get(phase, (0.0, [])), result)
        finally:
            for _, server in servers:
                stop(server)
    return best


def rows(s: Settings, m: dict[str, dict[str, tuple[float, list[float]]]]) -> list[dict[str, Any]]:
    setting = (
        f"llama h{s.hidden} L{s.layers}, fp32 both (GGUF f32 by llmos export), {s.max_tokens} tokens per "
        f"request (EOS suppressed), temperature 0, streaming; {s.threads} threads each; best of "
        f"{s.repeats} alternating repeats"
    )
    out = []
    for phase in PHASES:
        base, ours = m["llama.cpp"][phase], m["llmos"][phase]
        requests = f"{len(ours[1])} requests ({'sequential' if phase == PHASES[0] else 'concurrent'})"
        out.append(
            {
                "name": f"serve vs llama.cpp server, {phase}: aggregate generated tokens/s",
                "baseline": base[0],
                "ours": ours[0],
                "ratio": ours[0] / base[0],
                "unit": "tokens/s",
                "notes": f"{'goal >= 1x; ' if phase == PHASES[1] else ''}{requests}; {setting}",
            }
        )
        for q in (50, 99):
            b, o = pct(base[1], q) * 1000, pct(ours[1], q) * 1000
            out.append(
                {
                    "name": f"serve vs llama.cpp server, {phase}: p{q} time to first token",
                    "baseline": b,
                    "ours": o,
                    "ratio": b / o,
                    "unit": "ms",
                    "notes": f"{requests}; {setting}",
                }
            )
    return out


def unavailable() -> list[dict[str, Any]]:
    return [
        {
            "name": "serve vs llama.cpp server: skipped",
            "baseline": None,
            "ours": None,
            "ratio": None,
            "unit": "",
            "notes": "llama_cpp.server is not importable here: pip install 'llama-cpp-python[server]'",
        }
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    if not server_available():
        return unavailable()
    threads = torch.get_num_threads()
    if quick:
        s = Settings(requests_per_client=1, sequential_requests=4, max_tokens=32, repeats=2, threads=threads)
    else:  # one request per client: llama-cpp-python 0.3.36's server failed (llama_decode returned 1)
        # when a client's second streamed request joined the queue behind the others
        s = Settings(requests_per_client=1, threads=threads)
    return rows(s, measure(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 request per client, 32 tokens, 2 repeats")
    ap.add_argument("--threads", type=int, help="threads for both servers (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in run(args.quick):
        print(f"{r['name']}: {r['baseline']} -> {r['ours']} {r['unit']} (ratio {r['ratio']}); {r['notes']}")


if __name__ == "__main__":
    main()
