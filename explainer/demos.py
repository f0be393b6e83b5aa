"""Live demos: code blocks that run at build time and publish their real output.

A fenced block whose info string says `demo` (```sh demo, ```python demo allow-errors timeout=300)
runs in a subprocess from the project root. Its output goes below it as a plain fenced block, the
same in every language. Like Quarto's freeze, a result is cached under a hash of the code and of
the project files the code names, so an unchanged demo never runs twice.

A demo is someone's code running on the builder's machine, so it runs in a small sandbox: an
environment of allowlisted names with no credentials in it (DEMO_ENVIRONMENT), a deadline that
ends it and every process it started (explainer._demo_supervisor), and a cap on the output
published.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tokenize
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin

from explainer.errors import UserError
from explainer.fileio import write_atomic
from explainer.markdown_segments import UnreadableMarkdown, read_markdown
from explainer.render import fence_for, fenced

DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 24 * 3600.0  # a deadline past a day is a typo or an attack (timeout=inf, 1e308), not a demo
DEFAULT_OUTPUT_LIMIT = 1 << 20  # bytes of a demo's output published; the rest is counted, not kept
TAIL_LINES = 20  # how much of a failing demo's output the error shows
_CACHE_VERSION = "demo-v2"  # bump when the stored result's meaning changes (v2: the sandboxed environment)
_GRACE_S = 5.0  # how long the supervisor may take to clean up after the deadline or SIGTERM
_SUPERVISOR = Path(__file__).with_name("_demo_supervisor.py")

# The environment a demo sees: only these names of the build's environment, each spelled out, so that a
# demo can't publish a key or token it was never meant to see (a pattern like LC_* let LC_GITHUB_PAT
# through). PATH is the build's, the build's interpreter folder first.
DEMO_ENVIRONMENT = (
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",  # who runs it, and where their files are
    # how text, dates and times read: POSIX's locale categories, and GNU's LANGUAGE
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_COLLATE",
    "LC_MESSAGES",
    "LC_MONETARY",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",  # `python` imports what the build imports
    "XDG_CACHE_HOME",
    "EXPLAINER_CACHE_DIR",  # where llama_ref finds the catalog's models
    "CUDA_VISIBLE_DEVICES",  # which GPU a model demo may use
)
DEMO_SETTINGS = {"TERM": "dumb", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}  # plain text, as it comes

# Fence language -> the interpreter that runs the block's text as one program.
_RUNNERS = {
    "sh": ["sh", "-c"],
    "shell": ["sh", "-c"],
    "bash": ["bash", "-c"],
    "python": [sys.executable, "-c"],
    "py": [sys.executable, "-c"],
}


@dataclass(frozen=True)
class Demo:
    code: str
    code_language: str  # a key of _RUNNERS
    where: str  # "posts/x.md:12", for messages
    allow_errors: bool = False
    timeout_s: float | None = None  # None: the runner's default


@dataclass(frozen=True)
class DemoResult:
    output: str  # stdout and stderr interleaved, as a terminal shows them
    exit_code: int
    timed_out: bool = False
    cached: bool = False


@dataclass(frozen=True)
class FenceInfo:
    code_language: str  # the info string's first word, lower case
    is_demo: bool
    allow_errors: bool
    timeout_s: float | None
    rest: list[str]  # words we don't interpret; kept in the published info string


def parse_fence_info(info: str, where: str) -> FenceInfo:
    """Read `python demo allow-errors timeout=60` (only the first word is the programming language)."""
    words = info.split()
    code_language, flags = (words[0].lower(), words[1:]) if words else ("", [])
    is_demo = "demo" in flags
    allow_errors, timeout_s, rest = False, None, []
    for word in flags:
        if word == "demo":
            continue
        if is_demo and word == "allow-errors":
            allow_errors = True
        elif is_demo and word.startswith("timeout="):
            timeout_s = checked_timeout(word.removeprefix("timeout="), f"{where}: demo fence has {word!r}")
        else:
            rest.append(word)
    if is_demo and code_language not in _RUNNERS:
        raise UserError(
            f"{where}: can't run a ```{code_language or '(no language)'} demo; "
            f"mark a {', '.join(sorted(set(_RUNNERS)))} block as demo instead"
        )
    return FenceInfo(code_language, is_demo, allow_errors, timeout_s, rest)


def checked_timeout(value, where: str) -> float:
    """A demo deadline in seconds: a number above 0 and at most MAX_TIMEOUT_S (inf and nan are not)."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:  # false for nan too
        raise UserError(f"{where}; write a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, e.g. timeout=300")
    return seconds


