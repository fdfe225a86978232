"""UserError (exit 2) and the one place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA_GATE = 3  # a data gate (`data.checks`) failed; the data report is written
ERRORS_DIR_ENV = "LLMOS_RANK_ERRORS"  # set by `--nproc`: each rank leaves its error message there


class UserError(Exception):
    """A problem the user can fix: bad recipe, bad input file, bad flag. Exits 2 without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class RunFailed(Exception):
    """A run that stopped for a known reason (diverged, interrupted): one clear message, no traceback."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE, result: dict | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.result = result  # what the command would have printed under --json, reported with the error


def debug_enabled() -> bool:
    return os.environ.get("LLMOS_DEBUG", "") not in ("", "0", "false", "False")


def run_guarded(fn: Callable[[], T]) -> T:
    """Run `fn`; map UserError to exit 2 and other exceptions to exit 1, traceback only under --debug."""
    try:
        return fn()
    except UserError as err:
        if debug_enabled():
            traceback.print_exc()
        _say(f"error: {err}", EXIT_USAGE)
        raise SystemExit(EXIT_USAGE) from None
    except RunFailed as err:
        if debug_enabled():
            traceback.print_exc()
        _say(f"error: {err.message}", err.exit_code, err.result)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - the top-level boundary
        from llmos_cli.core.train.memory import is_cuda_oom, oom_message

        if is_cuda_oom(err):  # any stage: what failed and the knobs to turn, no traceback
            if debug_enabled():
                traceback.print_exc()
            _say(f"error: {oom_message()}", EXIT_FAILURE)
            raise SystemExit(EXIT_FAILURE) from None
        if debug_enabled():
            traceback.print_exc()
        else:
            print("(run with --debug or LLMOS_DEBUG=1 for the traceback)", file=sys.stderr)
        _say(f"error: {type(err).__name__}: {err}", EXIT_FAILURE)
        raise SystemExit(EXIT_FAILURE) from None


def _say(message: str, exit_code: int, result: dict | None = None) -> None:
    """Print the error (under --json also as a JSON object on stdout, for scripts, with the command's
    `result` when it has one); under `--nproc`, also leave it for the launcher (written whole, then renamed)."""
    from llmos_cli.console import out

    print(message, file=sys.stderr)
    errors_dir, rank = os.environ.get(ERRORS_DIR_ENV), os.environ.get("RANK")
    if rank in (None, "0"):
        out.emit({**(result or {}), "error": message.removeprefix("error: "), "exit_code": exit_code})
    if errors_dir and rank is not None and os.path.isdir(errors_dir):
        tmp = os.path.join(errors_dir, f".error-rank-{rank}.tmp")
        with open(tmp, "w") as f:
            f.write(message + "\n")
        os.replace(tmp, os.path.join(errors_dir, f"error-rank-{rank}.txt"))
