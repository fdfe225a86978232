"""Run every benchmark and write bench/results.md (and bench/results.json, read back by the next run).

    python -m bench.run [--quick] [--only train memory] [--out bench/results.md]     # `make bench`

The interface a benchmark implements
------------------------------------
A module `bench/bench_<name>.py` that defines

    TITLE = "Training throughput"        # optional: its section heading (default: <name>)

    def run(quick: bool) -> list[dict]:  # rows of the results table
        ...

Each row is a dict with these keys:

    name      what is measured, e.g. "pretrain tiny: real tokens/s vs HF Trainer, padded"
    baseline  the baseline's figure, measured in the same run (a number; None for a figure without one)
    ours      llmos's figure (a number)
    ratio     how many times better llmos is: ours/baseline for higher-is-better units,
              baseline/ours for lower-is-better ones (s, MiB); > 1 means llmos wins. None if no baseline.
    unit      the unit of baseline and ours ("tokens/s", "MiB", "s", ...)
    notes     what a reader needs to trust the figure: settings, spread over repeats, caveats

`quick=True` asks for a short run: the whole `--quick` suite should stay under ~3 minutes on 2 CPU
cores. Measure baseline and llmos alternately in the same process where timings are compared (shared
machines drift), and report the spread. The same scripts must run unchanged on a GPU box.

Every module runs in its own child process (fresh imports, memory and thread settings) under a time
limit. One that raises, crashes or times out becomes a FAILED row with the reason; the others still run.
The report names the machine, the versions and the command, and shows each ratio next to the one in
the previous results.json from the same machine, so a regression shows up as a falling ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
ROW_KEYS = ("name", "baseline", "ours", "ratio", "unit", "notes")


def discover() -> list[str]:
    """Module names (`bench_train`, ...) of every benchmark script, sorted."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def run_child(module: str, quick: bool, rows_out: Path, threads: int | None) -> None:
    """In the child process: import one benchmark, run it and write its rows (or its error) as JSON."""
    result: dict[str, Any]
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        mod = importlib.import_module(f"bench.{module}")
        if not callable(getattr(mod, "run", None)):
            raise TypeError(f"bench/{module}.py defines no run(quick: bool) -> list[dict]")
        rows = [check_row(r) for r in mod.run(quick)]
        result = {"title": getattr(mod, "TITLE", module.removeprefix("bench_")), "rows": rows}
    except Exception as err:  # a benchmark's failure is data for the report, not a crash of the suite
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    rows_out.write_text(json.dumps(result, default=_jsonable))


def spread(values: list[float], digits: int = 3) -> str:
    """The figures of each repeat, for a row's notes: "1.2, 1.3"."""
    return ", ".join(f"{x:.{digits}g}" for x in values)


