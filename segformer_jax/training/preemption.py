"""Stopping a run cleanly on SIGTERM / SIGINT: the loop asks `should_stop(step)` once per step, saves a
checkpoint of that step and exits with `EXIT_PREEMPTED`.

Exit codes of train.py (README, "Preemption"):
    0    finished (or stopped at max_steps_this_run)
    1    an error (the message says what and what to do), a full disk included
    75   preempted (SIGTERM / SIGINT): the checkpoint of the step it stopped at is written; rerun the
         same command to resume (EX_TEMPFAIL: "try again")
    130  a second SIGINT: aborted at once (the shell's 128 + SIGINT), no checkpoint of the current step

Several hosts must stop at the same step, or the checkpoint is incomplete (every process writes its
part). With `jax.distributed` initialised, JAX's preemption sync manager owns SIGTERM (a C++ handler:
a notice on any host reaches all of them through the coordination service) and
`multihost_utils.reached_preemption_sync_point(step)`, called at every step by every process, says
True on all of them at the same step (max step of any host + 1), as in big_vision and MaxText. A
SIGINT there is turned into a SIGTERM of this process, so it goes the same way. Without the sync
manager (jax_enable_preemption_service off) the processes agree by an all-gather of the flag every
step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import jax

EXIT_PREEMPTED = 75
EXIT_ABORTED = 130

logger = logging.getLogger("segformer_jax.training")


def _sync_manager():
    from jax._src import distributed

    state = distributed.global_state
    return None if state.client is None else state.preemption_sync_manager


class StoppedDuringSetup(BaseException):
    """Raised by the signal handler while the run is still setting up (no step done yet, nothing to
    save): the run ends at once instead of after the restore and the compilation. A BaseException, so
    that no `except Exception` on the way (the damaged-checkpoint fallback) takes it for an error."""


class StopRequest:
    """Installs SIGTERM / SIGINT handlers for the duration of a `with` block (main thread only; a
    no-op elsewhere) and answers `should_stop(step)` the same way on every process."""

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.setting_up = True  # until the loop's first should_stop: a signal then ends the run at once
        self._previous = {}
        self._multi_host = jax.process_count() > 1
        self._sync = _sync_manager() if self._multi_host else None

    # -- handlers
    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:  # (normally the kernel's default action does this already)
                os._exit(EXIT_ABORTED)
            print(f"{name} again: already stopping at the end of this step", file=sys.stderr, flush=True)
            return
        self.signal_name, self.received_at = name, time.time()
        # A second Ctrl-C aborts at once, even inside a long compile or eval (the default action runs in
        # the kernel; this Python handler would only run when the current call returns).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(
            f"{name} received: finishing the current step, then writing a checkpoint and exiting "
            f"(exit code {EXIT_PREEMPTED}); Ctrl-C again aborts at once",
            file=sys.stderr,
            flush=True,
        )
        if self._sync is not None and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # the sync manager's handler tells the other hosts
        elif self.setting_up and not self._multi_host:
            raise StoppedDuringSetup(name)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        wanted = [signal.SIGINT] + ([] if self._sync is not None else [signal.SIGTERM])
        for s in wanted:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    # -- queries
    @property
    def requested_here(self) -> bool:
        """A signal reached this process (single host: the loop stops; several: see should_stop)."""
        return self.signal_name is not None

    def should_stop(self, step: int) -> bool:
        """True on every process at the same `step` once any of them got a stop signal."""
        self.setting_up = False
        if not self._multi_host:
            return self.signal_name is not None
        if self._sync is not None:
            if self._sync.reached_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(jax.numpy.int32(self.signal_name is not None))
        if bool(jax.numpy.any(flags)):
            self.signal_name = self.signal_name or "SIGTERM (another host)"
            return True
        return False
