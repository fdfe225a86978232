"""The GPU check: one prepared script for a GPU box (`make gpu-check`, under 8 minutes on one H100/H200).

    python -m bench.gpu_check [--wheels DIR] [--device cuda|cpu] [--tiny] [--out bench/results-gpu.md]
    python -m bench.gpu_check --build-wheels DIR [--python-version 3.12]     # `make gpu-wheels`

1. Installs what the box lacks from a folder of wheels built beforehand on a machine with the package
   registries (`--build-wheels`): the project's dependencies except torch, transformers, peft and
   accelerate (a GPU box has its own CUDA builds of those), and llmos itself as a wheel. The install is
   `pip install --no-index --find-links DIR`: nothing is fetched, installed packages are kept.
2. Runs the tests marked `cuda` (one per stage: tests/test_cuda.py, tests/test_runners.py).
3. Writes bench/results-gpu.md, every figure a ratio measured in this run: llmos pretrain and finetune
   real tokens/s and MFU against a HF Trainer (bf16, SDPA, the same model, packed data, batch and steps)
   on a random-init ~320M llama (configs/gpu-llama-350m.yaml); the bf16 matmul rate measured here;
   LoRA vs QLoRA peak memory and tokens/s; batch generation and 16/64 concurrent serving clients against
   a per-prompt HF generate loop; with the card, driver, torch and transformers versions.

`--device cpu --tiny` runs the same path on a tiny model on the CPU (tests/test_gpu_check.py), so the
script is exercised where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PREINSTALLED = ("torch", "transformers", "peft", "accelerate")  # the GPU box's own builds
TORCH_STACK = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")  # what comes with torch: never downloaded
TEST_REQUIREMENTS = ("pytest>=8", "pytest-timeout>=2.3")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_runners.py")
# Every stage has a `cuda` test (tests/test_gpu_check.py checks this list against `pytest --collect-only`).
CUDA_STAGES = {
    "pretrain": "test_pretrain_on_cuda",
    "finetune full": "test_finetune_causal_on_cuda[full]",
    "finetune LoRA": "test_finetune_causal_on_cuda[lora]",
    "finetune QLoRA": "test_finetune_causal_on_cuda[qlora]",
    "finetune classification": "test_finetune_classification_on_cuda",
    "finetune seq2seq": "test_finetune_seq2seq_on_cuda",
    "eval": "test_eval_on_cuda",
    "generate": "test_generate_and_chat_run_on_cuda",
    "chat": "test_generate_and_chat_run_on_cuda",
    "serve": "test_serve_batches_concurrent_clients_on_cuda",
    "Python API": "test_python_api_on_cuda",
    "export with verification": "test_export_of_a_gpu_trained_qlora_adapter_verifies",
    "llmos run": "test_llmos_run_pipeline_on_cuda",
}
Run = Callable[[Sequence[str]], int]


# ---------------------------------------------------------------- the wheel folder


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What a GPU box needs beyond torch, transformers, peft and accelerate: the project's dependencies
    and every extra in `all` (qlora's bitsandbytes among them), and the test runner."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject.read_text())["project"]
    extras, wanted, seen = project["optional-dependencies"], list(project["dependencies"]), set()
    pending = ["all"]
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for req in extras[extra]:
            parsed = Requirement(req)
            if canonical(parsed.name) == canonical(project["name"]):  # llmos-cli[data,...]: more extras
                pending += [e for e in parsed.extras if e not in seen]
            else:
                wanted.append(req)
    wanted += TEST_REQUIREMENTS
    keep = [r for r in wanted if canonical(Requirement(r).name) not in PREINSTALLED]
    return list(dict.fromkeys(keep))


def resolve_command(requirements: Sequence[str], report: Path) -> list[str]:
    """pip's resolution of `requirements` with every dependency pinned, as a JSON report (no install)."""
    return [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", str(report), *requirements,
    ]  # fmt: skip


def pins_from_report(report: dict[str, Any]) -> list[str]:
    """name==version for every resolved package except the GPU box's own torch stack."""
    pins = []
    for item in report["install"]:
        meta = item["metadata"]
        name = canonical(meta["name"])
        if name in PREINSTALLED or name == "llmos-cli" or TORCH_STACK.match(name) or name == "torch":
            continue
        pins.append(f"{name}=={meta['version']}")
    return sorted(set(pins))


