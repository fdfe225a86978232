"""Training throughput: `llmos pretrain` against a plain HF `Trainer` on the same model, data, batch and steps.

Corpora: the Python standard library's top-level modules, split into documents at top-level
`def`/`class` boundaries (a few tokens to a few thousand: realistic, uneven lengths); and a short-document
corpus generated deterministically (chat turns, instructions and quotes, most far shorter than max_seq_len),
where llmos's default (precision auto) meets the padded Trainer and the packed Trainer at auto's precision.

- baseline, padded: `Trainer` with `DataCollatorForLanguageModeling(mlm=False)`, one row per document
  (truncated to max_seq_len, EOS appended), padded per batch; Trainer defaults otherwise.
- baseline, packed: the same `Trainer` fed llmos's pre-packed blocks (the loop's own efficiency).
- llmos: `stages.pretrain.run` on the same documents, packed by `llmos data`: at fp32 (its CPU default)
  and, where bf16 math is native, at bf16 (what llmos recommends there).

All use the quickstart recipe's model, lr, schedule, batch and steps, and the same torch threads.
Throughput counts real tokens only (documents and their EOS, never padding) over the steady-state steps
(the first `warm` steps are excluded); every run is a fresh process, the variants alternate, repeated,
and each figure is the median of the repeats (spread in the notes). MFU is against a matmul peak measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

TITLE = "Training throughput (real tokens/s)"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
DOC_BOUNDARY = re.compile(r"\n\n+(?=(?:@|def |class |async def ))")


@dataclass
class Setting:
    """One model size's benchmark: preset, steps timed and repeats."""

    preset: str  # configs/<preset>.yaml
    max_files: int | None  # stdlib modules used (None: all)
    steps: int
    warm: int  # steps excluded from timing (allocator warm-up, first-call overheads)
    repeats: int
    batch_size: int = 16  # the quickstart recipe's
    seq_len: int | None = None  # data.max_seq_len; None: the quickstart recipe's
    corpus: str = "stdlib"  # "stdlib": long source documents; "short": chat turns, instructions, quotes
    rows: int = 0  # documents in the short corpus


def settings(quick: bool) -> list[Setting]:
    if quick:
        return [
            Setting("tiny-llama", 30, steps=6, warm=2, repeats=2),
            Setting("tiny-llama", None, steps=6, warm=2, repeats=1, corpus="short", rows=3000),
        ]
    return [
        Setting("tiny-llama", None, steps=12, warm=4, repeats=5),
        Setting("small-llama", None, steps=4, warm=1, repeats=3, batch_size=8),
        Setting("tiny-llama", None, steps=12, warm=4, repeats=3, corpus="short", rows=20000),
        Setting("small-llama", None, steps=4, warm=1, repeats=2, batch_size=8, corpus="short", rows=20000),
    ]


