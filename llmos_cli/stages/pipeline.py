"""`llmos run PIPELINE`: chain data -> pretrain/finetune -> eval -> export from one recipe.

Each stage has a fingerprint over what defines it: the recipe sections it reads, the contents of
its input files and the fingerprints of the stages it consumes. A stage whose fingerprint matches
the last run's, and whose output is still there, is skipped; anything downstream of a changed
stage runs again. Fingerprints live in `<output_dir>/pipeline.json`; `<output_dir>/llmos.lock`
records the resolved recipe, package versions, input file hashes and stage fingerprints, so that
`llmos run --replay llmos.lock` repeats the pipeline offline and refuses changed inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_cli.console import out
from llmos_cli.core.data.read import list_files
from llmos_cli.core.lockfile import (
    LOCK_VERSION,
    FileHashes,
    check_versions,
    offline,
    package_versions,
    read_lock,
    verify_inputs,
)
from llmos_cli.core.models import locate_recipe_model
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe, load_recipe, validate_recipe

STATE_VERSION = 1
TRAINING = ("pretrain", "finetune")


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe keys (dotted) whose values define the stage
    after: tuple[str, ...]  # upstream stages whose fingerprints feed this one
    inputs: Callable[[Recipe, list[str]], list[Path]]  # files and folders it reads
    output: Callable[[Recipe], Path]  # what it leaves behind; gone means run again
    call: Callable[[Recipe], Any]


def _run_data(recipe: Recipe) -> Any:
    from llmos_cli.stages import data

    return data.run(recipe)


def _run_pretrain(recipe: Recipe) -> Any:
    from llmos_cli.stages import pretrain

    return pretrain.run(recipe)


def _run_finetune(recipe: Recipe) -> Any:
    from llmos_cli.stages import finetune

    return finetune.run(recipe)


def _run_eval(recipe: Recipe) -> Any:
    from llmos_cli.stages import evaluate

    return evaluate.run(recipe)


def _run_export(recipe: Recipe) -> Any:
    from llmos_cli.stages import export
    from llmos_cli.stages.common import trained_model_path

    return export.run(
        model=trained_model_path(recipe),
        formats=list(recipe.export.formats),
        out=export_dir(recipe),
        merge_lora=recipe.export.merge_lora,
        allow_pickle=recipe.model.allow_pickle,
    )


def export_dir(recipe: Recipe) -> Path:
    return Path(recipe.export.out) if recipe.export.out else recipe.output_dir / "export"


def _data_files(recipe: Recipe) -> list[Path]:
    d = recipe.data
    specs = [s for s in (d.train, d.validation) if s]
    return [f for spec in specs for f in list_files(spec, d.include)]


def _local(recipe: Recipe, ref: str | None) -> list[Path]:
    """The local folder a model or tokenizer reference names (a path, by the recipe's lookup rule, or a
    registered name), whose files a fingerprint covers; a hub id, or nothing found, adds none."""
    if not ref:
        return []
    try:
        return [locate_recipe_model(ref, recipe.source, hub=False)]
    except UserError:
        return []


def _model_if_not_trained_here(recipe: Recipe, stages: list[str]) -> list[Path]:
    """The model a stage reads, when no training stage of this pipeline produces it."""
    if any(s in stages for s in TRAINING):
        return []
    final = recipe.output_dir / "final"
    return [final] if final.is_dir() else _local(recipe, recipe.model.name_or_path)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "data",
            ("task", "run.seed", "data", "model.tokenizer", "model.name_or_path"),
            (),
            lambda r, _: (
                _data_files(r)
                + _local(r, r.model.tokenizer)
                + _local(r, r.model.name_or_path)
                + _local(r, r.data.label.model)  # the model a labelling step scores rows with
            ),
            lambda r: r.data_output / "report.json",
            _run_data,
        ),
        Stage(
            "pretrain",
            ("task", "run", "model", "data", "train"),
            ("data",),
            lambda r, _: _data_files(r),
            lambda r: r.output_dir / "final",
            _run_pretrain,
        ),
        Stage(
            "finetune",
            ("task", "run", "model", "data", "finetune", "train"),
            ("data",),
            lambda r, _: _data_files(r) + _local(r, r.model.name_or_path),
            lambda r: r.output_dir / "final",
            _run_finetune,
        ),
        Stage(
            "eval",
            ("task", "model", "data", "eval"),
            ("data", *TRAINING),
            lambda r, st: (
                (list_files(r.eval.data) if r.eval.data else _data_files(r))
                + _model_if_not_trained_here(r, st)
            ),
            lambda r: r.output_dir / "eval.json",
            _run_eval,
        ),
        Stage(
            "export",
            ("export",),
            TRAINING,
            _model_if_not_trained_here,
            export_dir,
            _run_export,
        ),
    )
}


# ---------------------------------------------------------------- fingerprints


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _section(dump: dict[str, Any], key: str) -> Any:
    node: Any = dump
    for part in key.split("."):
        node = node[part]
    return node


def stage_parts(
    stage: Stage, recipe: Recipe, stages: list[str], upstream: dict[str, str], hashes: FileHashes
) -> dict[str, str]:
    """What defines a stage, each part hashed: recipe sections, input files, upstream fingerprints."""
    dump = recipe.model_dump(mode="json")
    parts = {f"recipe {key}": _digest(_section(dump, key)) for key in stage.sections}
    for path in stage.inputs(recipe, stages):
        parts[f"input {path}"] = hashes.tree(path)
    for name in stage.after:
        if name in upstream:
            parts[f"stage {name}"] = upstream[name]
    return parts


# ---------------------------------------------------------------- state


@dataclass
class PipelineState:
    path: Path
    stages: dict[str, dict[str, Any]]
    file_hashes: dict[str, list[Any]]

    @classmethod
    def load(cls, run_dir: Path) -> PipelineState:
        path = run_dir / "pipeline.json"
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raw = {}
        if raw.get("version") != STATE_VERSION:
            raw = {}
        return cls(path, raw.get("stages", {}), raw.get("file_hashes", {}))

    def save(self) -> None:
        body = {"version": STATE_VERSION, "stages": self.stages, "file_hashes": self.file_hashes}
        write_atomic(self.path, json.dumps(body, indent=2, default=str))


def _why_run(
    stage: Stage, recipe: Recipe, parts: dict[str, str], record: dict[str, Any] | None
) -> str | None:
    """Why the stage must run, or None when it can be skipped."""
    if record is None:
        return "never run"
    if record.get("status") != "done":
        return "last run did not finish"
    old = record.get("parts", {})
    changed = sorted({k for k in parts.keys() | old.keys() if parts.get(k) != old.get(k)})
    if changed:
        return "changed: " + ", ".join(changed)
    if not stage.output(recipe).exists():
        return f"output missing: {stage.output(recipe)}"
    return None


# ---------------------------------------------------------------- run


def run(recipe_path: Path, overrides: list[str], *, force: bool = False) -> dict[str, Any]:
    """Run the pipeline in the recipe's `pipeline.stages`, skipping stages whose inputs have not changed."""
    return run_recipe(load_recipe(recipe_path, overrides), force=force)


