"""Waiting on worker threads without losing Ctrl-C.

The kernel hands a process's SIGINT to any one of its threads. Python runs the handler (which
raises KeyboardInterrupt) in the main thread, but only once the main thread runs Python code again:
a main thread blocked in an untimed `concurrent.futures.wait` while a worker thread took the
signal sleeps on until some future finishes, which for a request held by a slow server can be
minutes. Waiting in short slices lets the main thread see the signal within a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, wait

SLICE_S = 0.2  # longest a Ctrl-C can go unseen


def wait_interruptibly(futures: Iterable[Future], return_when: str = ALL_COMPLETED) -> tuple[set[Future], set[Future]]:
    """concurrent.futures.wait for ALL_COMPLETED or FIRST_COMPLETED, in slices of SLICE_S seconds
    so that a KeyboardInterrupt is raised promptly whichever thread the signal reached."""
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(f"return_when={return_when!r}: only ALL_COMPLETED and FIRST_COMPLETED are supported")
    futures = set(futures)
    while True:
        done, pending = wait(futures, timeout=SLICE_S, return_when=return_when)
        if not pending or (return_when == FIRST_COMPLETED and done):
            return done, pending