def stdlib_documents(max_files: int | None) -> list[str]:
    """Top-level stdlib modules cut at top-level definitions: documents of very uneven length."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    docs = []
    for f in files:
        docs += [d for d in DOC_BOUNDARY.split(f.read_text(encoding="utf-8", errors="replace")) if d.strip()]
    return docs


WORD = re.compile(r"\b[a-z]{3,10}\b")
NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Dennis")


def short_documents(n: int, seed: int = 0) -> list[str]:
    """`n` short rows, as chat turns, instructions and quotes are: a few to a few hundred words
    (log-normal, median ~25), built from the stdlib's docstring vocabulary; deterministic."""
    import random

    text = " ".join(
        f.read_text(errors="replace") for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    )
    vocab = sorted(set(WORD.findall(text)))
    rng = random.Random(seed)

    def words(median: float) -> str:
        k = max(2, min(400, round(rng.lognormvariate(0, 0.9) * median)))
        return " ".join(rng.choices(vocab, k=k))

    kinds = (
        lambda: f"User: {words(10)}?\nAssistant: {words(18)}.",
        lambda: f"Instruction: {words(12)}.\nResponse: {words(20)}.",
        lambda: f'"{words(12).capitalize()}." - {rng.choice(NAMES)}',
    )
    return [rng.choice(kinds)() for _ in range(n)]


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul on the current device over ~`seconds`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (12 x layers x hidden x context)."""
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb_in)
    if emb_out is emb_in:  # tied: the LM head is a matmul with the embedding matrix
        n += emb_out.numel()
    cfg = model.config
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def write_corpus(path: Path, setting: Setting) -> int:
    """The setting's documents as JSONL; returns the file's size in bytes."""
    docs = short_documents(setting.rows) if setting.corpus == "short" else stdlib_documents(setting.max_files)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path.stat().st_size


def recipe_overrides(setting: Setting, corpus: Path, work: Path) -> list[str]:
    """`--set` overrides turning the quickstart recipe into this benchmark's run."""
    model_cfg = yaml.safe_load((ROOT / "configs" / f"{setting.preset}.yaml").read_text())["model"]["config"]
    return [
        f"data.train={corpus}",
        "data.include=[]",
        "data.validation_split=0.02",  # (0.0 writes an empty split that load_from_disk rejects)
        f"data.output={work / 'data'}",
        f"run.output_dir={work / 'run'}",
        f"train.max_steps={setting.steps}",
        f"train.batch_size={setting.batch_size}",
        f"train.log_every={setting.warm}" if setting.steps % setting.warm == 0 else "train.log_every=1",
        f"train.eval_every={setting.steps * 10}",
        "train.eval_batches=1",
        f"train.save_every={setting.steps * 10}",
        "train.resume=never",
        "train.num_workers=0",
        *([f"data.max_seq_len={setting.seq_len}"] if setting.seq_len else []),
        *(["data.clean.min_chars=1"] if setting.corpus == "short" else []),  # quickstart drops < 200 chars
        *[f"model.config.{k}={json.dumps(v)}" for k, v in model_cfg.items()],
    ]


