"""Progress on stderr, for `explainer build` and `explainer explain` alike: a bar per post on a terminal,
plain lines otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
import threading


class BuildProgress:
    """Plain lines, one per step of each post: for logs and pipes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def start(self, slug: str, steps: int):
        pass

    def status(self, slug: str, text: str, advance: int = 0, detail: str = ""):
        """The post's current step; `detail` (like "3/17") changes too often for a log and
        shows on the terminal only."""
        with self._lock:
            if self._last.get(slug) == text:
                return
            self._last[slug] = text
        self.say(f"{slug}: {text}")

    def say(self, line: str):
        with self._lock:
            print(line, file=self.stream, flush=True)

    def close(self):
        pass


class RichBuildProgress(BuildProgress):
    """One bar per post with its current status, on a terminal; messages print above the bars."""

    def __init__(self, stream=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__(stream)
        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(file=self.stream),
        )
        self._tasks: dict[str, int] = {}
        self._bars.start()

    def start(self, slug: str, steps: int):
        self._tasks[slug] = self._bars.add_task(slug, total=steps, status="queued")

    def status(self, slug: str, text: str, advance: int = 0, detail: str = ""):
        self._bars.update(self._tasks[slug], status=f"{text} {detail}".strip(), advance=advance)

    def say(self, line: str):
        self._bars.console.print(line, markup=False, highlight=False)

    def close(self):
        self._bars.stop()


def progress_for(stream=None) -> BuildProgress:
    stream = stream or sys.stderr
    return RichBuildProgress(stream) if stream.isatty() else BuildProgress(stream)


class AnswerProgress:
    """`explainer explain`'s progress: the answers of one post, shown as build shows a post. Call it with
    (done, total) as answers arrive; close() when the post is done."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self._progress: BuildProgress | None = None
        self._done = 0

    def __call__(self, done: int, total: int):
        if self._progress is None:
            self._progress = progress_for(self.stream)
            self._progress.start(self.label, total)
        self._progress.status(self.label, f"{done} of {total} answers", advance=done - self._done)
        self._done = done

    def close(self):
        if self._progress is not None:
            self._progress.close()
