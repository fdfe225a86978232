"""Training throughput: `llmos pretrain` against a plain HF `Trainer` on the same model, data, batch and steps.

Corpus: the Python standard library's top-level modules, split into documents at top-level
`def`/`class` boundaries (a few tokens to a few thousand: realistic, uneven lengths).

- baseline, padded: `Trainer` with `DataCollatorForLanguageModeling(mlm=False)`, one row per document
  (truncated to max_seq_len, EOS appended), padded per batch; Trainer defaults otherwise.
- baseline, packed: the same `Trainer` fed llmos's pre-packed blocks (the loop's own efficiency).
- llmos: `stages.pretrain.run` on the same documents, packed by `llmos data`.

All use the quickstart recipe's model, lr, schedule, batch and steps, and the same torch threads.
Throughput counts real tokens only (documents and their EOS, never padding) over the steady-state steps
(the first `warm` steps are excluded); the three runs alternate, repeated, and each figure is the
median of the repeats (spread in the notes). MFU is against a matmul peak measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass
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


def settings(quick: bool) -> list[Setting]:
    if quick:
        return [Setting("tiny-llama", 30, steps=6, warm=2, repeats=2)]
    return [
        Setting("tiny-llama", None, steps=12, warm=4, repeats=5),
        Setting("small-llama", None, steps=4, warm=1, repeats=3, batch_size=8),
    ]


def stdlib_documents(max_files: int | None) -> list[str]:
    """Top-level stdlib modules cut at top-level definitions: documents of very uneven length."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    docs = []
    for f in files:
        docs += [d for d in DOC_BOUNDARY.split(f.read_text(encoding="utf-8", errors="replace")) if d.strip()]
    return docs


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


def write_corpus(path: Path, max_files: int | None) -> int:
    """The stdlib documents as JSONL; returns the file's size in bytes."""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_documents(max_files)))
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
        *[f"model.config.{k}={json.dumps(v)}" for k, v in model_cfg.items()],
    ]