class Experiment:
    """Prepared data and recipe for one Setting; runs llmos or a Trainer baseline on it.

    The parent process prepares the data once (`prepare`); every measured run is a fresh child
    process (`measure`), so that nothing one side sets process-wide (llmos tunes the host allocator
    on CPU) carries over to the other.
    """

    def __init__(self, setting: Setting, work: Path):
        from llmos_cli.core.models import load_tokenizer

        self.setting, self.work = setting, work
        self.overrides = recipe_overrides(setting, work / "corpus.jsonl", work)
        self.recipe = self.load()
        saved = json.loads((work / "rows.json").read_text())
        self.tokenizer = load_tokenizer(saved["tokenizer_dir"])
        self.doc_rows, self.blocks = saved["documents"], saved["blocks"]

    @staticmethod
    def prepare(setting: Setting, work: Path) -> None:
        """Write the corpus, run `llmos data` on it and save the Trainer's rows: documents and blocks."""
        from datasets import load_from_disk

        from llmos_cli.core.data.prepare import prepare, read_documents
        from llmos_cli.core.data.read import list_files
        from llmos_cli.core.data.report import DataReport
        from llmos_cli.core.models import load_tokenizer
        from llmos_cli.recipe import load_recipe

        corpus = work / "corpus.jsonl"
        if (work / "rows.json").exists():
            return
        write_corpus(corpus, setting)
        recipe = load_recipe(RECIPE, recipe_overrides(setting, corpus, work))
        prepared = prepare(recipe)
        tokenizer = load_tokenizer(prepared.tokenizer_dir)
        docs = read_documents(recipe, list_files(str(corpus)), DataReport())
        eos, limit = tokenizer.eos_token_id, recipe.data.max_seq_len
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        saved = {
            "tokenizer_dir": str(prepared.tokenizer_dir),
            "documents": [(x + [eos])[:limit] for x in ids],
            "blocks": [list(map(int, b)) for b in load_from_disk(str(prepared.path))["train"]["input_ids"]],
        }
        (work / "rows.json").write_text(json.dumps(saved))

    def load(self, extra: list[str] | None = None) -> Any:
        from llmos_cli.recipe import load_recipe

        return load_recipe(RECIPE, [*self.overrides, *(extra or [])])

    def build_model(self) -> torch.nn.Module:
        from llmos_cli.core.models import build_model
        from llmos_cli.core.runtime import set_seed

        set_seed(self.recipe.run.seed)
        tok = self.tokenizer
        special = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        return build_model(self.recipe.model.arch, self.recipe.model.config, len(tok), special)

    def measure(self, variant: str) -> dict[str, Any]:
        """One run of `variant` (see VARIANTS) in this process."""
        kind, precision = variant.split("-")
        if kind == "llmos":
            return self.llmos(precision)
        return self.trainer(packed=kind == "packed", bf16=precision == "bf16")

    def llmos(self, precision: str) -> dict[str, Any]:
        """`llmos pretrain`; real tokens/s over the log windows after the first `warm` steps."""
        from llmos_cli.stages import pretrain

        out_dir = self.work / f"llmos-{self.setting.preset}-{os.getpid()}"
        summary = pretrain.run(self.load([f"run.output_dir={out_dir}", f"train.precision={precision}"]))
        tokens_per_s = steady_tokens_per_s(out_dir, self.setting.warm)
        return {"tokens_per_s": tokens_per_s, "padding": 0.0, "precision": summary["precision"]}

    def trainer(self, packed: bool, bf16: bool = False) -> dict[str, Any]:
        """A plain HF Trainer with its default LM collator; real tokens/s after the first `warm` steps."""
        from datasets import Dataset
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

        s, t = self.setting, self.recipe.train
        real: list[int] = []
        slots: list[int] = []
        stamps: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                stamps.append(time.perf_counter())

        class CountingTrainer(Trainer):
            def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
                mask = inputs.get("attention_mask")
                real.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
                slots.append(inputs["input_ids"].numel())
                return super().training_step(model, inputs, num_items_in_batch)

        args = TrainingArguments(
            output_dir=str(self.work / f"hf-{self.setting.preset}-{os.getpid()}"),
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            max_steps=s.steps,
            learning_rate=t.lr,
            warmup_steps=int(t.warmup * s.steps),
            lr_scheduler_type=t.scheduler,
            weight_decay=t.weight_decay,
            adam_beta1=t.betas[0],
            adam_beta2=t.betas[1],
            max_grad_norm=t.max_grad_norm,
            seed=self.recipe.run.seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        rows = self.blocks if packed else self.doc_rows
        trainer = CountingTrainer(
            model=self.build_model(),
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": rows}),
            data_collator=DataCollatorForLanguageModeling(self.tokenizer, mlm=False),
            callbacks=[Clock()],
        )
        trainer.train()
        w = s.warm * t.grad_accum
        return {
            "tokens_per_s": sum(real[w:]) / (stamps[-1] - stamps[s.warm - 1]),
            "padding": 1 - sum(real) / sum(slots),
            "precision": "bf16" if bf16 else "fp32",
        }


# Trainer on padded documents / on llmos's packed blocks, and llmos, each at a precision.
VARIANTS = ("padded-fp32", "packed-fp32", "packed-bf16", "llmos-fp32", "llmos-bf16")


def child_env() -> dict[str, str]:
    """Environment of a benchmark's child process: offline, this checkout, this process's torch threads,
    and a model library of its own (runs register themselves; the user's library stays untouched)."""
    return {
        **os.environ,
        "LLMOS_HOME": tempfile.mkdtemp(prefix="llmos-bench-home-"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }


def measure_in_child(setting: Setting, work: Path, variant: str) -> dict[str, Any]:
    """Run one variant in a fresh Python process with this process's torch threads."""
    env = child_env()
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_train",
        "--measure",
        variant,
        str(work),
        json.dumps(asdict(setting)),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"{variant} run failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady_tokens_per_s(out_dir: Path, warm: int) -> float:
    """A run's real tokens/s over its log windows after step `warm` (from its metrics.jsonl)."""
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "split" not in r and r["step"] > warm]
    prev_tokens = _tokens_before(out_dir, warm)
    tokens = rows[-1]["tokens"] - prev_tokens
    seconds = 0.0
    for r in rows:
        seconds += (r["tokens"] - prev_tokens) / r["tokens_per_s"]
        prev_tokens = r["tokens"]
    return tokens / seconds


def _tokens_before(out_dir: Path, step: int) -> int:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next((r["tokens"] for r in rows if r.get("step") == step and "split" not in r), 0)


def _summary(values: list[float]) -> tuple[float, str]:
    med = statistics.median(values)
    spread = f"min {min(values):,.0f} / max {max(values):,.0f} over {len(values)} runs"
    return med, spread


def bf16_pays(config: Any) -> bool:
    """bf16 is worth measuring here: a GPU that supports it, or a CPU where the precision probe picks it."""
    from llmos_cli.core.precision_probe import choose_cpu_precision, model_shape

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return choose_cpu_precision(model_shape(config)).precision == "bf16"


def bench_setting(setting: Setting, work: Path) -> list[dict[str, Any]]:
    Experiment.prepare(setting, work)
    exp = Experiment(setting, work)
    probe = exp.build_model()
    n_params = sum(p.numel() for p in probe.parameters())
    fpt = flops_per_token(probe, exp.recipe.data.max_seq_len)
    native_bf16 = bf16_pays(probe.config)
    del probe
    variants = [v for v in VARIANTS if native_bf16 or not v.endswith("bf16")]
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(setting.repeats):
        # Alternate so that drift in the machine's load hits every variant alike.
        peaks["fp32"].append(matmul_peak(torch.float32))
        peaks["bf16"].append(matmul_peak(torch.bfloat16))
        for v in variants:
            results[v].append(measure_in_child(setting, work, v))
    rate = {k: [r["tokens_per_s"] for r in v] for k, v in results.items()}
    med = {k: _summary(v) for k, v in rate.items()}
    peak = {k: max(v) for k, v in peaks.items()}
    label = f"{setting.preset} ({n_params / 1e6:.1f}M params, seq {exp.recipe.data.max_seq_len}, batch {exp.recipe.train.batch_size})"
    common = f"{setting.steps} steps, first {setting.warm} untimed; {torch.get_num_threads()} threads"

    def versus(ours: str, base: str, name: str, notes: str) -> dict[str, Any]:
        # Ratios are taken per repeat (each pair ran back to back), then the median.
        pairs = [o / b for o, b in zip(rate[ours], rate[base], strict=True)]
        spread = "ratio per repeat " + ", ".join(f"{x:.2f}" for x in pairs)
        return {
            "name": f"{label}: {name}",
            "baseline": med[base][0],
            "ours": med[ours][0],
            "ratio": statistics.median(pairs),
            "unit": "tokens/s",
            "notes": f"{notes}; {spread}; baseline {med[base][1]}; llmos {med[ours][1]}",
        }

    rows = [
        versus(
            "llmos-fp32",
            "padded-fp32",
            "llmos pretrain (fp32, the default) vs HF Trainer, padded documents",
            f"goal >= 2x; both fp32 (each one's default on CPU); {common}",
        )
    ]
    if native_bf16:
        rows.append(
            versus(
                "llmos-bf16",
                "padded-fp32",
                "llmos pretrain (train.precision=bf16) vs HF Trainer (its default fp32), padded documents",
                f"goal >= 2x; bf16 is native here, so llmos recommends it (a hint on every CPU run); {common}",
            )
        )
    rows.append(
        versus(
            "llmos-fp32",
            "packed-fp32",
            "llmos pretrain vs HF Trainer fed the same packed blocks, both fp32",
            "goal >= 1.2x: the loop's own efficiency",
        )
    )
    if native_bf16:
        rows.append(
            versus(
                "llmos-bf16",
                "packed-bf16",
                "llmos pretrain vs HF Trainer fed the same packed blocks, both bf16",
                "goal >= 1.2x: the loop's own efficiency at bf16",
            )
        )
    padding = statistics.mean(r["padding"] for r in results["padded-fp32"])
    rows.append(
        {
            "name": f"{label}: padding fraction of batch slots",
            "baseline": round(padding, 3),
            "ours": 0.0,
            "ratio": None,
            "unit": "fraction",
            "notes": "Trainer pads each batch to its longest document; llmos packs documents (EOS-separated) into full blocks",
        }
    )
    for prec in ("fp32", "bf16") if native_bf16 else ("fp32",):
        rows.append(
            {
                "name": f"{label}: model FLOPs utilisation (MFU), {prec}",
                "baseline": med[f"padded-{prec}" if prec == "fp32" else "packed-bf16"][0] * fpt / peak[prec],
                "ours": med[f"llmos-{prec}"][0] * fpt / peak[prec],
                "ratio": None,
                "unit": "fraction of peak",
                "notes": f"baseline: Trainer {'padded' if prec == 'fp32' else 'packed'}; {fpt / 1e6:.1f} MFLOP/token "
                f"(6N + attention at full context); measured {prec} matmul peak {peak[prec] / 1e9:.0f} GFLOP/s",
            }
        )
    return rows


def bench_short(setting: Setting, work: Path) -> list[dict[str, Any]]:
    """The short-document corpus: llmos's default (precision auto) against HF Trainer padding each batch
    (what most people run) and against HF Trainer on llmos's packed blocks at the precision auto picked."""
    Experiment.prepare(setting, work)
    exp = Experiment(setting, work)
    lengths = sorted(len(d) for d in exp.doc_rows)
    seq = exp.recipe.data.max_seq_len
    rate: dict[str, list[float]] = {"padded": [], "packed": [], "llmos": []}
    padding: dict[str, list[float]] = {"padded": [], "packed": [], "llmos": []}
    picked = []
    for _ in range(setting.repeats):
        ours = measure_in_child(setting, work, "llmos-auto")  # first: the packed baseline uses its precision
        picked.append(ours["precision"])
        runs = {
            "llmos": ours,
            "padded": measure_in_child(setting, work, "padded-fp32"),
            "packed": measure_in_child(setting, work, f"packed-{ours['precision']}"),
        }
        for k, r in runs.items():
            rate[k].append(r["tokens_per_s"])
            padding[k].append(r["padding"])
    label = (
        f"{setting.preset}, short documents ({len(lengths)} rows, median {lengths[len(lengths) // 2]} tokens, "
        f"seq {seq}, batch {exp.recipe.train.batch_size})"
    )
    pad = {k: statistics.mean(v) for k, v in padding.items()}
    common = (
        f"auto picked {'/'.join(sorted(set(picked)))}; padding share of batch slots: llmos {pad['llmos']:.2f}, "
        f"Trainer padded {pad['padded']:.2f}, Trainer packed {pad['packed']:.2f}; {setting.steps} steps, first "
        f"{setting.warm} untimed; {torch.get_num_threads()} threads"
    )

    def versus(base: str, name: str, goal: str) -> dict[str, Any]:
        pairs = [o / b for o, b in zip(rate["llmos"], rate[base], strict=True)]
        return {
            "name": f"{label}: {name}",
            "baseline": statistics.median(rate[base]),
            "ours": statistics.median(rate["llmos"]),
            "ratio": statistics.median(pairs),
            "unit": "tokens/s",
            "notes": f"{goal}; {common}; ratio per repeat " + ", ".join(f"{x:.2f}" for x in pairs),
        }

    return [
        versus(
            "padded",
            "llmos pretrain (precision auto, the default) vs HF Trainer, padding collator",
            "goal >= 4x; Trainer at its CPU default fp32",
        ),
        versus(
            "packed",
            "llmos pretrain vs HF Trainer fed the same packed blocks at auto's precision",
            "goal >= 1.2x: the loop's own efficiency",
        ),
    ]


def quiet_offline() -> None:
    """No hub access, no progress bars: benchmarks print only their results."""
    for key in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
    ):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from llmos_cli.console import configure

    configure(quiet=True)


