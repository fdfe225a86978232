"""`llmos ... --nproc N`: the same command as N processes on this machine, under torchrun's agent.

Rank 0 keeps this terminal (progress bars, results). The other ranks' stderr goes to log files,
so an error that every rank hits (a recipe error, say) is shown once; what only another rank saw
is repeated here after the run. The exit code is the first failed process's.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from llmos_cli.console import out
from llmos_cli.core.distributed import launched_by_torchrun, torchrun_command
from llmos_cli.errors import ERRORS_DIR_ENV, UserError, debug_enabled

TAIL_LINES = 20  # of a crashed rank's stderr


def launch_local(nproc: int, args: list[str]) -> NoReturn:
    """Run `llmos ARGS` as `nproc` processes (torchrun --standalone) and exit with their outcome."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if launched_by_torchrun():
        raise UserError("--nproc: already running under torchrun; drop --nproc (torchrun sets the processes)")
    cmd = torchrun_command(nproc, args)
    out.info(f"launching: torchrun {' '.join(cmd[3:])}")
    logs = Path(tempfile.mkdtemp(prefix="llmos-ranks-"))
    others = ",".join(f"{r}:2" for r in range(1, nproc))  # local rank r: stderr to a file
    os.environ[ERRORS_DIR_ENV] = str(logs)  # the ranks leave their error messages here
    if not debug_enabled():  # the agent's failure report repeats what the ranks print themselves
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        run(parse_args([f"--log_dir={logs}", f"--redirects={others}", *cmd[3:]]))
    except ChildFailedError as err:
        raise SystemExit(_report(err.failures, logs)) from None
    except SignalException as err:  # Ctrl-C or SIGTERM: the agent has stopped the ranks
        print(f"stopped by {err.sigval.name}", file=sys.stderr)
        raise SystemExit(128 + err.sigval) from None
    shutil.rmtree(logs, ignore_errors=True)
    raise SystemExit(0)


def _report(failures: dict[int, Any], logs: Path) -> int:
    """Print what the failed ranks other than 0 said (once per distinct message); the exit code."""
    said = {int(p.stem.rsplit("-", 1)[1]): p.read_text() for p in logs.glob("error-rank-*.txt")}
    shown = {said.get(0)}
    for rank, failure in sorted(failures.items()):
        if rank == 0:
            continue
        if rank in said:
            if said[rank] not in shown:
                print(f"rank {rank}: {said[rank]}", end="", file=sys.stderr)
                shown.add(said[rank])
        elif failure.exitcode > 0:  # a crash that left no message (a negative code: stopped by a signal)
            print(
                f"rank {rank} failed (exit code {failure.exitcode}); the end of its stderr "
                f"(all of it: {logs}):\n{_tail(logs, failure.local_rank)}",
                file=sys.stderr,
            )
    first = min(failures.values(), key=lambda f: f.timestamp)
    return first.exitcode if first.exitcode > 0 else 128 - first.exitcode


def _tail(logs: Path, local_rank: int) -> str:
    files = sorted(logs.glob(f"**/{local_rank}/stderr.log"))
    lines = files[-1].read_text(errors="replace").splitlines() if files else []
    return "\n".join(lines[-TAIL_LINES:])
