"""`llmos ... --nproc N`: the same command as N processes on this machine, under torchrun's agent.

Rank 0 keeps this terminal (progress bars, results). The other ranks' stderr goes to log files,
so an error that every rank hits (a recipe error, say) is shown once; what only another rank saw
is repeated here after the run. The exit code is the first failed process's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, NoReturn

from llmos_cli.console import out
from llmos_cli.core.distributed import launched_by_torchrun, torchrun_command
from llmos_cli.errors import ERRORS_DIR_ENV, UserError, debug_enabled

TAIL_LINES = 20  # of a crashed rank's stderr


def launch_local(nproc: int, args: list[str]) -> NoReturn:
    """Run `llmos ARGS` as `nproc` processes (torchrun --standalone) and exit with their outcome."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if launched_by_torchrun():
        raise UserError("--nproc: already running under torchrun; drop --nproc (torchrun sets the processes)")
    cmd = torchrun_command(nproc, args)
    out.info(f"launching: torchrun {' '.join(cmd[3:])}")
    logs = Path(tempfile.mkdtemp(prefix="llmos-ranks-"))
    args = parse_args([f"--log_dir={logs}", *cmd[3:]])
    # What `torchrun --standalone` sets up: a rendezvous on a free local port.
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", uuid.uuid4().hex
    args.master_port = args.master_port or 29500
    config, entrypoint, entry_args = config_from_args(args)
    # Rank 0 keeps the terminal; every other local rank's stderr goes to a file under `logs`.
    config.logs_specs = DefaultLogsSpecs(log_dir=str(logs), redirects={r: Std.ERR for r in range(1, nproc)})
    os.environ[ERRORS_DIR_ENV] = str(logs)  # the ranks leave their error messages here
    if not debug_enabled():  # the agent's failure report repeats what the ranks print themselves
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        elastic_launch(config, entrypoint)(*entry_args)
    except ChildFailedError as err:
        code, message, crashed = _report(err.failures, logs)
        if message is not None:  # rank 0 said nothing: scripts reading --json still get the error
            out.emit({"error": message, "exit_code": code})
        if not crashed:
            shutil.rmtree(logs, ignore_errors=True)
        raise SystemExit(code) from None
    except SignalException as err:  # Ctrl-C or SIGTERM: the agent has stopped the ranks
        print(f"stopped by {err.sigval.name}", file=sys.stderr)
        raise SystemExit(128 + err.sigval) from None
    shutil.rmtree(logs, ignore_errors=True)
    raise SystemExit(0)


def _report(failures: dict[int, Any], logs: Path) -> tuple[int, str | None, bool]:
    """Print what failed ranks other than 0 said (once per distinct message), or the end of the log
    of one that crashed. Returns the exit code (the first failure's), the first failure's message
    when rank 0 left none, and whether a crash log is kept for the user to read."""
    said = {int(p.stem.rsplit("-", 1)[1]): p.read_text() for p in logs.glob("error-rank-*.txt")}
    # The cause is the first failure by time (whole seconds), then by rank, among those the agent did not
    # stop itself: ranks it ended with SIGTERM after another failed are echoes, even within the same second.
    first_rank = min(
        failures,
        key=lambda r: (-failures[r].exitcode == signal.SIGTERM, failures[r].timestamp, r),
    )
    shown, crashed = {said.get(0)}, False
    for rank, failure in sorted(failures.items()):
        if rank == 0:
            continue
        if rank in said:
            if said[rank] not in shown:
                print(f"rank {rank}: {said[rank]}", end="", file=sys.stderr)
                shown.add(said[rank])
        elif failure.exitcode > 0 or rank == first_rank or -failure.exitcode != signal.SIGTERM:
            # a crash that left no message; a rank the agent stopped (SIGTERM) after another failed is not one
            how = f"exit code {failure.exitcode}" if failure.exitcode > 0 else _signal_name(-failure.exitcode)
            print(
                f"rank {rank} failed ({how}); the end of its stderr (all of it: {logs}):\n"
                f"{_tail(logs, failure.local_rank)}",
                file=sys.stderr,
            )
            crashed = True
    first = failures[first_rank]
    code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    if 0 in said:
        return code, None, crashed
    message = said.get(first_rank, "").strip().removeprefix("error: ") or (
        f"rank {first_rank} failed ({_signal_name(-first.exitcode) if first.exitcode < 0 else f'exit code {code}'})"
    )
    return code, message, crashed


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _tail(logs: Path, local_rank: int) -> str:
    files = sorted(logs.glob(f"**/{local_rank}/stderr.log"))
    lines = files[-1].read_text(errors="replace").splitlines() if files else []
    return "\n".join(lines[-TAIL_LINES:])
