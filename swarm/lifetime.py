"""Lifetimes: child processes that do not outlive the process that started them (Linux: the kernel's parent-death
signal), and periodic work that keeps its rate when a round is slow."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

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


async def run_every(seconds: float, work: Callable[[], Awaitable[object]], what: str, log: logging.Logger) -> None:
    """``await work()`` every ``seconds`` seconds, start to start, until cancelled; a failure is logged and the next
    round tries again. A round that takes longer than ``seconds`` is followed by the next at once: records that live
    two periods (announcements) are then refreshed within their lifetime while a round takes under one period, where
    a sleep of a whole period after each round would let them lapse once a round took over half of one."""
    due = time.monotonic() + seconds
    while True:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        try:
            await work()
        except Exception as e:  # noqa: BLE001 - periodic work must go on: the next round retries
            log.warning(f"{what} failed: {type(e).__name__}: {e}")
        due = max(due + seconds, time.monotonic())