def download_command(pin: str, dest: Path, python_version: str) -> list[str]:
    """A binary wheel of `pin` for the GPU box's Python and platform (x86-64 manylinux)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--python-version", python_version, "--implementation", "cp", *platforms, "--dest", str(dest), pin,
    ]  # fmt: skip


def wheel_command(target: str, dest: Path) -> list[str]:
    """A wheel built here: llmos itself, or a package published as source only (pure Python)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), target]


def install_command(wheels: Path) -> list[str]:
    """On the GPU box: llmos and what it lacks, from the folder alone; installed packages are kept."""
    return [
        sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--quiet",
        "llmos-cli[all]", *TEST_REQUIREMENTS,
    ]  # fmt: skip


def build_wheels(dest: Path, python_version: str, run: Run | None = None) -> list[str]:
    """Fill `dest` with the wheels the GPU box needs (see the module doc); returns the pins."""
    run = run or (lambda cmd: subprocess.run(list(cmd), cwd=ROOT).returncode)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        if run(resolve_command(project_requirements(), report)) != 0:
            raise SystemExit("gpu-wheels: pip could not resolve the project's requirements")
        pins = pins_from_report(json.loads(report.read_text()))
    for pin in pins:
        if run(download_command(pin, dest, python_version)) != 0 and run(wheel_command(pin, dest)) != 0:
            raise SystemExit(f"gpu-wheels: no wheel for {pin}")
    if run(wheel_command(str(ROOT), dest)) != 0:
        raise SystemExit("gpu-wheels: could not build the llmos wheel")
    return pins


# ---------------------------------------------------------------- the cuda tests


def cuda_test_command(paths: Sequence[str] = CUDA_TESTS) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs", *paths]


