"""Child processes that do not outlive the process that started them (Linux: the kernel's parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child process started from this process: the kernel sends the child ``signum`` when the
    thread that started it ends, however it ends (SIGKILL and the OOM killer included). None where the platform has no
    such signal. Call it in the thread that starts the child; the child exits at once (status 1) if this process ended
    before the signal was set."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child, between fork and exec, only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os._exit(1)

    return preexec

