"""`llmos data check RECIPE`: one example through the training and the serving path, shown with its
loss-carrying spans; the comparison itself is core/data/template_check.py."""

from __future__ import annotations

from typing import Any

from llmos_cli.console import out
from llmos_cli.core.data.template_check import check_example
from llmos_cli.recipe import Recipe


def run(recipe: Recipe, *, index: int = 0) -> dict[str, Any]:
    result, tokenizer = check_example(recipe, index)
    if result["format"] == "classification":
        out.info("data check: classification has no generated text, template or EOS to check")
    else:
        _show(tokenizer, result)
    return result


# ---------------------------------------------------------------- output


def _show(tokenizer: Any, result: dict[str, Any]) -> None:
    """The training text with loss-carrying spans marked: green on a TTY, [[ ]] in plain text."""
    if out.quiet or out.json_mode:
        return
    training = result["training"]
    if training and training.get("spans") is not None:
        segments = _segments(tokenizer, training)
        if out.interactive:
            from rich.text import Text

            text = Text()
            for piece, loss in segments:
                text.append(piece, style="bold green" if loss else "")
            out.err.print(Text("training text (loss-carrying in green):", style="bold"))
            out.err.print(text)
        else:
            _plain("training text (loss-carrying spans in [[ ]]):")
            _plain("".join(f"[[{p}]]" if loss else p for p, loss in segments))
    mismatch = result.get("mismatch")
    if mismatch:
        _plain(f"mismatch at {mismatch['unit']} {mismatch['position']}:\n{mismatch['diff']}")
    for problem in result.get("problems", []):
        out.warn(f"data check: {problem}")
    verdict = "ok" if result["ok"] else "FAILED"
    out.info(
        f"data check: {verdict} ({result['format']}, example {result['example']['index']}, "
        f"{result['loss_tokens']} loss tokens, eos carries loss: {result['eos_carries_loss']})"
    )


def _plain(text: str) -> None:
    """Text as it is (no markup, no wrapping), so the rendering shows the exact training text."""
    out.err.print(text, markup=False, highlight=False, soft_wrap=True)


def _segments(tokenizer: Any, training: dict[str, Any]) -> list[tuple[str, bool]]:
    """The training text cut at loss-span edges: (text, carries loss) pieces in order."""
    ids, edges, pos = training["input_ids"], [], 0
    for start, end in training["spans"]:
        edges += [(pos, start, False), (start, end, True)]
        pos = end
    edges.append((pos, len(ids), False))
    return [(tokenizer.decode(ids[a:b]), loss) for a, b, loss in edges if b > a]
