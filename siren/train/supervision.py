"""Preemption and hang detection for every rank (docs/scale.md).

`Preemption`: SIGTERM or SIGUSR1 (SLURM's warning before the time limit, a spot-instance reclaim, `kill`) only sets a
flag. The flag travels in the step's one all-reduce, so every rank sees it at the same step, finishes that step, writes
a checkpoint and exits with `PREEMPTED_EXIT_CODE`; rerunning the command resumes bitwise.

`Watchdog`: a daemon thread per rank. If the step (or a hook: eval, checkpoint) armed on this rank has not finished
within `train.hang_timeout_s`, it writes every thread's stack to the rank's stderr and to
`RUN/logs/hang-rank<R>-step<S>.txt`, prints which rank and step hung, and ends the process with `HANG_EXIT_CODE`
(a collective that never returns cannot be interrupted from Python, so waiting it out is the only other choice).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("siren")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — the checkpoint is written, rerun the same command to resume
HANG_EXIT_CODE = 79
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Context manager: while active, SIGTERM/SIGUSR1 set `requested` instead of killing the process."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            # Only a flag here: logging from a signal handler can deadlock on the logging lock.
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False


class Watchdog:
    """Daemon thread that ends this rank when an armed phase overruns `timeout_s` (None or <= 0: off)."""

    def __init__(self, timeout_s: float | None, rank: int, run_dir: Path | None = None, poll_s: float | None = None):
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.rank, self.run_dir = rank, run_dir
        self.poll_s = poll_s or (min(1.0, self.timeout_s / 10) if self.timeout_s else 1.0)
        self._deadline: float | None = None
        self._what = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, name=f"siren-watchdog-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    def arm(self, what: str) -> None:
        """Start the clock for one phase, e.g. 'step 12' or 'checkpoint at step 500'."""
        self._what = what
        self._deadline = time.monotonic() + self.timeout_s if self.timeout_s is not None else None

    def disarm(self) -> None:
        self._deadline = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire()

    def _fire(self) -> None:
        msg = (
            f"siren: rank {self.rank}: {self._what} did not finish within train.hang_timeout_s={self.timeout_s:g} s; "
            f"the stacks of every thread of this rank follow; exiting with code {HANG_EXIT_CODE}"
        )
        print(msg, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.run_dir is not None:
            try:
                d = Path(self.run_dir) / "logs"
                d.mkdir(parents=True, exist_ok=True)
                step = self._what.replace(" ", "")
                with open(d / f"hang-rank{self.rank}-{step}.txt", "w") as f:
                    f.write(msg + "\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except OSError as exc:  # the stacks are on stderr already
                print(f"siren: rank {self.rank}: could not write the hang report: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def __exit__(self, *exc) -> bool:
        self._deadline = None
        self._stop.set()
        return False
