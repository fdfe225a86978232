"""Data gates (`data.checks`): limits on the measures of a data report, for CI to fail on bad data.

Each gate names one measure the report records under `measures` (text and task formats alike) and
whether it is a floor (`min_`) or a ceiling (`max_`). A gate whose measure the data does not have
(`max_label_share` on unlabelled text) fails: a check that cannot be made is not a pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmos_cli.console import out
from llmos_cli.recipe import ChecksSection

# gate key -> the measure it limits
GATES = {
    "min_rows": "rows",
    "max_duplicate_share": "duplicate_share",
    "max_truncated_share": "truncated_share",
    "max_train_validation_overlap": "train_validation_overlap",
    "max_label_share": "label_share",
    "max_dropped_share": "dropped_share",
}


@dataclass
class Gate:
    gate: str
    limit: float
    value: float | None  # None: not measured for this data
    passed: bool

    def describe(self) -> str:
        if self.value is None:
            return f"{self.gate}: not measured for this data ({GATES[self.gate]})"
        sign = "<" if self.gate.startswith("min_") else ">"
        return f"{self.gate}: {GATES[self.gate]} {_num(self.value)} {sign} {_num(self.limit)}"


def share(part: float, whole: float) -> float:
    """`part / whole` rounded for the report, 0 for an empty whole."""
    return round(part / whole, 6) if whole else 0.0


def evaluate(checks: ChecksSection, measures: dict[str, Any]) -> list[Gate]:
    """Every gate set in `checks`, judged against `measures`."""
    gates = []
    for key, limit in checks.model_dump(exclude_none=True).items():
        value = measures.get(GATES[key])
        if value is None:
            passed = False
        elif key.startswith("min_"):
            passed = value >= limit
        else:
            passed = value <= limit
        gates.append(Gate(key, limit, value, passed))
    return gates


def show(gates: list[Gate]) -> None:
    rows = [
        (g.gate, _num(g.limit), "n/a" if g.value is None else _num(g.value), "pass" if g.passed else "FAIL")
        for g in gates
    ]
    out.table("data checks", ["gate", "limit", "value", "result"], rows)


def records(gates: list[Gate]) -> list[dict[str, Any]]:
    return [asdict(g) for g in gates]


def failure_message(gates: list[Gate], report: str) -> str | None:
    """One message naming every failed gate (None when all passed)."""
    failed = [g.describe() for g in gates if not g.passed]
    if not failed:
        return None
    return f"data gate failed: {'; '.join(failed)} (see {report})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"
