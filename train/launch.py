"""The processes of a distributed run on one machine: ``kiln train --nproc N`` and its workers.

``kiln train --nproc N`` runs torch.distributed.run's elastic agent (what ``torchrun`` runs) in its own
process, so the command and the agent are one process and its signals are the agent's: SIGTERM, SIGINT and
SIGHUP are passed on to every worker, which the agent then waits for (30 s, then SIGKILL). A SIGKILL
cannot be passed on, so each worker asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG``, :func:`die_with_parent`): no worker outlives its agent to keep training and
rewriting the run folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

log = logging.getLogger("kiln.train")

# The pid of the agent that started this worker, set by :func:`launch` (torchrun does not record it).
AGENT_PID_ENV = "KILN_AGENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launch(nproc: int, argv: list[str], *, verbose: bool = False) -> int:
    """Run ``python -m kiln.cli ARGV`` in ``nproc`` processes on this machine; returns the exit status.

    The agent picks a free local rendezvous port (``--standalone``), so two runs do not collide.
    Exit status: 0 when every worker succeeded; a failing worker's own status (rank 0's first), or
    128 + the signal that killed it; 128 + the signal the agent got (130 for Ctrl-C, 143 for SIGTERM).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not verbose:  # the agent's own warnings ("Sending process 123 closing signal SIGINT", ...)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "kiln.cli", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        # the cause: not a worker the agent stopped (SIGTERM) because another had failed; the earliest, lowest
        # rank
        rank, failure = min(exc.failures.items(), key=lambda item: (
            item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))
        code = failure.exitcode
        if code < 0:  # killed by a signal: the worker had no chance to say why
            name = signal.Signals(-code).name
            print(f"kiln train: rank {rank} (pid {failure.pid}) was killed by {name}", file=sys.stderr)
            return 128 - code
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def die_with_parent() -> None:
    """In a worker started by a torchrun agent: die with SIGKILL when the agent dies, however it dies.

    Linux only (elsewhere nothing happens). If the agent that started this worker died before this call,
    exit at once: the kernel would not signal for a parent that is already gone.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("could not ask to die with the launcher (prctl: %s)", os.strerror(ctypes.get_errno()))
        return
    agent = os.environ.get(AGENT_PID_ENV)
    if agent and os.getppid() != int(agent):
        os._exit(128 + signal.SIGKILL)


__all__ = ["AGENT_PID_ENV", "die_with_parent", "launch"]
