"""Ctrl-C and SIGTERM held to the end of the training step under way, so a stop mid-epoch is consistent."""

from __future__ import annotations

import signal
import threading
from types import FrameType

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeldInterrupts:
    """While inside, the first Ctrl-C or SIGTERM only marks the run as interrupted (`pending`): the
    step under way ends, its checkpoint holds a position inside the epoch, then `deliver()` raises
    what the signal would have raised. A second signal interrupts at once, as before.

    An interrupt raised in the middle of a step could leave the optimizer half-updated (AdamW
    updates its moments and the weights in several calls). Only signals whose handler raises in
    Python (Ctrl-C's KeyboardInterrupt, the CLI's SIGTERM) are held; one that would end the
    process outright keeps doing so. Outside the main thread nothing is held.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off under torchrun: every rank must stop at the same step
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "HeldInterrupts":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in HELD_SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):
                    self.previous[signum] = signal.signal(signum, self._hold)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None:  # asked twice: stop now
            self.previous[signum](signum, frame)
        self.pending = signum

    def __call__(self) -> bool:
        return self.pending is not None

    def deliver(self) -> None:
        """Raise what the held signal's own handler raises (KeyboardInterrupt, or Terminated for SIGTERM)."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            handler = self.previous.get(signum) or signal.getsignal(signum)
            handler(signum, None)
