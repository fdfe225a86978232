"""16 concurrent streaming clients against 1 sequential client on the same `llmos serve` process.

Reports aggregate generated tokens/s (ratio, goal >= 4x) and p50/p99 time to first token for both.
`--markdown FILE` appends a row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tiny_model import build_tiny_llama  # noqa: E402


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one completion; return (time to first token, completion tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def run_clients(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[float]]:
    """Each client sends `per_client` requests one after another; returns (tokens/s, ttfts)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker(w: int) -> list[tuple[float, int]]:
            return [
                await one_request(
                    client, f"client {w} request {i}: " + "the quick brown fox " * (1 + i % 5), max_tokens
                )
                for i in range(per_client)
            ]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return sum(n for _, n in results) / wall, [t for t, _ in results]


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--sequential-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the phases this often, keep the best")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a busy box"
    )
    ap.add_argument("--markdown", type=Path, help="append a result row to this markdown file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        model = build_tiny_llama(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        code = (
            f"from llmos_cli.stages import serve; serve.run({str(model)!r}, host='127.0.0.1', port={port}, "
            f"api_key_env='LLMOS_BENCH_NO_KEY', max_batch_size={args.clients}, max_queue=256)"
        )
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        server = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            asyncio.run(run_clients(url, 2, 1, 8))  # warm-up
            # Alternate the two phases and keep the best of each: the machine may be shared, and a noisy
            # neighbour should not decide the ratio.
            seq_tps, con_tps, seq_ttft, con_ttft = 0.0, 0.0, [], []
            for _ in range(args.repeats):
                tps, ttft = asyncio.run(run_clients(url, 1, args.sequential_requests, args.max_tokens))
                seq_tps, seq_ttft = (tps, ttft) if tps > seq_tps else (seq_tps, seq_ttft)
                tps, ttft = asyncio.run(
                    run_clients(url, args.clients, args.requests_per_client, args.max_tokens)
                )
                con_tps, con_ttft = (tps, ttft) if tps > con_tps else (con_tps, con_ttft)
        finally:
            server.terminate()
            server.wait(timeout=60)

    ratio = con_tps / seq_tps
    print(f"model: llama hidden {args.hidden}, {args.layers} layers; {args.max_tokens} tokens per request")
    print(
        f"1 sequential client  : {seq_tps:8.1f} tok/s  TTFT p50 {pct(seq_ttft, 50) * 1000:7.1f} ms  "
        f"p99 {pct(seq_ttft, 99) * 1000:7.1f} ms"
    )
    print(
        f"{args.clients} concurrent clients: {con_tps:8.1f} tok/s  TTFT p50 {pct(con_ttft, 50) * 1000:7.1f} ms  "
        f"p99 {pct(con_ttft, 99) * 1000:7.1f} ms"
    )
    print(f"ratio aggregate tok/s, {args.clients} clients / 1 client: {ratio:.1f}x (goal >= 4x)")
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(
                f"| serve: {args.clients} clients vs 1 | h{args.hidden} L{args.layers}, {args.max_tokens} tok | "
                f"{ratio:.1f}x | >= 4x | TTFT p50/p99 ms: 1 client {pct(seq_ttft, 50) * 1000:.0f}/"
                f"{pct(seq_ttft, 99) * 1000:.0f}, {args.clients} clients {pct(con_ttft, 50) * 1000:.0f}/"
                f"{pct(con_ttft, 99) * 1000:.0f} |\n"
            )


if __name__ == "__main__":
    main()
