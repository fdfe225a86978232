"""Chat SFT: `llmos finetune` (format chat, full) against TRL's SFTTrainer with packing, on the same tiny llama.

Data: synthetic single-turn chats generated deterministically (arithmetic, reversed words, repeated word
lists: a few to ~150 tokens, most far shorter than max_seq_len). Both sides pack: llmos with
`data.packing: true` (whole chats per row, best-fit decreasing, positions restarting per chat; loss on
the assistant turn; precision auto), TRL's SFTTrainer with packing (best-fit decreasing, padding-free)
on the same conversations as prompt-completion pairs, so its loss is on the completion only too. Same
model, packed rows per step, lr, linear schedule without warmup, AdamW, clipping, seed and precision
(TRL at the precision llmos's auto picked); TRL takes as many steps as llmos took in its epochs.
Each round runs both at its own seed (the data order), so the losses compare over orders, not one.
Timed: tokenise + train + save. Tokens/s: the real (non-padding) tokens each side trained on
over that time. Both final models are scored by one function on the same held-out chats (mean loss
per assistant token, llmos's encoding), so the losses are measured identically. Runs alternate.

    python bench/bench_sft.py --quick
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

TITLE = "Chat SFT (vs TRL SFTTrainer)"
WORDS = ("cat", "dog", "sun", "tree", "river", "stone", "cloud", "bread", "lamp", "road", "apple", "book")


def make_chats(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` distinct single-turn chats whose answers follow from the question: sums, reversals, word lists."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:  # distinct chats: llmos deduplicates its data, TRL does not
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            q, r = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            w = rng.choice(WORDS)
            q, r = f"Spell {w} backwards.", " ".join(reversed(w))
        else:
            ws = " ".join(rng.choices(WORDS, k=max(1, min(40, int(rng.expovariate(1 / 8))))))
            q, r = f"Repeat after me: {ws}", ws
        if q in seen:
            continue
        seen.add(q)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": r},
                ]
            }
        )
    return rows


def settings(quick: bool) -> dict[str, Any]:
    return {
        "n_train": 400 if quick else 4000,
        "n_test": 200,
        "epochs": 1 if quick else 2,
        "rounds": 1 if quick else 2,
        "batch_size": 7,  # packed rows of up to max_len tokens per step, both sides
        "lr": 3e-3,
        "max_len": 256,
        "seed": 0,  # round r runs both sides at seed + r: the loss is compared over data orders
    }


def encode(base: Path, rows: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    """The chats as llmos encodes them: input_ids and labels (loss on the assistant turn)."""
    from llmos_cli.core.data.formats import chat_encoder
    from llmos_cli.core.data.read import Row
    from llmos_cli.core.models import load_tokenizer
    from llmos_cli.recipe import DataSection

    enc = chat_encoder(load_tokenizer(base), DataSection(format="chat", max_seq_len=max_len))
    encoded = (enc(Row(r, "x", i)) for i, r in enumerate(rows))
    return [e for e in encoded if isinstance(e, dict)]  # (a str names why a row was dropped)


def logged_padding(run_dir: Path) -> float:
    """The padding share llmos logged for its run (metrics.jsonl's last training row)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r][-1]["padding"]


def run_trl(
    base: Path, train_file: Path, out: Path, s: dict[str, Any], bf16: bool, steps: int
) -> tuple[float, int]:
    """The baseline: TRL's SFTTrainer with packing (bfd, padding-free), prompt-completion chats."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    ds = load_dataset("json", data_files=str(train_file), split="train")
    ds = ds.map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
        remove_columns=["messages"],
    )
    args = SFTConfig(
        output_dir=str(out),
        packing=True,
        max_length=s["max_len"],
        per_device_train_batch_size=s["batch_size"],
        max_steps=steps,
        include_num_input_tokens_seen="non_padding",
        learning_rate=s["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        bf16=bf16,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=s["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return time.perf_counter() - start, int(trainer.state.num_input_tokens_seen)


def run_llmos(base: Path, train_file: Path, out: Path, s: dict[str, Any]) -> tuple[float, int, str, int]:
    """`llmos finetune`: seconds, real tokens trained, the precision auto picked and the steps taken."""
    from llmos_cli.recipe import validate_recipe
    from llmos_cli.stages import finetune

    recipe = validate_recipe(
        {
            "run": {"name": f"bench-sft-{out.name}", "output_dir": str(out), "seed": s["seed"]},
            "model": {"name_or_path": str(base)},
            "data": {
                "train": str(train_file),
                "format": "chat",
                "packing": True,
                "validation_split": 0.0,
                "max_seq_len": s["max_len"],
                "output": str(out / "data"),
            },
            "finetune": {"method": "full"},
            "train": {
                "epochs": s["epochs"],
                "batch_size": s["batch_size"],
                "lr": s["lr"],
                "scheduler": "linear",
                "warmup": 0,
                "betas": [0.9, 0.999],
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "device": "cpu",
                "log_every": 10_000,
                "save_every": 10_000,
                "eval_every": 10_000,
            },
        },
        "<bench>",
    )
    start = time.perf_counter()
    summary = finetune.run(recipe)
    return time.perf_counter() - start, summary["tokens"], summary["precision"], summary["steps"]


def held_out_loss(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    """Mean loss per assistant token of the model in `model_dir` on encoded `rows` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmos_cli.core.eval.loss import dataset_sums
    from llmos_cli.core.runtime import Precision
    from llmos_cli.core.train.batches import causal_lm_collate
    from llmos_cli.core.train.objectives import CAUSAL_LM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    total, count, _ = dataset_sums(
        model,
        rows,
        CAUSAL_LM,
        causal_lm_collate(model.config.pad_token_id or 0),
        batch_size=32,
        device=torch.device("cpu"),
        precision=Precision("fp32", None),
    )
    return total / count


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.bench_train import quiet_offline
    from bench.tiny_model import build_tiny_llama

    quiet_offline()
    s = settings(quick)
    rates: dict[str, list[float]] = {"baseline": [], "ours": []}
    losses: dict[str, list[float]] = {"baseline": [], "ours": []}
    pads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_llama(root / "base", hidden=128, layers=4)
        chats = make_chats(s["n_train"] + s["n_test"], 1)
        train_rows = chats[: s["n_train"]]
        test = encode(base, chats[s["n_train"] :], s["max_len"])  # held out: none of them trained on
        lengths = [len(r["input_ids"]) for r in encode(base, train_rows, s["max_len"])]
        train_file = root / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        precision, steps = None, 0
        for r in range(s["rounds"]):
            # llmos first in round 0: TRL runs at the precision llmos's auto picked, for as many steps.
            seeded = {**s, "seed": s["seed"] + r}
            for who in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                out = root / f"{who}-{r}"
                if who == "ours":
                    seconds, tokens, precision, steps = run_llmos(base, train_file, out, seeded)
                else:
                    seconds, tokens = run_trl(base, train_file, out, seeded, precision == "bf16", steps)
                rates[who].append(tokens / seconds)
                if who == "ours":
                    pads.append(logged_padding(out))
                losses[who].append(held_out_loss(out / "final", test))
    loss_b, loss_o = statistics.mean(losses["baseline"]), statistics.mean(losses["ours"])
    rate_b, rate_o = statistics.median(rates["baseline"]), statistics.median(rates["ours"])
    pad = statistics.mean(pads)
    setup = (
        f"tiny llama (hidden 128, 4 layers), full fine-tune, {s['n_train']} chats (median "
        f"{statistics.median(lengths):.0f} tokens, max_len {s['max_len']}), {s['epochs']} epoch(s) of llmos ({steps} steps), "
        f"TRL the same steps, both {s['batch_size']} packed rows a step, lr {s['lr']}, precision {precision} "
        f"(llmos auto), {s['rounds']} round(s) at seeds {s['seed']}..{s['seed'] + s['rounds'] - 1}; padding share: llmos {pad:.2f} (packed rows padded per batch), TRL 0.00 "
        "(padding-free packing)"
    )

    return [
        {
            "name": "chat SFT: tokens/s vs TRL SFTTrainer (packing)",
            "baseline": round(rate_b, 1),
            "ours": round(rate_o, 1),
            "ratio": round(rate_o / rate_b, 3),
            "unit": "tokens/s",
            "notes": f"goal >= 1.5x; {setup}; real tokens trained / seconds of tokenise + train + save; runs "
            f"{spread(rates['baseline'], 4)} vs {spread(rates['ours'], 4)}",
        },
        {
            "name": "chat SFT: held-out loss per assistant token vs TRL SFTTrainer",
            "baseline": round(loss_b, 4),
            "ours": round(loss_o, 4),
            "ratio": round(loss_b / loss_o, 4),
            "unit": "loss",
            "notes": f"goal: within 1%; {setup}; {s['n_test']} held-out chats scored by one function; runs "
            f"{spread(losses['baseline'], 4)} vs {spread(losses['ours'], 4)}",
        },
    ]


if __name__ == "__main__":
    standalone(run, __doc__)