def run(quick: bool) -> list[dict[str, Any]]:
    quiet_offline()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-train-") as tmp:
        for setting in settings(quick):
            # Settings on the same files share the prepared data (its fingerprint ignores the model).
            short = setting.corpus == "short"
            work = Path(tmp) / (f"short-{setting.rows}" if short else f"files-{setting.max_files or 'all'}")
            work.mkdir(exist_ok=True)
            rows += (bench_short if short else bench_setting)(setting, work)
    return rows


def main() -> None:
    """`--quick` prints the rows; `--measure VARIANT WORK SETTING` runs one variant on prepared data and
    prints its result as JSON; `--trainer WORK FILES STEPS` prepares data and runs only the padded HF
    Trainer baseline (bench_memory measures its peak RSS)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--measure", nargs=3, metavar=("VARIANT", "WORK", "SETTING"))
    ap.add_argument("--trainer", nargs=3, metavar=("WORK", "FILES", "STEPS"))
    args = ap.parse_args()
    quiet_offline()
    if args.measure:
        variant, work, setting = args.measure
        result = Experiment(Setting(**json.loads(setting)), Path(work)).measure(variant)
        print(json.dumps(result))
        return
    if args.trainer:
        work, files, steps = Path(args.trainer[0]), int(args.trainer[1]), int(args.trainer[2])
        setting = Setting("tiny-llama", files or None, steps=steps, warm=1, repeats=1)
        Experiment.prepare(setting, work)
        Experiment(setting, work).trainer(packed=False)
        return
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