def run_cuda_tests(paths: Sequence[str]) -> dict[str, Any]:
    """The `cuda` tests' outcome: counts from pytest's closing line, and its exit code."""
    done = subprocess.run(cuda_test_command(paths), cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    return {"exit_code": done.returncode, "summary": tail, **counts}


# ---------------------------------------------------------------- the benchmarks


def device_facts() -> dict[str, Any]:
    """Card, driver and versions: what a reader needs to compare a figure."""
    import torch
    import transformers

    facts = {"torch": torch.__version__, "transformers": transformers.__version__, "card": "none (CPU)"}
    if torch.cuda.is_available():
        facts["card"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        facts["driver"] = smi.stdout.strip() or "unknown"
    return facts


def matmul_rate(tiny: bool) -> float:
    """bf16 matmul FLOP/s measured here (the MFU denominator): n=8192 on a GPU."""
    import torch

    from bench.bench_train import matmul_peak

    return matmul_peak(torch.bfloat16, n=256 if tiny else 1024, seconds=0.3 if tiny else 2.0)


def train_setting(tiny: bool) -> Any:
    from bench.bench_train import Setting

    if tiny:
        return Setting("tiny-llama", 20, steps=4, warm=2, repeats=1, batch_size=4, seq_len=64)
    return Setting("gpu-llama-350m", None, steps=30, warm=10, repeats=1, batch_size=16, seq_len=1024)


def finetune_overrides(exp: Any, base: Path, out: Path, method: str, precision: str) -> list[str]:
    """The pretrain benchmark's recipe as a fine-tune of `base` (its model and tokenizer), packed text."""
    keep = [
        o for o in exp.overrides if not o.startswith(("model.config.", "run.output_dir=", "data.output="))
    ]
    return [
        *keep,
        f"model.name_or_path={base}",
        f"run.output_dir={out}",
        f"data.output={out.parent / 'data-finetune'}",
        f"finetune.method={method}",
        f"train.precision={precision}",
        "finetune.lora.r=16",
    ]


def stage_child(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one fine-tune; its steady tokens/s and peak memory (GPU, else host RSS)."""
    import resource

    import torch

    from bench.bench_train import RECIPE, quiet_offline, steady_tokens_per_s
    from llmos_cli.recipe import load_recipe
    from llmos_cli.stages import finetune

    quiet_offline()
    recipe = load_recipe(RECIPE, job["overrides"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    finetune.run(recipe)
    cuda = torch.cuda.is_available()
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"tokens_per_s": steady_tokens_per_s(recipe.output_dir, job["warm"]), "peak_bytes": peak}


def in_child(job: dict[str, Any]) -> dict[str, Any]:
    from bench.bench_train import child_env

    cmd = [sys.executable, "-m", "bench.gpu_check", "--child", json.dumps(job)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{job['name']} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_rows(tiny: bool, work: Path, peak: float) -> list[dict[str, Any]]:
    """llmos pretrain and finetune vs a HF Trainer on the same packed blocks; LoRA vs QLoRA."""
    import torch

    from bench.bench_train import Experiment, flops_per_token, measure_in_child

    setting = train_setting(tiny)
    Experiment.prepare(setting, work)
    exp = Experiment(setting, work)
    model = exp.build_model()
    n_params, fpt = (
        sum(p.numel() for p in model.parameters()),
        flops_per_token(model, exp.recipe.data.max_seq_len),
    )
    base = work / "base"
    model.save_pretrained(str(base))
    exp.tokenizer.save_pretrained(str(base))
    del model
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    prec = "bf16" if bf16 else "fp32"
    trainer = measure_in_child(setting, work, f"packed-{prec}")["tokens_per_s"]
    pretrain = measure_in_child(setting, work, f"llmos-{prec}")["tokens_per_s"]
    runs = {}
    for method in ("full", "lora", "qlora"):
        job = {
            "name": f"finetune {method}",
            "warm": setting.warm,
            "overrides": finetune_overrides(exp, base, work / f"ft-{method}", method, prec),
        }
        runs[method] = in_child(job)
    label = (
        f"llama {n_params / 1e6:.0f}M (random init), packed stdlib documents, batch {setting.batch_size} x "
        f"{exp.recipe.data.max_seq_len}, {setting.steps} steps ({setting.warm} untimed), {prec}, SDPA"
    )
    mfu = f"{fpt / 1e9:.2f} GFLOP/token (6N + attention); bf16 matmul rate measured here {peak / 1e12:.1f} TFLOP/s"

    def vs_trainer(name: str, ours: float) -> list[dict[str, Any]]:
        return [
            {"name": f"{name} vs HF Trainer: real tokens/s", "baseline": trainer, "ours": ours,
             "ratio": ours / trainer, "unit": "tokens/s", "notes": f"goal >= 1.3x; {label}"},
            {"name": f"{name}: MFU (Trainer / llmos)", "baseline": trainer * fpt / peak, "ours": ours * fpt / peak,
             "ratio": ours / trainer, "unit": "fraction of matmul rate", "notes": f"goal >= 0.40; {mfu}"},
        ]  # fmt: skip

    lora, qlora = runs["lora"], runs["qlora"]
    return [
        *vs_trainer("llmos pretrain", pretrain),
        *vs_trainer("llmos finetune (full)", runs["full"]["tokens_per_s"]),
        {"name": "QLoRA vs LoRA: peak memory", "baseline": lora["peak_bytes"] / 2**20,
         "ours": qlora["peak_bytes"] / 2**20, "ratio": lora["peak_bytes"] / qlora["peak_bytes"], "unit": "MiB",
         "notes": f"goal: QLoRA <= 0.45x LoRA's (ratio >= 2.2); r=16 on every projection; "
                  f"{'torch.cuda.max_memory_allocated' if torch.cuda.is_available() else 'host peak RSS'}; {label}"},
        {"name": "QLoRA vs LoRA: real tokens/s", "baseline": lora["tokens_per_s"], "ours": qlora["tokens_per_s"],
         "ratio": qlora["tokens_per_s"] / lora["tokens_per_s"], "unit": "tokens/s",
         "notes": "the price of dequantising the 4-bit base in every matmul"},
    ]  # fmt: skip


def generation_rows(tiny: bool) -> tuple[list[dict[str, Any]], float]:
    """Batch generation vs the per-prompt HF generate loop; returns the rows and the loop's tokens/s."""
    from bench import bench_generate

    if tiny:
        s = bench_generate.Settings(prompts=4, max_new_tokens=8, hidden=32, layers=1, batch_size=4, repeats=1)
    else:
        s = bench_generate.Settings(
            prompts=64, max_new_tokens=32, hidden=1024, layers=16, batch_size=64, repeats=2
        )
    m = bench_generate.measure(s)
    rows = bench_generate.rows(s, m)
    rows[0]["notes"] = rows[0]["notes"].replace("goal >= 5x", "goal >= 10x")
    return rows, m["tokens"] / statistics.median(m["loop_s"])


def serving_rows(tiny: bool, loop_tps: float) -> list[dict[str, Any]]:
    """16 and 64 concurrent clients of `llmos serve` against the per-prompt HF generate loop."""
    from bench import bench_serve

    rows = []
    for clients in (2, 4) if tiny else (16, 64):
        if tiny:
            s = bench_serve.Settings(clients=clients, requests_per_client=1, sequential_requests=1,
                                     max_tokens=8, repeats=1, hidden=32, layers=1)  # fmt: skip
        else:
            s = bench_serve.Settings(clients=clients, requests_per_client=2, sequential_requests=4,
                                     max_tokens=32, repeats=1, hidden=1024, layers=16)  # fmt: skip
        m = bench_serve.measure(s)
        rows.append(
            {
                "name": f"serve: {clients} concurrent clients vs the per-prompt HF generate loop",
                "baseline": loop_tps,
                "ours": m["con_tps"],
                "ratio": m["con_tps"] / loop_tps,
                "unit": "tokens/s",
                "notes": f"aggregate generated tokens/s, streaming, temperature 0; llama h{s.hidden} L{s.layers}; "
                f"p50 TTFT {bench_serve.pct(m['con_ttft'], 50) * 1000:.0f} ms",
            }
        )
    return rows


def section(title: str, make: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
    """One results section; a benchmark that fails becomes a FAILED section, the others still run."""
    import traceback

    start = time.perf_counter()
    try:
        result: dict[str, Any] = {"title": title, "rows": make()}
    except Exception as err:  # noqa: BLE001 - a failure is data for the report
        result = {
            "title": title,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def render_report(env: dict[str, Any], facts: dict[str, Any], tests: dict[str, Any], sections: list) -> str:
    from bench.run import render

    body = render(env, sections, {}).replace("# llmos benchmarks", "# llmos GPU check", 1)
    head, _, rest = body.partition("\n- command:")
    gpu = (
        f"- card: {facts['card']}, driver {facts.get('driver', 'n/a')}, CUDA {facts.get('cuda', 'n/a')}; "
        f"torch {facts['torch']}, transformers {facts['transformers']}\n"
        f"- `pytest -m cuda`: {tests.get('summary') or 'not run'} (exit code {tests.get('exit_code', 'n/a')})"
    )
    return f"{head}\n{gpu}\n- command:{rest}"


def check(args: argparse.Namespace) -> int:
    from bench.bench_train import quiet_offline
    from bench.run import environment, write_atomic

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks CUDA: this process and its children
    if args.wheels:
        print(f"gpu-check: installing from {args.wheels}", file=sys.stderr)
        subprocess.run(install_command(args.wheels), check=True)
    quiet_offline()
    tests = run_cuda_tests(args.tests) if not args.skip_tests else {}
    print(f"gpu-check: cuda tests: {tests.get('summary', 'skipped')}", file=sys.stderr)
    env = environment(quick=args.tiny, argv=sys.argv[1:])
    env["command"] = " ".join(["python -m bench.gpu_check", *sys.argv[1:]])
    facts = device_facts()
    start = time.perf_counter()
    peak = matmul_rate(args.tiny)
    sections = [
        {"title": "bf16 matmul rate (the MFU denominator)", "seconds": 0.0, "rows": [
            {"name": "bf16 matmul", "baseline": None, "ours": peak / 1e12, "ratio": None, "unit": "TFLOP/s",
             "notes": "n=8192 on a GPU (1024 on a CPU, 256 with --tiny), best of repeated products"}]},
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="llmos-gpu-check-") as tmp:
        sections.append(
            section(
                "Training (real tokens/s, MFU, memory)", lambda: training_rows(args.tiny, Path(tmp), peak)
            )
        )
    loop_tps: list[float] = []

    def generation() -> list[dict[str, Any]]:
        rows, tps = generation_rows(args.tiny)
        loop_tps.append(tps)
        return rows

    sections.append(section("Batch generation (generated tokens/s)", generation))
    if loop_tps:
        sections.append(section("Serving (aggregate tokens/s)", lambda: serving_rows(args.tiny, loop_tps[0])))
    env["total_seconds"] = round(time.perf_counter() - start, 1)
    env["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_atomic(args.out, render_report(env, facts, tests, sections) + "\n")
    print(f"gpu-check: wrote {args.out}", file=sys.stderr)
    failed = tests.get("exit_code", 0) not in (0, 5) or any("error" in s for s in sections)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="install what is missing from this folder of wheels first")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models and few steps (for the CPU test)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results-gpu.md")
    ap.add_argument("--tests", nargs="*", default=list(CUDA_TESTS), help="test files for `pytest -m cuda`")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--build-wheels", type=Path, metavar="DIR", help="build the wheel folder (needs PyPI)")
    ap.add_argument("--python-version", default="3.12", help="the GPU box's Python, for --build-wheels")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(stage_child(json.loads(args.child)), default=str))
        return 0
    if args.build_wheels:
        pins = build_wheels(args.build_wheels, args.python_version)
        print(f"gpu-wheels: {len(pins)} packages and llmos in {args.build_wheels}", file=sys.stderr)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
