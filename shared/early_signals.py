"""SIGTERM and SIGINT from the first moment of `cargotrack serve`: noted, never fatal.

Until a service's event loop handles them (`shared.runtime.Supervisor`), a stop
signal would kill the process with status 143 (SIGTERM's default action) or raise
KeyboardInterrupt in the middle of an import. `note_stop_signals()` replaces both with
a handler that only remembers the signal; the supervisor, once installed, treats a
noted signal as a stop request, so the service stops before (or as soon as) it starts
and exits with status 0.

This module imports nothing but `signal`, so that the console script
(`services/__main__.py`) can install the handler before it imports anything heavy
(argparse, the settings, grpc, the service's modules). What remains unprotected is the
interpreter's own start-up, before any cargotrack code runs; a parent that needs that
closed too (`shared.workers`) starts its children with the signals blocked, and
`unblock_stop_signals()` delivers them once the handler is in place.
"""

from __future__ import annotations

import signal
from types import FrameType

#: The signals that ask a service to drain and exit with status 0.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: The first stop signal noted since `note_stop_signals()`.
_noted: int | None = None


def _note(signum: int, _frame: FrameType | None) -> None:
    global _noted
    if _noted is None:
        _noted = signum


def note_stop_signals() -> None:
    """From now until the event loop handles them, SIGTERM and SIGINT are noted instead
    of killing the process (status 143) or raising KeyboardInterrupt."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note)


def unblock_stop_signals() -> None:
    """Deliver SIGTERM and SIGINT if they are blocked (a parent that blocked them before
    starting this process, so that one sent during the interpreter's start-up waits);
    a pending one runs the handler now. Call after `note_stop_signals()`."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def noted_signal() -> int | None:
    """The first stop signal noted so far (None: none)."""
    return _noted
