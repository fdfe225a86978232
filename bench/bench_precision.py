"""Quality guard for `train.precision: auto`: bf16 autocast against fp32 at the same steps.

Wherever auto's probe finds bf16 faster it trains in bf16, so bf16 must learn what fp32 learns:
the quickstart recipe (tiny llama on the Python standard library) pretrained for the same steps at
each precision, validation perplexity compared (goal: within 2%); and all-MiniLM-L6-v2 fine-tuned
for classification at each precision, held-out accuracy compared (goal: within 0.5 points). The
rows are measured whichever precision auto picks on this machine (the notes say which, and the
probe's measured speed ratio); on a CPU without fast bf16 the bf16 runs are slow, so they are short.

    python bench/bench_precision.py            # 40 pretraining steps; 600 sentences, 2 epochs
    python bench/bench_precision.py --quick    # 12 steps; 400 sentences, 1 epoch
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import standalone  # noqa: E402

TITLE = "Precision quality guard (bf16 vs fp32)"
PRECISIONS = ("fp32", "bf16")


def pretrain_perplexity(work: Path, precision: str, quick: bool) -> float:
    """Validation perplexity of the quickstart recipe after the same steps at `precision`."""
    from llmos_cli.recipe import load_recipe
    from llmos_cli.stages import pretrain

    steps = 12 if quick else 40
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.name=bench-precision-{precision}",
            f"run.output_dir={work / precision}",
            f"data.output={work / 'data'}",  # prepared once, reused by the second run
            f"data.max_documents={40 if quick else 120}",
            f"train.max_steps={steps}",
            "train.batch_size=8",
            f"train.eval_every={steps}",
            f"train.save_every={steps}",
            "train.eval_batches=20",
            f"train.precision={precision}",
            "train.device=cpu",
        ],
    )
    summary = pretrain.run(recipe)
    return math.exp(summary["validation"]["loss"])


def classification_accuracy(work: Path, precision: str, quick: bool) -> float:
    from bench import bench_finetune as ft

    s = {**ft.settings(quick), "precision": precision, "epochs": 1 if quick else 2, "rounds": 1}
    s["n_train"], s["n_test"] = (400, 300) if quick else (600, 500)
    train_file = work / "sentences.jsonl"
    if not train_file.exists():
        train_file.write_text("".join(json.dumps(r) + "\n" for r in ft.make_sentences(s["n_train"], 1)))
    out = work / f"cls-{precision}"
    ft.run_llmos(train_file, out, s)
    return ft.accuracy(out / "final", ft.make_sentences(s["n_test"], 2), s["max_len"])


def auto_choice(model_dir: Path) -> str:
    """What auto picks here for the quickstart model's shapes, and the probe's bf16 speed ratio."""
    from transformers import AutoConfig

    from llmos_cli.core.precision_probe import choose_cpu_precision, model_shape

    choice = choose_cpu_precision(model_shape(AutoConfig.from_pretrained(str(model_dir))))
    return f"auto picks {choice.precision} here (bf16 measured {choice.speedup:.2f}x fp32)"


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.bench_train import quiet_offline

    quiet_offline()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LLMOS_HOME"] = str(work / "home")  # the bench's runs stay out of the user's library
        ppl, acc = {}, {}
        for precision in PRECISIONS:
            ppl[precision] = pretrain_perplexity(work, precision, quick)
            acc[precision] = classification_accuracy(work, precision, quick)
        picked = auto_choice(work / "fp32" / "final")
    ppl_diff = ppl["bf16"] / ppl["fp32"] - 1
    points = 100 * (acc["bf16"] - acc["fp32"])
    return [
        {
            "name": "quickstart pretrain: validation perplexity, bf16 autocast vs fp32 at the same steps",
            "baseline": round(ppl["fp32"], 3),
            "ours": round(ppl["bf16"], 3),
            "ratio": round(ppl["fp32"] / ppl["bf16"], 4),
            "unit": "perplexity",
            "notes": f"goal within 2%: {'met' if abs(ppl_diff) <= 0.02 else 'NOT met'} ({ppl_diff:+.2%}); "
            f"{12 if quick else 40} steps, batch 8, seq 256, fp32 master weights; {picked}",
        },
        {
            "name": "MiniLM classification: held-out accuracy, bf16 autocast vs fp32",
            "baseline": round(100 * acc["fp32"], 2),
            "ours": round(100 * acc["bf16"], 2),
            "ratio": round(acc["bf16"] / max(acc["fp32"], 1e-9), 4),
            "unit": "% accuracy",
            "notes": f"goal within 0.5 points: {'met' if abs(points) <= 0.5 else 'NOT met'} ({points:+.2f}); "
            f"all-MiniLM-L6-v2, {'400 train / 300 test, 1 epoch' if quick else '600 train / 500 test, 2 epochs'}, "
            "batch 32",
        },
    ]


if __name__ == "__main__":
    standalone(run, __doc__)
