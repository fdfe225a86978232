"""Benchmark `llmos data` against a plain `datasets.map` tokenisation of the same synthetic corpus.

For two corpus sizes (the second 4x the first) it runs, each in a fresh child process:
  - `llmos data` (read, clean, dedup, tokenise, pack, split, save; the tokenizer is given, not trained)
  - baseline: `datasets.load_dataset("json")` + `Dataset.map(tokenizer, batched=True)`
and reports rows/s and the child's peak RSS (os.wait4 rusage), then the peak-memory growth for 4x data.

    python bench/bench_data.py            # 12.5 MB and 50 MB
    python bench/bench_data.py --quick    # 1 MB and 4 MB
Prints markdown table rows; exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASELINE = """
import sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
corpus, tok_dir, cache = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
print(len(ds))
"""

LLMOS = """
import sys
from llmos_cli.recipe import load_recipe
from llmos_cli.stages import data
print(data.run(load_recipe(sys.argv[1])).report["documents_kept"])
"""


def make_vocab(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    words += ["東京", "北京", "서울", "café", "naïve", "Привет", "مرحبا", "天气", "首都", "déjà"]
    return words


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL corpus of `megabytes` MB: documents of 100-600 words, ~1% of them repeated."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)
    weights = [1.0 / (i + 1) for i in range(len(vocab))]  # Zipf-like word frequencies
    target, size, rows, recent = megabytes * 1e6, 0, 0, []
    with path.open("w", encoding="utf-8") as fh:
        while size < target:
            if recent and rng.random() < 0.01:
                text = rng.choice(recent)
            else:
                words = rng.choices(vocab, weights, k=rng.randint(100, 600))
                text = " ".join(words).capitalize() + "."
                recent = (recent + [text])[-50:]
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
            rows += 1
    return rows


def train_tokenizer(corpus: Path, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from llmos_cli.core.data.tokenizer import save_tokenizer, train_bpe_tokenizer

    with corpus.open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), fh, strict=False)]
    save_tokenizer(train_bpe_tokenizer(iter(texts), 4096, 2), out)


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one child process (and those it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args[:3])}\n{stderr[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora (1 MB and 4 MB)")
    parser.add_argument("--num-proc", type=int, default=1)
    opts = parser.parse_args()
    sizes = (1.0, 4.0) if opts.quick else (12.5, 50.0)

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        env["HF_HOME"] = str(tmp_path / "hf")
        tok_dir = tmp_path / "tokenizer"
        peaks: dict[str, list[float]] = {"llmos data": [], "datasets.map": []}
        for mb in sizes:
            corpus = tmp_path / f"corpus-{mb:g}.jsonl"
            n_rows = write_corpus(corpus, mb)
            if not tok_dir.exists():
                train_tokenizer(corpus, tok_dir)
            recipe = tmp_path / f"recipe-{mb:g}.yaml"
            recipe.write_text(
                json.dumps(
                    {
                        "run": {"name": "bench"},
                        "model": {"tokenizer": str(tok_dir)},
                        "data": {
                            "train": str(corpus),
                            "max_seq_len": 512,
                            "num_proc": opts.num_proc,
                            "output": str(tmp_path / f"out-{mb:g}"),
                        },
                    }
                )
            )
            runs = {
                "llmos data": [sys.executable, "-c", LLMOS, str(recipe)],
                "datasets.map": [
                    sys.executable,
                    "-c",
                    BASELINE,
                    str(corpus),
                    str(tok_dir),
                    str(tmp_path / "cache"),
                ],
            }
            for name, cmd in runs.items():
                wall, cpu, peak = measure(cmd, env)
                peaks[name].append(peak)
                rows_out.append(
                    f"| {name} | {mb:g} | {n_rows} | {wall:.1f} | {cpu:.1f} | {n_rows / wall:.0f} | {peak:.0f} |"
                )

    print("| pipeline | corpus MB | rows | wall s | CPU s | rows/s (wall) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))
    print()
    print("| pipeline | peak RSS growth for 4x corpus | under 2x |")
    print("|---|---|---|")
    for name, (small, large) in peaks.items():
        ratio = large / small
        print(f"| {name} | {ratio:.2f}x (+{large - small:.0f} MB) | {'yes' if ratio < 2 else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
