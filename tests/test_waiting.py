"""Ctrl-C reaches a main thread that waits on workers, whichever thread the kernel gave the signal to."""

from __future__ import annotations

import signal
import sys
import threading
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ThreadPoolExecutor

import pytest

from explainer.waiting import wait_interruptibly


def main_thread_is_waiting() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code is wait_interruptibly.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("return_when", [ALL_COMPLETED, FIRST_COMPLETED])
def test_a_sigint_taken_by_a_worker_thread_interrupts_the_waiting_main_thread(return_when):
    assert threading.current_thread() is threading.main_thread()
    release = threading.Event()

    def worker():
        # Signal this worker thread itself, once the main thread is blocked in the wait: the
        # case where an untimed wait never wakes. The worker then waits for the main thread to
        # be interrupted (it sets `release`), giving up after 20 s so that the test fails, not hangs.
        while not main_thread_is_waiting():
            release.wait(0.001)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return release.wait(20)

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(worker)
        try:
            with pytest.raises(KeyboardInterrupt):
                wait_interruptibly([future], return_when=return_when)
        finally:
            release.set()
    assert future.result() is True, "the main thread saw the interrupt only after the worker finished"
