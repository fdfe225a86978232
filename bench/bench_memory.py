"""Peak memory (RSS) of each llmos stage at two data sizes, each stage in a fresh child process.

The corpus is bench_train's: stdlib modules cut into documents, the smaller size a prefix of the larger.
`pretrain` is set against a plain HF `Trainer` (padded collator) on the same data and steps; `data` and
`eval` have no like-for-like baseline here (bench_data compares `llmos data` with `datasets.map`), so their
rows show the growth from the small to the large corpus, which should stay far below the data growth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_train import RECIPE, ROOT, Setting, child_env, recipe_overrides, write_corpus

TITLE = "Peak memory per stage (RSS)"


def peak_rss_mib(cmd: list[str]) -> float:
    """Run `cmd` to completion and return its peak resident set size in MiB (Linux/macOS rusage)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... failed: {err.strip().splitlines()[-1] if err.strip() else status}"
        )
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale / 2**20


def run(quick: bool) -> list[dict[str, Any]]:
    sizes = [10, 40] if quick else [40, None]  # stdlib modules (None: all)
    steps = 2 if quick else 8
    llmos = [sys.executable, "-m", "llmos_cli", "--quiet"]
    rss: dict[str, list[float]] = {"data": [], "pretrain": [], "eval": [], "trainer": []}
    mbytes = []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-memory-") as tmp:
        for files in sizes:
            work = Path(tmp) / f"files-{files or 'all'}"
            work.mkdir()
            setting = Setting("tiny-llama", files, steps=steps, warm=1, repeats=1)
            mbytes.append(write_corpus(work / "corpus.jsonl", setting) / 1e6)
            sets = [a for o in recipe_overrides(setting, work / "corpus.jsonl", work) for a in ("--set", o)]
            for stage in ("data", "pretrain", "eval"):
                rss[stage].append(peak_rss_mib([*llmos, stage, str(RECIPE), *sets]))
            trainer = [
                sys.executable,
                "-m",
                "bench.bench_train",
                "--trainer",
                str(work),
                str(files or 0),
                str(steps),
            ]
            rss["trainer"].append(peak_rss_mib(trainer))
    growth = mbytes[1] / mbytes[0]
    rows = []
    for i, mb in enumerate(mbytes):
        rows.append(
            {
                "name": f"pretrain, {mb:.1f} MB corpus: peak RSS vs HF Trainer (padded)",
                "baseline": rss["trainer"][i],
                "ours": rss["pretrain"][i],
                "ratio": rss["trainer"][i] / rss["pretrain"][i],
                "unit": "MiB",
                "notes": f"tiny-llama, {steps} steps, batch 16, seq 256; includes tokenizing/packing for llmos when not cached",
            }
        )
    for stage in ("data", "pretrain", "eval"):
        small, large = rss[stage]
        rows.append(
            {
                "name": f"{stage}: peak RSS at {mbytes[0]:.1f} MB -> {mbytes[1]:.1f} MB corpus ({growth:.1f}x data)",
                "baseline": small,
                "ours": large,
                "ratio": None,
                "unit": "MiB",
                "notes": f"growth {large / small:.2f}x for {growth:.1f}x data (baseline column: the smaller corpus)",
            }
        )
    return rows