def standalone(run: Any, doc: str | None) -> None:
    """`python bench/bench_<name>.py [--quick]`: one benchmark on its own, its rows printed as JSON."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    for row in run(parser.parse_args().quick):
        print(json.dumps(row, default=_jsonable))


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("name", "ours", "unit") if k not in row]
    if missing:
        raise ValueError(f"row {row!r} lacks {', '.join(missing)}")
    return {k: row.get(k) for k in ROW_KEYS}


def run_module(module: str, quick: bool, timeout: float, threads: int | None) -> dict[str, Any]:
    """Run one benchmark in a child process; its rows, or an error naming why it gave none."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "bench.run", "--child", module, "--rows-out", str(rows_out)]
        start = time.perf_counter()
        flags = [*(["--quick"] if quick else []), *(["--threads", str(threads)] if threads else [])]
        # Its own session, so that a timeout also ends the processes the benchmark started.
        proc = subprocess.Popen([*cmd, *flags], cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        seconds = time.perf_counter() - start
        if rows_out.exists():
            result = json.loads(rows_out.read_text())
        elif code is None:
            result = {"error": f"timed out after {timeout:.0f} s"}
        else:
            result = {"error": f"child process exited with code {code} before writing results"}
    result.setdefault("title", module.removeprefix("bench_"))
    result["seconds"] = round(seconds, 1)
    return result


def environment(quick: bool, argv: list[str]) -> dict[str, Any]:
    """Machine, versions and command: what a reader needs to reproduce or compare a figure."""
    import datasets
    import torch
    import transformers

    import llmos_cli

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem_gib = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench.run", *argv]),
        "mode": "quick" if quick else "full",
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "memory_gib": round(mem_gib, 1) if mem_gib else None,
            "gpu": gpu,
            "os": platform.platform(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "llmos": llmos_cli.__version__,
            "git": _git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results.*"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def previous_ratios(path: Path, env: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Ratios of the last run on the same machine and mode, keyed by (section, row name)."""
    if not path.exists():
        return {}
    try:
        prev = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    same = (
        prev.get("env", {}).get("machine", {}).get("cpu") == env["machine"]["cpu"]
        and prev.get("env", {}).get("mode") == env["mode"]
    )
    if not same:
        return {}
    return {
        (sec["title"], row["name"]): row["ratio"]
        for sec in prev.get("sections", [])
        for row in sec.get("rows", [])
        if isinstance(row.get("ratio"), (int, float))
    }


def render(env: dict[str, Any], sections: list[dict[str, Any]], prev: dict[tuple[str, str], float]) -> str:
    m, v = env["machine"], env["versions"]
    lines = [
        "# llmos benchmarks",
        "",
        "Every figure is measured against a baseline in the same run; **ratio > 1 means llmos is better** "
        "(faster, or less memory). `prev` is the ratio from the previous run on this machine: a falling ratio "
        "is a regression.",
        "",
        f"- command: `{env['command']}` ({env['mode']} mode), {env['date']}, {env.get('total_seconds', '?')} s",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gib']} GiB RAM, "
        f"GPU: {m['gpu'] or 'none'}; {m['os']}",
        f"- load average at start / end: {m['load_avg_start']} / {m.get('load_avg_end')} (the machine may be shared)",
        f"- versions: llmos {v['llmos']} (git {v['git']}), Python {v['python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, datasets {v['datasets']}; torch threads {env['torch_threads']}",
        "",
    ]
    for sec in sections:
        lines += [f"## {sec['title']}", ""]
        if "error" in sec:
            lines += [f"**FAILED** after {sec['seconds']} s: `{sec['error']}`", ""]
            if sec.get("traceback"):
                lines += [
                    "<details><summary>traceback</summary>",
                    "",
                    "```",
                    sec["traceback"].rstrip(),
                    "```",
                    "</details>",
                    "",
                ]
            continue
        lines += [
            "| benchmark | baseline | llmos | unit | ratio | prev | notes |",
            "|---|---:|---:|---|---:|---:|---|",
        ]
        for row in sec["rows"]:
            ratio = row["ratio"]
            cells = [
                row["name"],
                _fmt(row["baseline"]),
                _fmt(row["ours"]),
                row["unit"] or "",
                f"**{ratio:.2f}x**" if isinstance(ratio, (int, float)) else "",
                _ratio(prev.get((sec["title"], row["name"]))),
                (row["notes"] or "").replace("|", "/").replace("\n", " "),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"_{sec['seconds']} s_", ""]
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _jsonable(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description="Run llmos benchmarks; write bench/results.md."
    )
    ap.add_argument(
        "--quick", action="store_true", help="short runs (the suite stays under ~3 minutes on 2 cores)"
    )
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these benchmarks (train, memory, ...)"
    )
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results.md")
    ap.add_argument("--timeout", type=float, help="seconds per benchmark (default 600 quick, 3600 full)")
    ap.add_argument("--threads", type=int, help="torch threads in every benchmark (default: torch's choice)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.quick, args.rows_out, args.threads)
        return 0

    modules = discover()
    if args.only:
        wanted = {n.removeprefix("bench_") for n in args.only}
        unknown = wanted - {m.removeprefix("bench_") for m in modules}
        if unknown:
            ap.error(
                f"no benchmark named {', '.join(sorted(unknown))} (known: {', '.join(m[6:] for m in modules)})"
            )
        modules = [m for m in modules if m.removeprefix("bench_") in wanted]
    env = environment(args.quick, argv)
    if args.threads:
        env["torch_threads"] = args.threads
    timeout = args.timeout or (600 if args.quick else 3600)
    start = time.perf_counter()
    sections = []
    for module in modules:
        print(f"bench: {module} ...", file=sys.stderr, flush=True)
        sec = run_module(module, args.quick, timeout, args.threads)
        status = f"FAILED: {sec['error']}" if "error" in sec else f"{len(sec['rows'])} rows"
        print(f"bench: {module}: {status} ({sec['seconds']} s)", file=sys.stderr, flush=True)
        sections.append(sec)
    env["total_seconds"] = round(time.perf_counter() - start, 1)
    env["machine"]["load_avg_end"] = (
        [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    )

    json_path = args.out.with_suffix(".json")
    prev = previous_ratios(json_path, env)
    write_atomic(args.out, render(env, sections, prev) + "\n")
    write_atomic(
        json_path, json.dumps({"env": env, "sections": sections}, indent=1, default=_jsonable) + "\n"
    )
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 1 if any("error" in s for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
