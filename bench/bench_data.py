"""Benchmark `llmos data` against a plain `datasets.map` tokenisation of the same synthetic corpus.

For two corpus sizes (the second 4x the first) it runs, each in a fresh child process:
  - `llmos data` (read, clean, dedup, tokenise, pack, split, save; the tokenizer is given, not trained)
  - baseline: `datasets.load_dataset("json")` + `Dataset.map(tokenizer, batched=True)`
and reports rows/s and the child's peak RSS (os.wait4 rusage), then the peak-memory growth for 4x data.
Both run serially (num_proc 1, TOKENIZERS_PARALLELISM=false); one more pair on the larger corpus runs
each at its defaults (llmos num_proc auto; datasets.map one process with the tokenizer's threads).

    python -m bench.bench_data            # 12.5 MB and 50 MB
    python -m bench.bench_data --quick    # 1 MB and 4 MB
    python -m bench.bench_data --compare-num-proc [--quick]   # num_proc auto vs 1, 50 MB (4 MB)
Prints markdown tables; `run(quick)` returns the same figures as rows for bench/run.py.
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
from typing import Any

TITLE = "Data preparation (`llmos data` vs datasets.map)"
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
        raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(args[:3])}\n{stderr[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports KiB


PIPELINES = ("llmos data", "datasets.map")


def measure_sizes(sizes: tuple[float, ...], num_proc: int | None = 1) -> list[dict[str, Any]]:
    """For each corpus size and pipeline: {pipeline, mb, rows, wall, cpu, peak} (peak RSS in MiB).
    `num_proc` None runs both at their defaults: llmos's `num_proc: auto` (one tokenising process a
    core), datasets.map in one process with the tokenizer's own threads (TOKENIZERS_PARALLELISM unset)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if num_proc is None:
        del env["TOKENIZERS_PARALLELISM"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        env["HF_HOME"] = str(tmp_path / "hf")
        tok_dir = tmp_path / "tokenizer"
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
                            **({"num_proc": num_proc} if num_proc is not None else {}),
                            "output": str(tmp_path / f"out-{mb:g}"),
                        },
                    }
                )
            )
            cmds = {
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
            for name in PIPELINES:
                wall, cpu, peak = measure(cmds[name], env)
                results.append(
                    {"pipeline": name, "mb": mb, "rows": n_rows, "wall": wall, "cpu": cpu, "peak": peak}
                )
    return results


SAME_OUTPUT = """
import hashlib, sys
from datasets import load_from_disk
h = hashlib.sha256()
for path in sys.argv[1:]:
    for split in ("train", "validation"):
        for ids in load_from_disk(path)[split]["input_ids"]:
            h.update(repr(ids).encode())
    print(h.hexdigest())
    h = hashlib.sha256()
"""


def measure_num_proc(mb: float) -> dict[str, Any]:
    """`llmos data` with num_proc 1 and auto on one corpus: wall, CPU, rows/s, and whether the two
    datasets hold the same token ids (hashed split by split)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-data-np-") as tmp:
        tmp_path = Path(tmp)
        corpus, tok_dir = tmp_path / "corpus.jsonl", tmp_path / "tokenizer"
        n_rows = write_corpus(corpus, mb)
        train_tokenizer(corpus, tok_dir)
        result: dict[str, Any] = {"mb": mb, "rows": n_rows, "cores": len(os.sched_getaffinity(0))}
        for num_proc in (1, "auto"):
            recipe = tmp_path / f"recipe-{num_proc}.yaml"
            data = {"train": str(corpus), "max_seq_len": 512, "num_proc": num_proc}
            data["output"] = str(tmp_path / f"out-{num_proc}")
            recipe.write_text(
                json.dumps({"run": {"name": "bench"}, "model": {"tokenizer": str(tok_dir)}, "data": data})
            )
            wall, cpu, _ = measure([sys.executable, "-c", LLMOS, str(recipe)], env)
            result[str(num_proc)] = {"wall": wall, "cpu": cpu, "rows_per_s": n_rows / wall}
        hashes = subprocess.run(
            [sys.executable, "-c", SAME_OUTPUT, str(tmp_path / "out-1"), str(tmp_path / "out-auto")],
            env=env, capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout.split()  # fmt: skip
        result["same_output"] = hashes[0] == hashes[1]
    return result


def to_rows(results: list[dict[str, Any]], num_proc: int) -> list[dict[str, Any]]:
    """bench/run.py rows: rows/s and peak RSS per size, then the peak-RSS growth for the larger corpus."""
    by = {(r["pipeline"], r["mb"]): r for r in results}
    sizes = sorted({r["mb"] for r in results})
    setting = (
        f"synthetic JSONL, 100-600 words a document, ~1% duplicates; BPE tokenizer (4096) given; "
        f"num_proc {num_proc}; each pipeline in a fresh process"
    )
    out = []
    for mb in sizes:
        ours, base = by["llmos data", mb], by["datasets.map", mb]
        out.append(
            rows_per_s_row(
                f"data, {mb:g} MB corpus ({ours['rows']} docs): rows/s vs datasets.map tokenisation",
                ours,
                base,
                f"llmos also cleans, dedups, packs (max_seq_len 512), splits and saves; {setting}",
            )
        )
        out.append(
            {
                "name": f"data, {mb:g} MB corpus: peak RSS vs datasets.map tokenisation",
                "baseline": base["peak"],
                "ours": ours["peak"],
                "ratio": base["peak"] / ours["peak"],
                "unit": "MiB",
                "notes": f"peak RSS of the child process (rusage); {setting}",
            }
        )
    small, large = sizes
    growth = {p: by[p, large]["peak"] / by[p, small]["peak"] for p in PIPELINES}
    out.append(
        {
            "name": f"data: peak RSS growth for {large / small:g}x corpus ({small:g} -> {large:g} MB)",
            "baseline": growth["datasets.map"],
            "ours": growth["llmos data"],
            "ratio": growth["datasets.map"] / growth["llmos data"],
            "unit": "x",
            "notes": f"goal < 1.2x: {'met' if growth['llmos data'] < 1.2 else 'NOT met'}; llmos "
            f"+{by['llmos data', large]['peak'] - by['llmos data', small]['peak']:.0f} MiB, datasets.map "
            f"+{by['datasets.map', large]['peak'] - by['datasets.map', small]['peak']:.0f} MiB",
        }
    )
    return out


def defaults_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """rows/s with both pipelines at their defaults (see `measure_sizes`), on one corpus."""
    ours, base = (next(r for r in results if r["pipeline"] == p) for p in PIPELINES)
    return rows_per_s_row(
        f"data, {ours['mb']:g} MB corpus, both at their defaults: rows/s vs datasets.map tokenisation",
        ours,
        base,
        f"goal >= 1.5x; llmos num_proc auto ({len(os.sched_getaffinity(0))} processes), datasets.map one "
        "process with the tokenizer's threads; llmos also cleans, dedups, packs, splits and saves",
    )


def rows_per_s_row(name: str, ours: dict[str, Any], base: dict[str, Any], notes: str) -> dict[str, Any]:
    """A bench/run.py row: rows/s of `llmos data` against datasets.map, with both walls and CPU times."""
    return {
        "name": name,
        "baseline": base["rows"] / base["wall"],
        "ours": ours["rows"] / ours["wall"],
        "ratio": base["wall"] / ours["wall"],
        "unit": "rows/s",
        "notes": f"wall {ours['wall']:.1f} s vs {base['wall']:.1f} s, CPU {ours['cpu']:.1f} s vs "
        f"{base['cpu']:.1f} s; {notes}",
    }


def run(quick: bool) -> list[dict[str, Any]]:
    sizes = (1.0, 4.0) if quick else (12.5, 50.0)
    return [*to_rows(measure_sizes(sizes), 1), defaults_row(measure_sizes(sizes[-1:], None))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora (1 MB and 4 MB)")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument(
        "--compare-num-proc",
        action="store_true",
        help="llmos data at num_proc auto vs 1, same output checked",
    )
    opts = parser.parse_args()
    if opts.compare_num_proc:
        r = measure_num_proc(4.0 if opts.quick else 50.0)
        one, auto = r["1"], r["auto"]
        print(f"llmos data, {r['mb']:g} MB corpus ({r['rows']} docs), {r['cores']} cores:")
        for name, m in (("num_proc 1", one), ("num_proc auto", auto)):
            print(f"  {name}: {m['rows_per_s']:.0f} rows/s (wall {m['wall']:.1f} s, CPU {m['cpu']:.1f} s)")
        print(f"  speed-up {one['wall'] / auto['wall']:.2f}x; same output: {r['same_output']}")
        return 0 if r["same_output"] else 1
    results = measure_sizes((1.0, 4.0) if opts.quick else (12.5, 50.0), opts.num_proc)
    print("| pipeline | corpus MB | rows | wall s | CPU s | rows/s (wall) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['pipeline']} | {r['mb']:g} | {r['rows']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{r['rows'] / r['wall']:.0f} | {r['peak']:.0f} |"
        )
    print()
    for row in to_rows(results, opts.num_proc)[-1:]:
        print(
            f"{row['name']}: llmos data {row['ours']:.2f}x, datasets.map {row['baseline']:.2f}x; {row['notes']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
