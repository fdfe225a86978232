"""DPO with LoRA: `llmos finetune` (objective dpo) against TRL's DPOTrainer on the same tiny llama.

Both train the same random-init tiny llama (bench/tiny_model.py) with the same LoRA adapters (r 8,
alpha 16, every linear layer, no dropout) on the same synthetic preference pairs (the right animal
sound chosen, a wrong one rejected), with the same beta, batch, steps, lr, linear schedule without
warmup, AdamW betas, clipping, fp32 and seed. Each reference is the base with the adapters disabled.
Timed: tokenise + train + save. Tokens/s counts the prompt + response tokens of both sides of every
pair trained on. Both saved adapters are then scored by one function (llmos's DPO objective against
the base) on the same held-out pairs, so accuracy is measured identically. Runs alternate.

    python bench/bench_dpo.py            # 600 train / 200 held-out pairs, 150 steps, 2 rounds
    python bench/bench_dpo.py --quick    # 400 / 200, 60 steps, 1 round
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import spread, standalone  # noqa: E402

TITLE = "Preference tuning (DPO)"
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "sheep": "baa"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice(list(SOUNDS))
        b = rng.choice([x for x in SOUNDS if x != a])
        rows.append(
            {
                "prompt": f"What does the {a} say?",
                "chosen": f" The {a} says {SOUNDS[a]}.",
                "rejected": f" The {a} says {SOUNDS[b]}.",
            }
        )
    return rows


def settings(quick: bool) -> dict[str, Any]:
    return {
        "n_train": 400 if quick else 600,
        "n_test": 200,
        "steps": 60 if quick else 150,
        "rounds": 1 if quick else 2,
        "batch_size": 8,
        "lr": 5e-3,
        "beta": 0.1,
        "max_len": 64,
        "seed": 0,
    }


def run_trl(base: Path, train_file: Path, out: Path, s: dict[str, Any]) -> float:
    """The baseline: TRL's DPOTrainer with a peft LoraConfig, as its docs show."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    args = DPOConfig(
        output_dir=str(out),
        beta=s["beta"],
        per_device_train_batch_size=s["batch_size"],
        max_steps=s["steps"],
        learning_rate=s["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=s["max_len"],
        logging_steps=s["steps"],
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=s["seed"],
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # as llmos (finetune.gradient_checkpointing defaults to false)
    )
    peft_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    ds = load_dataset("json", data_files=str(train_file), split="train")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    return time.perf_counter() - start


def run_llmos(base: Path, train_file: Path, out: Path, s: dict[str, Any]) -> float:
    from llmos_cli.recipe import validate_recipe
    from llmos_cli.stages import finetune

    recipe = validate_recipe(
        {
            "run": {"name": f"bench-dpo-{out.name}", "output_dir": str(out), "seed": s["seed"]},
            "model": {"name_or_path": str(base)},
            "data": {
                "train": str(train_file),
                "format": "preference",
                "validation_split": 0.0,
                "max_seq_len": s["max_len"],
                "output": str(out / "data"),
                "clean": {"dedup": False},  # the rows TRL trains on, repeats included
            },
            "finetune": {
                "method": "lora",
                "objective": "dpo",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
                "dpo": {"beta": s["beta"]},
            },
            "train": {
                "max_steps": s["steps"],
                "batch_size": s["batch_size"],
                "lr": s["lr"],
                "scheduler": "linear",
                "warmup": 0,
                "betas": [0.9, 0.999],
                "max_grad_norm": 1.0,
                "precision": "fp32",
                "device": "cpu",
                "log_every": s["steps"],
                "save_every": s["steps"],
            },
        },
        "<bench>",
    )
    start = time.perf_counter()
    finetune.run(recipe)
    return time.perf_counter() - start


