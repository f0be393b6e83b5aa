"""Runs one demo and leaves nothing of it behind: `python -I _demo_supervisor.py DEADLINE PROGRAM ARG...`

explainer.demos starts this in a session of its own, with the demo's output pipe as stdout. It runs
PROGRAM in a process group of its own, stdout and stderr both on that pipe, and waits until the
program exits, DEADLINE seconds pass, or SIGTERM comes (Ctrl-C in the build, or the build dying).
Then it kills every process the demo started, those that left its group or session (setsid)
included, and reaps them, so the pipe closes and no demo process outlives its run.

On Linux it is a child subreaper: a descendant whose parent exits is re-parented to it, not to
init, so it stays in reach. Elsewhere (macOS) it kills the demo's process group, which a process
that called setsid escapes.

The last line on its stderr says how the demo ended: `exit N` (N negative for a signal, as in
subprocess) or `timeout`. Standard library only, run with -I: nothing in the demo's project or
environment changes how it runs.
"""

import ctypes
import os
import select
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def main(deadline_s: float, command: list[str]) -> str:
    deadline = time.monotonic() + deadline_s
    wake_up = _wake_up_on(signal.SIGCHLD, signal.SIGTERM)
    subreaper = _become_subreaper()
    # SIGPIPE and SIGXFSZ, which Python ignores, back to their defaults, so that `yes | head` ends.
    demo = os.posix_spawn(
        command[0],
        command,
        os.environ,
        setpgroup=0,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        file_actions=[(os.POSIX_SPAWN_DUP2, 1, 2)],
    )
    try:
        return _wait(demo, deadline, wake_up)
    finally:
        _kill_all(demo, subreaper)


def _wake_up_on(*signals: int) -> int:
    """A pipe to select() on that gets a byte, the signal's number, when one of `signals` comes."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for number in signals:
        signal.signal(number, lambda *_: None)  # the byte is the message; nothing raised mid-cleanup
    return read_end


def _become_subreaper() -> bool:
    """Adopt orphaned descendants, and get SIGTERM if the build dies; False where Linux's prctl
    or /proc's list of children is missing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(_PR_SET_CHILD_SUBREAPER, *map(ctypes.c_ulong, (1, 0, 0, 0))) != 0:
        return False
    prctl(_PR_SET_PDEATHSIG, *map(ctypes.c_ulong, (signal.SIGTERM, 0, 0, 0)))
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _wait(demo: int, deadline: float, wake_up: int) -> str:
    while (code := _reap_exited(demo)) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([wake_up], [], [], remaining)[0]:
            return "timeout"
        if signal.SIGTERM in os.read(wake_up, 512):
            return f"exit {-signal.SIGTERM}"
    return f"exit {code}"


def _reap_exited(demo: int) -> int | None:
    """Reap every child that has exited (adopted orphans too); the demo's exit code if it is one."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == demo:
            code = os.waitstatus_to_exitcode(status)


def _kill_all(demo: int, subreaper: bool):
    try:
        os.killpg(demo, signal.SIGKILL)  # most of the demo at once
    except (ProcessLookupError, PermissionError):  # an empty group (macOS: one of zombies)
        pass
    if not subreaper:
        try:
            os.waitpid(demo, 0)
        except ChildProcessError:
            pass  # reaped when it exited
        return
    # Killing a child re-parents its own children to us: repeat until none is left.
    while children := _children():
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children", encoding="ascii") as listing:
            pids += [int(pid) for pid in listing.read().split()]
    return pids


if __name__ == "__main__":
    print(main(float(sys.argv[1]), sys.argv[2:]), file=sys.stderr)