def plan(recipe_path: Path, overrides: list[str], *, force: bool = False) -> list[dict[str, Any]]:
    """What `run` would do, stage by stage (run or skip, and why); writes nothing."""
    from llmos_cli.stages.checks import STAGE_CHECKS

    recipe = load_recipe(recipe_path, overrides)
    for name in _stages(recipe):  # what the run would refuse, the plan refuses with the same message
        if name in STAGE_CHECKS:
            STAGE_CHECKS[name](recipe)
    state = PipelineState.load(recipe.output_dir)
    return [
        {"stage": d.stage.name, "action": "run" if d.why else "skip", "reason": d.why or "unchanged"}
        for d in decide(recipe, state, FileHashes(dict(state.file_hashes)), force)
    ]


@dataclass
class Decision:
    stage: Stage
    parts: dict[str, str]
    fingerprint: str
    why: str | None  # None: skip


def decide(recipe: Recipe, state: PipelineState, hashes: FileHashes, force: bool) -> list[Decision]:
    """Fingerprint every stage and say which must run (all inputs are known before anything runs)."""
    stages = _stages(recipe)
    upstream: dict[str, str] = {}
    decisions = []
    for name in stages:
        stage = STAGES[name]
        parts = stage_parts(stage, recipe, stages, upstream, hashes)
        upstream[name] = _digest(parts)
        why = "forced" if force else _why_run(stage, recipe, parts, state.stages.get(name))
        decisions.append(Decision(stage, parts, upstream[name], why))
    return decisions