class Experiment:
    """Prepared data and recipe for one Setting; runs llmos and the Trainer baselines on it."""

    def __init__(self, setting: Setting, work: Path):
        from llmos_cli.core.data.read import list_files
        from llmos_cli.core.data.report import DataReport
        from llmos_cli.core.models import load_tokenizer
        from llmos_cli.core.runtime import cpu_has_fast_bf16, pick_device, pick_precision
        from llmos_cli.stages import data as data_stage

        self.setting, self.work = setting, work
        corpus = work / "corpus.jsonl"
        if not corpus.exists():
            write_corpus(corpus, setting.max_files)
        self.overrides = recipe_overrides(setting, corpus, work)
        self.recipe = self.load()
        # llmos at its recommended setting here: bf16 on CPUs with native bf16 math, else `auto`.
        device = pick_device(self.recipe.train.device)
        fast = device.type == "cpu" and cpu_has_fast_bf16()
        self.precision = "bf16" if fast else pick_precision(self.recipe.train.precision, device).name
        prepared = data_stage.run(self.recipe)
        self.tokenizer = load_tokenizer(prepared.tokenizer_dir)
        docs = data_stage.read_documents(self.recipe, list_files(str(corpus)), DataReport())
        eos, limit = self.tokenizer.eos_token_id, self.recipe.data.max_seq_len
        ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        self.doc_rows = [(x + [eos])[:limit] for x in ids]
        from datasets import load_from_disk

        self.blocks = [list(map(int, b)) for b in load_from_disk(str(prepared.path))["train"]["input_ids"]]
        self.runs = 0

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

    def llmos(self) -> dict[str, float]:
        """`llmos pretrain`; real tokens/s over the log windows after the first `warm` steps."""
        from llmos_cli.stages import pretrain

        self.runs += 1
        out_dir = self.work / f"llmos-{self.setting.preset}-{self.runs}"
        summary = pretrain.run(self.load([f"run.output_dir={out_dir}", f"train.precision={self.precision}"]))
        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "split" not in r and r["step"] > self.setting.warm]
        prev_tokens = _tokens_before(out_dir, self.setting.warm)
        tokens = rows[-1]["tokens"] - prev_tokens
        seconds = 0.0
        for r in rows:
            window = r["tokens"] - prev_tokens
            seconds += window / r["tokens_per_s"]
            prev_tokens = r["tokens"]
        return {"tokens_per_s": tokens / seconds, "padding": 0.0, "precision": summary["precision"]}

    def trainer(self, packed: bool, bf16: bool = False) -> dict[str, float]:
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

        self.runs += 1
        args = TrainingArguments(
            output_dir=str(self.work / f"hf-{self.setting.preset}-{self.runs}"),
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


def _tokens_before(out_dir: Path, step: int) -> int:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next((r["tokens"] for r in rows if r.get("step") == step and "split" not in r), 0)


def _summary(values: list[float]) -> tuple[float, str]:
    med = statistics.median(values)
    spread = f"min {min(values):,.0f} / max {max(values):,.0f} over {len(values)} runs"
    return med, spread


def bench_setting(setting: Setting, work: Path) -> list[dict[str, Any]]:
    exp = Experiment(setting, work)
    probe = exp.build_model()
    n_params = sum(p.numel() for p in probe.parameters())
    fpt = flops_per_token(probe, exp.recipe.data.max_seq_len)
    del probe
    peaks = {"fp32": [], "bf16": []}
    results: dict[str, list[dict[str, Any]]] = {"padded": [], "packed": [], "llmos": [], "packed-same": []}
    for _ in range(setting.repeats):
        # Alternate so that drift in the machine's load hits every variant alike.
        peaks["fp32"].append(matmul_peak(torch.float32))
        peaks["bf16"].append(matmul_peak(torch.bfloat16))
        results["padded"].append(exp.trainer(packed=False))
        results["llmos"].append(exp.llmos())
        results["packed"].append(exp.trainer(packed=True))
        if results["llmos"][-1]["precision"] == "bf16":
            results["packed-same"].append(exp.trainer(packed=True, bf16=True))
    ours_prec = results["llmos"][0]["precision"]
    rate = {k: [r["tokens_per_s"] for r in v] for k, v in results.items() if v}
    # Ratios are taken per repeat (each pair ran back to back), then the median.
    pairs = {k: [o / b for o, b in zip(rate["llmos"], rate[k], strict=True)] for k in rate if k != "llmos"}
    ratio = {k: statistics.median(v) for k, v in pairs.items()}
    per_repeat = {k: "ratio per repeat " + ", ".join(f"{x:.2f}" for x in v) for k, v in pairs.items()}
    med = {k: _summary(v) for k, v in rate.items()}
    peak = {k: max(v) for k, v in peaks.items()}
    label = f"{setting.preset} ({n_params / 1e6:.1f}M params, seq {exp.recipe.data.max_seq_len}, batch {exp.recipe.train.batch_size})"
    common = f"{setting.steps} steps, first {setting.warm} untimed; {torch.get_num_threads()} threads"
    rows = [
        {
            "name": f"{label}: llmos pretrain vs HF Trainer, padded documents",
            "baseline": med["padded"][0],
            "ours": med["llmos"][0],
            "ratio": ratio["padded"],
            "unit": "tokens/s",
            "notes": f"goal >= 2x. Trainer fp32 (its default), llmos {ours_prec}; {common}; "
            f"{per_repeat['padded']}; baseline {med['padded'][1]}; llmos {med['llmos'][1]}",
        },
        {
            "name": f"{label}: llmos pretrain vs HF Trainer fed the same packed blocks",
            "baseline": med["packed"][0],
            "ours": med["llmos"][0],
            "ratio": ratio["packed"],
            "unit": "tokens/s",
            "notes": f"goal >= 1.2x. Trainer fp32 (its default), llmos {ours_prec}; {per_repeat['packed']}; "
            f"baseline {med['packed'][1]}",
        },
    ]
    if "packed-same" in rate:
        rows.append(
            {
                "name": f"{label}: llmos pretrain vs HF Trainer, packed blocks, both {ours_prec}",
                "baseline": med["packed-same"][0],
                "ours": med["llmos"][0],
                "ratio": ratio["packed-same"],
                "unit": "tokens/s",
                "notes": f"the loop alone, same precision; {per_repeat['packed-same']}; "
                f"baseline {med['packed-same'][1]}",
            }
        )
    padding = statistics.mean(r["padding"] for r in results["padded"])
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
    peak_prec = peak["bf16" if ours_prec == "bf16" else "fp32"]
    rows.append(
        {
            "name": f"{label}: model FLOPs utilisation (MFU)",
            "baseline": med["padded"][0] * fpt / peak["fp32"],
            "ours": med["llmos"][0] * fpt / peak_prec,
            "ratio": None,
            "unit": "fraction of peak",
            "notes": f"{fpt / 1e6:.1f} MFLOP/token (6N + attention at full context); measured matmul peak: "
            f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; each side against "
            "the peak of its own precision",
        }
    )
    return rows


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
            work = Path(tmp) / f"files-{setting.max_files or 'all'}"
            work.mkdir(exist_ok=True)
            rows += bench_setting(setting, work)
    return rows


def main() -> None:
    """`--quick` prints the rows; `--trainer WORK FILES STEPS` runs only the padded HF Trainer baseline
    (bench_memory measures its peak RSS)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trainer", nargs=3, metavar=("WORK", "FILES", "STEPS"))
    args = ap.parse_args()
    quiet_offline()
    if args.trainer:
        work, files, steps = Path(args.trainer[0]), int(args.trainer[1]), int(args.trainer[2])
        Experiment(Setting("tiny-llama", files or None, steps=steps, warm=1, repeats=1), work).trainer(
            packed=False
        )
        return
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
