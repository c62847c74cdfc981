"""Stop requests by signal: Ctrl-C (SIGINT), SIGTERM (`timeout`, `docker stop`, a scheduler's preemption)
and SIGUSR1 (SLURM's warning before the time limit) only set a flag; training stops at the next
optimizer-step boundary, saves that step and exits with the conventional status 128 + signal.

No torch or Lightning here: the command line imports this module to map a stop to its exit status.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(Exception):
    """Training stopped on a signal after saving its last finished optimizer step.

    `signum`: the signal; `exit_status`: 128 + signum (143 for SIGTERM), what a shell reports for a
    process ended by that signal. (Ctrl-C is raised as `KeyboardInterrupt` instead: status 130.)"""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.exit_status = 128 + signum


class StopRequests:
    """Flag-only handlers for `STOP_SIGNALS`.

    The handlers found when it is made are the ones `restore` puts back (make it before Lightning installs
    its own: those would outlive the trainer); `install` (main thread only) may run again after Lightning's.
    `with StopRequests() as stop:` installs them and restores on exit. `stop.signum` is the first stop
    signal received, or None. A Ctrl-C after a first request raises `KeyboardInterrupt` at once (an
    impatient user); a repeated SIGTERM/SIGUSR1 changes nothing. `forward(signum)`, when set, passes
    SIGTERM/SIGUSR1 on (to the other training processes this one launched); Ctrl-C reaches them from the
    terminal itself.
    """

    def __init__(self):
        self.signum: int | None = None
        self.forward: Callable[[int], None] | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handler(self, signum: int, frame) -> None:
        """The signal handler: note the request (no logging here: a handler may run inside a log call)."""
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if signum != signal.SIGINT and self.forward is not None:
            self.forward(signum)

    def install(self) -> None:
        """(Re)install the handlers (Lightning installs its own SIGTERM handler when training starts)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handler)

    def restore(self) -> None:
        """Put back the handlers found when this object was made."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "StopRequests":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def worker_ignores_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """A DataLoader `worker_init_fn`: the loader's worker processes ignore `STOP_SIGNALS`, then `then(worker_id)`
    (the loader's own init function, e.g. Lightning's worker seeding) runs.

    A scheduler (SLURM's `scancel`, `--signal=USR1@…`) or a terminal signals every process of the job, the
    workers too; a worker killed by SIGTERM makes torch raise in the training process at once ("DataLoader
    worker … is killed by signal"), before the step is saved, and one stopped by Ctrl-C feeds no more
    batches. The training process decides when to stop; its loader ends the workers as usual then."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if then is not None:
        then(worker_id)
