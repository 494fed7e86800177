"""SIGTERM / SIGINT during training: finish the step, write a checkpoint, then stop."""

from __future__ import annotations

import os
import signal
import threading


class StopSignals:
    """While active, SIGTERM and SIGINT (pre-emption, Ctrl-C) only set `received`: the training loop
    finishes its step, writes a checkpoint and returns. A second signal acts as it did before (by
    default: ends the process at once). The previous handlers are restored on exit. Signals can only
    be caught in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        self.received, self._previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