def run_recipe(recipe: Recipe, *, force: bool = False) -> dict[str, Any]:
    run_dir = recipe.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(run_dir)
    hashes = FileHashes(state.file_hashes)
    report = []
    for d in decide(recipe, state, hashes, force):
        name, record = d.stage.name, state.stages.get(d.stage.name)
        if d.why is None:
            out.info(f"run: {name}: unchanged, skipped")
            result = (record or {}).get("result")
            report.append(
                {"stage": name, "status": "skipped", "fingerprint": d.fingerprint, "result": result}
            )
            continue
        out.info(f"run: {name}: running ({d.why})")
        if name in TRAINING:
            _clear_stale_training(recipe, record, d.fingerprint)
        state.stages[name] = {"fingerprint": d.fingerprint, "parts": d.parts, "status": "running"}
        state.save()
        started = time.perf_counter()
        result = _jsonable(d.stage.call(recipe))
        seconds = round(time.perf_counter() - started, 3)
        state.stages[name].update(status="done", seconds=seconds, result=result)
        state.save()
        report.append(
            {
                "stage": name,
                "status": "ran",
                "reason": d.why,
                "fingerprint": d.fingerprint,
                "seconds": seconds,
                "result": result,
            }
        )
    lock = write_lock(recipe, {r["stage"]: r["fingerprint"] for r in report}, hashes)
    state.save()
    out.table(
        f"run: {run_dir}",
        ["stage", "status", "seconds", "fingerprint"],
        [(r["stage"], r["status"], r.get("seconds", "-"), r["fingerprint"][:12]) for r in report],
    )
    return {"stages": report, "pipeline": str(state.path), "lock": str(lock)}


def _stages(recipe: Recipe) -> list[str]:
    if not recipe.pipeline.stages:
        raise UserError(
            f"{recipe.source}: pipeline.stages: no stages to run",
            hint="add e.g. `pipeline: {stages: [data, pretrain, eval]}` to the recipe",
        )
    return list(recipe.pipeline.stages)


def _clear_stale_training(recipe: Recipe, record: dict[str, Any] | None, fingerprint: str) -> None:
    """A training stage re-run because its definition changed starts over: the old checkpoints
    and metrics belong to another recipe. An unfinished run of the same definition resumes."""
    if record is None or record.get("fingerprint") == fingerprint:
        return
    run = RunDir(recipe.output_dir)
    if run.checkpoints.exists() or run.metrics_file.exists():
        out.info(f"run: starting {run.path} over (its recipe or data changed since the last run)")
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    run.metrics_file.unlink(missing_ok=True)


def _jsonable(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return json.loads(json.dumps(result, default=str))


# ---------------------------------------------------------------- lock and replay


def write_lock(recipe: Recipe, fingerprints: dict[str, str], hashes: FileHashes) -> Path:
    """`<output_dir>/llmos.lock`: everything needed to replay the pipeline and check it is the same one."""
    stages = list(fingerprints)
    inputs: dict[str, str] = {}
    for name in stages:
        for path in STAGES[name].inputs(recipe, stages):
            inputs[str(path)] = hashes.tree(path)
    lock = {
        "lock_version": LOCK_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "working_dir": os.getcwd(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "recipe": recipe.model_dump(mode="json"),
        "inputs": inputs,
        "stages": fingerprints,
    }
    chosen = RunDir(recipe.output_dir).precision_file
    if chosen.exists():  # what train.precision auto chose on this machine, and the measurement behind it
        lock["precision"] = json.loads(chosen.read_text())
    path = recipe.output_dir / "llmos.lock"
    write_atomic(path, json.dumps(lock, indent=2, sort_keys=False) + "\n")
    return path


def replay(lock_path: Path, *, force: bool = False) -> dict[str, Any]:
    """Re-run a locked pipeline offline: same recipe, inputs checked by hash, version drift warned."""
    lock = read_lock(lock_path)
    drift = check_versions(lock.get("packages", {}))
    for line in drift:
        out.warn(f"{lock_path}: {line}")
    if Path(lock.get("working_dir", os.getcwd())) != Path.cwd():
        out.warn(
            f"{lock_path}: written in {lock['working_dir']}; relative paths now resolve from {Path.cwd()}"
        )
    verify_inputs(lock, lock_path)
    recipe = validate_recipe(lock["recipe"], str(lock_path))
    with offline():
        result = run_recipe(recipe, force=force)
    fingerprints = {s["stage"]: s["fingerprint"] for s in result["stages"]}
    result["matches_lock"] = fingerprints == lock.get("stages")
    result["version_drift"] = drift
    if not result["matches_lock"]:
        out.warn(f"{lock_path}: the replayed stages' fingerprints differ from the locked ones")
    return result