class DemoRunner:
    """Runs demos from `project_root`, caching results in `cache_dir/demos` (None: no cache).

    A demo publishes at most `output_limit` bytes of output, then a line saying how much there was.
    A truncated result is cached like any other: the same code gives the same output, and the
    limit is part of the cache key.

    Thread-safe: a site build runs several posts at once. `runs` and `cache_hits` count for the
    build summary.
    """

    def __init__(
        self,
        project_root: Path,
        cache_dir: Path | None,
        *,
        rerun: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        inside: Path | None = None,
    ):
        self.project_root = Path(project_root).resolve()
        self.store = Path(cache_dir) / "demos" if cache_dir is not None else None
        self.inside = inside  # a folder results are never written out of, through a symlink (fileio.check_inside)
        self.rerun = rerun
        self.timeout_s = timeout_s
        self.output_limit = output_limit
        self.runs = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopped = False

    def run(self, demo: Demo) -> DemoResult:
        """The demo's result, from the cache or a fresh run. Raise UserError if it fails and
        is not marked allow-errors (a failure is never cached, so the next build retries)."""
        key = self.cache_key(demo)
        if not self.rerun and (result := self._load(key)) is not None:
            with self._lock:
                self.cache_hits += 1
            return result
        result = self._execute(demo)
        with self._lock:
            self.runs += 1
        if result.exit_code != 0 and not demo.allow_errors:
            tail = "\n".join(result.output.splitlines()[-TAIL_LINES:])
            what = (
                f"timed out after {demo.timeout_s or self.timeout_s:g} s"
                if result.timed_out
                else f"failed with exit code {result.exit_code}"
            )
            raise UserError(
                f"demo at {demo.where} {what}; fix it, or mark its fence allow-errors "
                f"to publish the failure. Last lines of its output:\n{tail}"
            )
        self._save(key, result)
        return result

    def stop(self):
        """End every demo still running, with every process it started, and refuse new ones
        (Ctrl-C). Demos run in their own session, so the terminal's interrupt does not reach them."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for supervisor in running:
            supervisor.terminate()
        for supervisor in running:
            _end(supervisor)

    def cache_key(self, demo: Demo) -> str:
        digest = hashlib.sha256()
        for part in (_CACHE_VERSION, str(self.output_limit), demo.code_language, demo.code):
            digest.update(part.encode() + b"\0")
        for path in sorted(self.named_files(demo)):
            digest.update(path.relative_to(self.project_root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def named_files(self, demo: Demo) -> set[Path]:
        """Project files the demo's code names, directly or as a module (`-m llama_ref`), so that
        editing them reruns the demo. Folders count as every file inside them."""
        files = set()
        for word in _words(demo.code, demo.code_language):
            for candidate in _path_candidates(word):
                path = (self.project_root / candidate).resolve()
                if path == self.project_root or not path.is_relative_to(self.project_root):
                    continue  # the whole project, or outside it: not "a file it names"
                if path.is_file():
                    files.add(path)
                elif path.is_dir():
                    files.update(_files_under(path))
        return files

    def _load(self, key: str) -> DemoResult | None:
        if self.store is None:
            return None
        try:
            stored = json.loads((self.store / f"{key}.json").read_text(encoding="utf-8"))
            return DemoResult(stored["output"], stored["exit_code"], stored["timed_out"], cached=True)
        except (FileNotFoundError, ValueError, KeyError):
            return None  # absent or unreadable: run it again

    def _save(self, key: str, result: DemoResult):
        if self.store is not None:
            record = {"output": result.output, "exit_code": result.exit_code, "timed_out": result.timed_out}
            write_atomic(
                self.store / f"{key}.json", json.dumps(record, ensure_ascii=False, indent=1), inside=self.inside
            )

    def _execute(self, demo: Demo) -> DemoResult:
        timeout_s = demo.timeout_s or self.timeout_s
        env = demo_environment()
        interpreter, *arguments = _RUNNERS[demo.code_language]
        program = shutil.which(interpreter, path=env["PATH"])
        if program is None:
            raise UserError(
                f"demo at {demo.where}: can't find {interpreter} on PATH; install it or change the fence language"
            )
        with self._lock:
            if self._stopped:
                raise KeyboardInterrupt
            # Own session: the terminal's Ctrl-C reaches the build, which ends demos itself.
            supervisor = subprocess.Popen(
                [sys.executable, "-I", str(_SUPERVISOR), repr(timeout_s), program, *arguments, demo.code],
                cwd=self.project_root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._running.add(supervisor)
        output = _CappedOutput(self.output_limit)
        reader = threading.Thread(target=output.read, args=(supervisor.stdout,), daemon=True)
        reader.start()
        hung = False
        try:
            # The supervisor keeps the deadline; this one only guards against the supervisor itself hanging.
            supervisor.wait(timeout_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            hung = True
            _end(supervisor)
        except BaseException:  # Ctrl-C: don't leave the demo running in its own session
            _end(supervisor)
            raise
        finally:
            with self._lock:
                self._running.discard(supervisor)
        # Every process that held the pipe is gone, so it ends at once. Without a subreaper, one that
        # called setsid may still hold it: it is not waited for, and its reader is left to it.
        reader.join(_GRACE_S)
        if not reader.is_alive():
            supervisor.stdout.close()
        with supervisor.stderr:
            status = supervisor.stderr.read().decode("utf-8", errors="replace").strip()
        with self._lock:
            if self._stopped:  # ended by stop(): its output is not a result
                raise KeyboardInterrupt
        ending = status.splitlines()[-1] if status else ""
        if ending == "timeout" or hung:
            return DemoResult(output.text(), -signal.SIGKILL, timed_out=True)
        if not ending.startswith("exit "):
            raise UserError(
                f"demo at {demo.where}: its supervisor failed ({ending or supervisor.returncode}); "
                f"that is a bug in explainer: please report it with this line"
            )
        return DemoResult(output.text(), int(ending.removeprefix("exit ")))


def demo_environment() -> dict[str, str]:
    """The build's environment, cut down to DEMO_ENVIRONMENT, plus DEMO_SETTINGS and PATH."""
    env = {name: os.environ[name] for name in DEMO_ENVIRONMENT if name in os.environ}
    env.update(DEMO_SETTINGS)
    # `python` in a shell demo means the interpreter running the build (the project's venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    return env


