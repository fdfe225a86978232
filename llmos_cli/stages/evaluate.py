"""`llmos eval`: score a model on evaluation data; writes eval.json, predictions.jsonl (where there
are predictions) and a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos_cli.console import out
from llmos_cli.core.eval.tasks import EVALUATORS, EvalTarget, eval_task
from llmos_cli.core.metrics import check_metrics
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe
from llmos_cli.stages.common import trained_model_path

if TYPE_CHECKING:
    pass


def run(recipe: Recipe) -> dict[str, Any]:
    check_metrics(recipe.eval.metrics)
    task = eval_task(recipe)
    if task not in EVALUATORS:
        raise UserError(f"eval.task: '{task}' evaluation is not available in this build")
    target = EvalTarget.of(recipe, trained_model_path(recipe))
    model_path = target.info.path
    metrics, details = EVALUATORS[task](recipe, target)
    predictions = details.pop("predictions", None)
    result = {"metrics": metrics, "model": str(model_path), "task": task, **details}
    run_dir = RunDir(recipe.output_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if predictions is not None:
        pred_file = run_dir.path / "predictions.jsonl"
        write_atomic(pred_file, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        result["predictions"] = str(pred_file)
    write_atomic(run_dir.eval_file, json.dumps(result, indent=2))
    out.table(f"eval: {model_path}", ["metric", "value"], [(k, v) for k, v in metrics.items() if _scalar(v)])
    out.info(f"eval: wrote {run_dir.eval_file}")
    return result


def plan(recipe: Recipe) -> list[str]:
    """--dry-run: what `run` would do."""
    data = recipe.eval.data or recipe.data.validation or "the validation split"
    return [
        f"load the model ({recipe.output_dir / 'final'} or model.name_or_path)",
        f"{eval_task(recipe)}: score {data} on {', '.join(recipe.eval.metrics)}",
        f"write {recipe.output_dir / 'eval.json'}",
    ]


def compare(runs: list[Path], plot: Path | None = None) -> dict[str, Any]:
    """Two or more eval.json files (or the run dirs holding them) side by side, with each run's deltas
    against the first; a bar chart per metric to `plot`. A metric a run lacks shows as "-"."""
    if len(runs) < 2:
        raise UserError("--compare: give two or more runs (or eval.json files)")
    evals = [_read_eval(r)["metrics"] for r in runs]
    names = list(dict.fromkeys(k for m in evals for k in m if _scalar(m[k])))
    rows = []
    for name in names:
        values = [m.get(name) if _scalar(m.get(name)) else None for m in evals]
        first = values[0]
        deltas = [None if first is None or v is None else v - first for v in values[1:]]
        rows.append({"metric": name, "values": values, "deltas": deltas})
    labels = [_run_label(r) for r in runs]
    columns = ["metric", labels[0]]
    for label in labels[1:]:
        columns += [label, f"{label} - {labels[0]}"]
    out.table(
        "\n".join(f"{label} = {run}" for label, run in zip(labels, runs, strict=True)),
        columns,
        [
            [
                r["metric"],
                _shown(r["values"][0]),
                *(
                    c
                    for v, d in zip(r["values"][1:], r["deltas"], strict=True)
                    for c in (_shown(v), _delta(d))
                ),
            ]
            for r in rows
        ],
    )
    result: dict[str, Any] = {"runs": [str(r) for r in runs], "labels": labels, "metrics": rows}
    if plot is not None and rows:
        from llmos_cli.core.eval.plots import save_comparison_png

        result["plot"] = str(save_comparison_png(labels, {r["metric"]: r["values"] for r in rows}, plot))
        out.info(f"eval: wrote {plot}")
    return result


def _run_label(path: Path) -> str:
    """A run's short name in the table: its folder (the folder holding an eval.json file given)."""
    path = Path(path)
    return (path.parent if path.name == "eval.json" else path).name or str(path)


def _shown(value: float | None) -> Any:
    return "-" if value is None else value


def _delta(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"


def _read_eval(path: Path) -> dict[str, Any]:
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"--compare: no eval.json at {path}", hint="run `llmos eval RECIPE` for that run first"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err.msg})") from None


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float))