def pair_tokens(base: Path, rows: list[dict[str, str]], s: dict[str, Any]) -> float:
    """Mean tokens per pair (prompt + chosen, prompt + rejected), as llmos encodes them."""
    from llmos_cli.core.data.preference import preference_encoder
    from llmos_cli.core.data.read import Row
    from llmos_cli.core.models import load_tokenizer
    from llmos_cli.recipe import DataSection

    encode = preference_encoder(
        load_tokenizer(base), DataSection(format="preference", max_seq_len=s["max_len"])
    )
    pairs = [encode(Row(r, "x", i)) for i, r in enumerate(rows)]
    return statistics.mean(len(p["input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)


def held_out_accuracy(base: Path, adapter: Path, rows: list[dict[str, str]], s: dict[str, Any]) -> float:
    """reward_accuracy of an adapter against its base (adapters disabled) on `rows`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmos_cli.core.data.preference import preference_encoder
    from llmos_cli.core.data.read import Row
    from llmos_cli.core.eval.loss import dataset_sums
    from llmos_cli.core.models import load_tokenizer
    from llmos_cli.core.runtime import Precision
    from llmos_cli.core.train.preference import preference_collate, preference_objective
    from llmos_cli.recipe import DataSection, FinetuneSection

    tok = load_tokenizer(base)
    encode = preference_encoder(tok, DataSection(format="preference", max_seq_len=s["max_len"]))
    pairs = [encode(Row(r, "x", i)) for i, r in enumerate(rows)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    objective = preference_objective(FinetuneSection(objective="dpo", dpo={"beta": s["beta"]}))
    _, count, sums = dataset_sums(
        model,
        pairs,
        objective,
        preference_collate(tok.pad_token_id),
        batch_size=32,
        device=torch.device("cpu"),
        precision=Precision("fp32", None),
    )
    return sums["reward_accuracy"] / count


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.tiny_model import build_tiny_llama

    s = settings(quick)
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    accs: dict[str, list[float]] = {"baseline": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_llama(root / "base")
        train_rows, test_rows = make_pairs(s["n_train"], 1), make_pairs(s["n_test"], 2)
        train_file = root / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        tokens = pair_tokens(base, train_rows, s) * s["steps"] * s["batch_size"]
        runners = [("baseline", run_trl), ("ours", run_llmos)]
        for r in range(s["rounds"]):
            for who, fn in runners if r % 2 == 0 else runners[::-1]:
                out = root / f"{who}-{r}"
                times[who].append(fn(base, train_file, out, s))
                accs[who].append(held_out_accuracy(base, out / "final", test_rows, s))
    acc_b, acc_o = statistics.mean(accs["baseline"]), statistics.mean(accs["ours"])
    t_b, t_o = statistics.median(times["baseline"]), statistics.median(times["ours"])
    setup = (
        f"tiny llama (hidden 64, 2 layers), LoRA r 8 on all linear layers, {s['n_train']} train / {s['n_test']} "
        f"held-out pairs, {s['steps']} steps, batch {s['batch_size']}, beta {s['beta']}, lr {s['lr']}, fp32, "
        f"{s['rounds']} round(s)"
    )

    return [
        {
            "name": "DPO LoRA: held-out reward accuracy vs TRL DPOTrainer",
            "baseline": round(100 * acc_b, 2),
            "ours": round(100 * acc_o, 2),
            "ratio": round(acc_o / max(acc_b, 1e-9), 4),
            "unit": "% accuracy",
            "notes": f"{setup}; both adapters scored by one function against their base; runs "
            f"{spread(accs['baseline'])} vs {spread(accs['ours'])}",
        },
        {
            "name": "DPO LoRA: tokens/s vs TRL DPOTrainer",
            "baseline": round(tokens / t_b, 1),
            "ours": round(tokens / t_o, 1),
            "ratio": round(t_b / t_o, 3),
            "unit": "tokens/s",
            "notes": f"{setup}; tokenise + train + save; median seconds {spread(times['baseline'])} vs "
            f"{spread(times['ours'])} (llmos also writes a resumable checkpoint)",
        },
    ]


if __name__ == "__main__":
    standalone(run, __doc__)