def _end(supervisor: subprocess.Popen):
    """Ask the supervisor to end its demo (it kills every process the demo started), and kill the
    supervisor if it doesn't exit in time."""
    if supervisor.poll() is None:
        supervisor.terminate()
    try:
        supervisor.wait(_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(supervisor.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        supervisor.wait()


class _CappedOutput:
    """A demo's output as it is read: the first `limit` bytes kept, the rest counted and dropped,
    so a demo that writes gigabytes is neither kept in memory nor blocked on a full pipe."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = bytearray()
        self.total = 0

    def read(self, pipe):
        while chunk := os.read(pipe.fileno(), 1 << 16):
            if len(self.kept) < self.limit:
                self.kept += chunk[: self.limit - len(self.kept)]
            self.total += len(chunk)

    def text(self) -> str:
        truncated = self.total > self.limit
        # A character cut in half at the limit is left out rather than shown as garbage.
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(bytes(self.kept), final=not truncated)
        text = text.replace("\r\n", "\n").rstrip()
        if truncated:
            text += f"\n… output truncated: {_size(self.limit)} shown of {_size(self.total)}"
        return text


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} bytes"


def _words(code: str, code_language: str) -> list[str]:
    """The words of a program that could name a file: shell words, or Python names and strings."""
    if code_language in ("python", "py"):
        words = []
        try:
            for token in tokenize.generate_tokens(io.StringIO(code).readline):
                if token.type == tokenize.NAME:
                    words.append(token.string)
                elif token.type == tokenize.STRING:
                    value = ast.literal_eval(token.string)
                    if isinstance(value, str):
                        words.append(value)
        except (tokenize.TokenError, SyntaxError, ValueError):
            pass  # the run itself will report broken code
        return words
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: fall back to plain words
        return code.split()


def _path_candidates(word: str) -> list[str]:
    if not word or word.startswith("-") or "\0" in word:
        return []
    candidates = [word]
    parts = word.split(".")
    if len(parts) > 1 and all(part.isidentifier() for part in parts):  # pkg.module
        module = "/".join(parts)
        candidates += [module, module + ".py"]
    return candidates


def _files_under(folder: Path) -> list[Path]:
    return [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts)
    ]


# ---------------------------------------------------------------- Markdown


def output_block(output: str, prefix: str = "") -> str:
    """A plain fenced block holding `output` verbatim, each line behind `prefix` (a container's
    indent or `> `). The fence is longer than any backtick run inside."""
    fence = fence_for(output)
    lines = [fence, *output.split("\n"), fence] if output else [fence, fence]
    # An empty line gets the bare prefix (`>` keeps a blockquote open) without trailing spaces.
    return "".join(f"{prefix}{line}\n" if line else prefix.rstrip() + "\n" for line in lines)


def demo_markdown(demo: Demo, result: DemoResult) -> str:
    """A demo that isn't in a Markdown source (an explain target's config): its code block,
    then its output block."""
    return f"{fenced(demo.code, demo.code_language)}\n\n{output_block(result.output)}"


def expand_demos(text: str, runner: DemoRunner | None, source_name: str) -> str:
    """Run every demo block of a Markdown document and return the document to publish: demo
    markers dropped from the info strings, each demo followed by its output block. Without a
    runner (--no-demos), nothing runs: demo blocks are published as plain code."""
    lines = text.splitlines(keepends=True)
    parser = MarkdownIt("commonmark").use(front_matter_plugin)
    insertions: dict[int, str] = {}  # line index -> output block to insert before it
    try:
        tokens = read_markdown(parser, text)
    except UnreadableMarkdown as exc:
        raise UserError(f"{source_name}: {exc}") from None
    for token in tokens:
        if token.type != "fence" or token.map is None:
            continue
        first, end = token.map
        where = f"{source_name}:{first + 1}"
        info = parse_fence_info(token.info, where)
        if not info.is_demo:
            continue
        opening = lines[first]
        prefix = opening[: opening.index(token.markup)]
        if end - 1 == first or token.markup not in lines[end - 1]:
            raise UserError(f"{where}: demo block has no closing {token.markup}; close it")
        lines[first] = f"{prefix}{token.markup}{' '.join([info.code_language, *info.rest])}\n"
        if runner is None:
            continue
        demo = Demo(token.content, info.code_language, where, info.allow_errors, info.timeout_s)
        result = runner.run(demo)
        if not lines[end - 1].endswith("\n"):
            lines[end - 1] += "\n"
        insertions[end] = prefix.rstrip() + "\n" + output_block(result.output, prefix)
    return "".join(insertions.get(index, "") + line for index, line in enumerate(lines)) + insertions.get(
        len(lines), ""
    )
