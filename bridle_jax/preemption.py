"""The SIGTERM/SIGINT watch: a preemption notice becomes a flag the run loop polls between steps, so a run
checkpoints the step under way and returns instead of dying mid-step."""

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatch:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) become a flag that the training loop polls at safe points,
    so the run can checkpoint the current step and return instead of dying mid-step.

    Installed on creation, restored by `close()` (handlers not installed from Python, e.g. JAX's own C++ SIGTERM
    notifier, come back as the default action). `should_stop(step)` is a collective: on several processes every
    one calls it at the same points, and all get the same answer (the local flags are all-gathered, and JAX's
    preemption sync point, which Orbax reports and TPU maintenance events trigger, counts too). A second Ctrl-C
    aborts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer=None):
        self._checkpointer = checkpointer
        self._previous = {}
        self._flag = False
        self.reason: str | None = None
        self._checked_step, self._checked_result = None, False
        if threading.current_thread() is not threading.main_thread():
            logging.warning("train_and_evaluate runs outside the main thread: SIGTERM/SIGINT are not handled")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self._flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self._flag = True  # only a flag: a signal handler must not log or print (re-entrant I/O)
        self.reason = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        if step == self._checked_step and self._checked_result:
            return True
        stop = self._flag
        if jax.process_count() > 1:
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
            if stop and not self._flag:
                self.reason = "another process was signalled"
        if not stop and self._checkpointer is not None and step != self._checked_step:
            stop = self._checkpointer.reached_preemption(step)
            if stop:
                self.reason = "JAX preemption sync point"
        self._checked_step, self._checked_result = step, stop
        return stop

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
