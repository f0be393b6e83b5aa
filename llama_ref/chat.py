"""Chat templates: the checkpoint's own jinja2 template (or a fallback), rendered in a bounded sandbox.

A chat template is code that arrives inside a model file (GGUF tokenizer.chat_template, or
tokenizer_config.json / chat_template.jinja beside HF weights). jinja2's ImmutableSandboxedEnvironment
keeps it away from Python internals and from mutating the dialog; render_chat adds what the sandbox
lacks: a deadline and a size limit, checked as it runs, and a child process to run it in whose memory
is capped, so a broken or hostile template fails with one line instead of hanging a server or filling
its memory. The environment follows transformers' apply_chat_template
(trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception, strftime_now), because the
templates shipped with models are written and tested against it.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from jinja2 import TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

if TYPE_CHECKING or __name__ != "__main__":  # mypy checks the module as the package imports it
    from llama_ref.errors import LlamaRefError
else:  # the sandbox's child process runs this file alone (-I): no package to import

    class LlamaRefError(Exception):
        pass


# Fallback chat templates, used when a checkpoint carries none; jinja2 like the HF/GGUF ones.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A prompt this long is already far past any context window llama_ref runs, so nothing legitimate is cut.
MAX_PROMPT_CHARS = 4 * 1024 * 1024
# What a render may add to its child process's memory: a prompt of MAX_PROMPT_CHARS fits with room to spare.
MAX_RENDER_MEMORY = 64 << 20
_OUT_OF_MEMORY = (
    f"chat template: rendering needed more than its memory limit of {MAX_RENDER_MEMORY >> 20} MiB; "
    "the template or the dialog is too large"
)
# Real templates render in well under a millisecond; this only ends runaway ones.
MAX_RENDER_SECONDS = 2.0
# Where chat_tokens hides special tokens' names inside messages: Unicode's private use area B, which text
# has no use for (a message holding these very characters gets them back as the names, still as text).
_HIDDEN_BASE = 0x100000

Dialog = list[dict]


class ChatTemplateError(LlamaRefError, ValueError):
    """A chat template that cannot be compiled or rendered. str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def fallback_template(tokenizer) -> str:
    """The template matching the turn markers the vocabulary has, for checkpoints that carry none."""
    if "<|im_start|>" in tokenizer.special_ids:
        return CHATML_TEMPLATE
    if "<|start_header_id|>" in tokenizer.special_ids:
        return LLAMA3_TEMPLATE
    return LLAMA2_TEMPLATE


def render_chat(
    template: str,
    tokenizer,
    dialog: Dialog,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    *,
    max_chars: int = MAX_PROMPT_CHARS,
    max_seconds: float = MAX_RENDER_SECONDS,
) -> str:
    """The prompt text for `dialog` (a list of {"role", "content"} messages), with tools as JSON schemas.

    The template runs in a child process whose memory is capped (see "The child process" below).
    Raises ChatTemplateError when the template does not compile, raises, breaks the sandbox's rules,
    produces more than max_chars characters, runs longer than max_seconds or needs more than
    MAX_RENDER_MEMORY bytes.
    """
    request = {
        "template": template,
        "messages": dialog,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": _token_text(tokenizer, tokenizer.bos_id),
        "eos_token": _token_text(tokenizer, tokenizer.eos_id),
        "max_chars": max_chars,
        "max_seconds": max_seconds,
    }
    return _render_in_child(request)


def _render_here(request: dict) -> str:
    """render_chat's work, in this process: the child's half."""
    compiled = _compile(request["template"])
    max_chars, max_seconds = request["max_chars"], request["max_seconds"]
    budget = _LIMITS.set(_Limits(time.monotonic() + max_seconds, max_seconds, max_chars))
    try:
        chunks = compiled.generate(
            messages=request["messages"],
            tools=request["tools"],
            add_generation_prompt=request["add_generation_prompt"],
            bos_token=request["bos_token"],
            eos_token=request["eos_token"],
        )
        return "".join(_within_size(chunks, max_chars))
    except ChatTemplateError:
        raise
    except MemoryError:
        raise ChatTemplateError(_OUT_OF_MEMORY) from None
    except Exception as e:  # jinja2's SecurityError, UndefinedError, ... and Python's ('a' + 1, 1 / 0): the template's
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from e
    finally:
        _LIMITS.reset(budget)


def chat_tokens(
    template: str,
    tokenizer,
    dialog: Dialog,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    **limits,
) -> list[int]:
    """The prompt's tokens for `dialog`: control tokens only where the template's own markup writes them.

    Encoding the rendered text whole would turn a special token's name inside a message
    ("x<|im_end|>\n<|im_start|>system") into that control token, and forge a turn. So each message's
    content goes into the template with every special token's name hidden behind a private-use
    character, and comes out encoded as text (Tokenizer.encode_text). `limits`: render_chat's."""
    names = sorted(tokenizer.special_ids)
    hidden = {name: chr(_HIDDEN_BASE + index) for index, name in enumerate(names)}
    pattern = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True)))) if names else None

    def hide(message):
        content = message.get("content") if isinstance(message, dict) else None
        if pattern is None or not isinstance(content, str):
            return message
        return {**message, "content": pattern.sub(lambda match: hidden[match.group()], content)}

    text = render_chat(
        template, tokenizer, [hide(message) for message in dialog], add_generation_prompt, tools, **limits
    )
    shown = str.maketrans({char: name for name, char in hidden.items()})
    ids: list[int] = []
    for piece, special_id in tokenizer.split_specials(text):
        ids += [special_id] if piece is None else tokenizer.encode_text(piece.translate(shown))
    return ids


def _token_text(tokenizer, token_id: int) -> str:
    # Control tokens decode to nothing, so their text comes from the special-token table; a template
    # that writes {{ bos_token }} must produce the marker that encode() turns back into bos_id.
    for text, special_id in tokenizer.special_ids.items():
        if special_id == token_id:
            return text
    if 0 <= token_id < len(tokenizer.token_bytes):
        return tokenizer.token_bytes[token_id].decode(errors="replace")
    return ""


def _within_size(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_chars:
            raise ChatTemplateError(
                f"chat template: the prompt grew past {max_chars} characters; the template or the dialog is too large"
            )
        if chunk:  # a loop writing '' must not fill memory with empty pieces until the deadline
            yield chunk


# ---------------------------------------------------------------------------- the bounded sandbox
#
# Why these hooks: jinja2 compiles a template to a Python generator, which nothing can interrupt from
# outside short of a separate process (a thread cannot be stopped). So the checks run inside the
# template's own steps, at the points every long-running template must pass through:
# - every call (functions, methods, macros, range(), recursive loop()) goes through Environment.call,
#   and every filter and test, which compiled templates call directly, through a wrapper that does
#   the same checks;
# - every for-loop step, because a nested loop with an empty body makes no call and no output; a
#   code generator wraps each loop's iterable in `checked_steps`;
# - every chunk of output, counted against max_chars;
# - values that can grow from one step to the next (call arguments and results, namespace attributes,
#   the results of `*` and `**`), so that doubling a string in a loop stops at the limit, and
#   `'x' * 10**10` is refused before it is allocated; so is a call with a number past the limit
#   (`'x'.ljust(10**10)`, `center(10**10)`, `tojson(indent=10**10)`: widths and counts).
# Attribute and item access need no check of their own: nothing repeats them but loops and calls.
# The deadline and limit of the render in progress live in a ContextVar, so one compiled template is
# shared by every render, including concurrent ones.


@dataclass(frozen=True)
class _Limits:
    deadline: float
    seconds: float
    max_chars: int

    def check_time(self):
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(
                f"chat template: rendering ran past its time limit of {self.seconds:g} s; the template loops too long"
            )

    def check_size(self, size: int):
        if size > self.max_chars:
            raise ChatTemplateError(
                f"chat template: built a value of size {size}, over the limit "
                f"of {self.max_chars}; the template or the dialog is too large"
            )

    def checked_call(self, function, /, *args, **kwargs):  # positional-only: a template may pass function=
        """function(*args, **kwargs), within the deadline, its arguments and its result within the size limit."""
        self.check_time()
        for value in (*args, *kwargs.values()):
            self.check_size(_size(value))
            if isinstance(value, int) and abs(value) > self.max_chars:  # a width or a count: ljust(10**10)
                raise ChatTemplateError(
                    f"chat template: a call with the number {value}, over the size limit "
                    f"of {self.max_chars}; the template asks for too much"
                )
        result = function(*args, **kwargs)
        self.check_size(_size(result))
        return result


_LIMITS: ContextVar[_Limits] = ContextVar("chat_template_limits")


class _CheckedLoops(CodeGenerator):
    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("checked_steps"), [node.iter], [], None, None)
        super().visit_For(node, frame)


class _BoundedNamespace(Namespace):
    def __setitem__(self, name, value):
        _LIMITS.get().check_size(_size(value))
        super().__setitem__(name, value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedLoops
    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        return _LIMITS.get().checked_call(super().call, __context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        limits = _LIMITS.get()
        limits.check_time()
        limits.check_size(_result_size(operator, left, right))
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def checked_steps(iterable):
        limits = _LIMITS.get()
        for item in iterable:
            limits.check_time()
            yield item


def _size(value) -> int:
    # ints count by bits: a huge integer costs memory and time like a huge string
    if isinstance(value, int):
        return value.bit_length()
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _result_size(operator: str, left, right) -> int:
    """The size _size would find in `left <operator> right` (or more), known before computing it."""
    if isinstance(left, int) and isinstance(right, int):
        return max(right, 0) * _size(left) if operator == "**" else _size(left) + _size(right)
    if operator == "*" and isinstance(right, int):
        return _size(left) * max(right, 0)  # "ab" * 3, [x] * 3
    if operator == "*" and isinstance(left, int):
        return _size(right) * max(left, 0)
    return 0  # floats and other types: Python raises or the result stays small


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML and sorts keys; templates expect transformers'
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(format):
    # Llama 3.x templates write today's date into the system prompt
    return datetime.now().strftime(format)


def _bounded(function):
    """`function` called through _Limits.checked_call; functools.wraps keeps jinja2's pass_context marks."""

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        return _LIMITS.get().checked_call(function, *args, **kwargs)

    return bounded


@lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded(function) for name, function in env.filters.items()})
    env.tests.update({name: _bounded(function) for name, function in env.tests.items()})
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_BoundedNamespace)
    return env


@lru_cache(maxsize=32)
def _compile(template: str):
    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from e


# ---------------------------------------------------------------------------- the child process
#
# Sizes are checked at calls, steps and outputs, but one step can build a huge value before any check
# sees it: a format width ('{:>1500000000}'.format('a')), `%` ('%300000000d' % 1), `~` over big strings,
# replace('', big), join, a list's str(); Python builds each in a single C call. Predicting every such
# result's size is a list that is never complete. So templates render in a child process that caps its own
# address space at what it has plus MAX_RENDER_MEMORY: such a step fails there with MemoryError, and the
# server's memory never sees it. The child also makes the deadline hard: one that overruns it is killed.
# Children are kept for the next render (starting one costs more than a render), at most MAX_CHILDREN, one
# render each at a time, unless their render failed: a template stopped at its deadline or memory limit may
# leave the child's heap grown, with too little of its limit left for the next dialog, so the next render
# starts afresh. They talk over their stdin and stdout, a JSON message framed by its length each way, run in
# a session of their own (Ctrl-C is the parent's to handle) and exit when their stdin closes.

MAX_CHILDREN = 4
_START_SECONDS = 30.0  # a loaded machine can take seconds to start an interpreter and import jinja2
_GRACE_SECONDS = 1.0  # past its own deadline, how long a child has to answer before it is killed
_READY = b"ready\n"
_children: list[_Child] = []  # idle ones
_children_lock = threading.Lock()
_child_slots = threading.BoundedSemaphore(MAX_CHILDREN)


class _Child:
    def __init__(self):
        failed = ChatTemplateError(
            f"chat template: its sandbox process did not start; check that {sys.executable} runs and imports jinja2"
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            raise failed from None
        try:
            ready = self._receive(len(_READY), time.monotonic() + _START_SECONDS)
        except (TimeoutError, EOFError, OSError):
            ready = b""
        except BaseException:
            self.close()
            raise
        if ready != _READY:
            self.close()
            raise failed

    def render(self, request: dict) -> dict:
        try:
            data = _encoded(request)
        except (TypeError, ValueError) as e:
            raise ChatTemplateError(f"chat template: the dialog must hold only JSON values ({e})") from None
        self.process.stdin.write(len(data).to_bytes(8, "little") + data)
        self.process.stdin.flush()
        deadline = time.monotonic() + request["max_seconds"] + _GRACE_SECONDS
        size = int.from_bytes(self._receive(8, deadline), "little")
        return _decoded(self._receive(size, deadline))

    def _receive(self, count: int, deadline: float) -> bytes:
        stdout, data = self.process.stdout.fileno(), b""
        while len(data) < count:
            ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(stdout, count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        try:
            self.process.stdin.close()
        except OSError:  # a request left in the pipe's buffer of a child that is gone: nothing to flush it to
            pass
        self.process.stdout.close()


def _idle_child() -> _Child | None:
    """A kept child that is still running, if any; those that died while idle are closed."""
    with _children_lock:
        while _children:
            child = _children.pop()
            if child.process.poll() is None:
                return child
            child.close()
    return None


def _render_in_child(request: dict) -> str:
    with _child_slots:
        child = _idle_child() or _Child()
        try:
            reply = child.render(request)
        except TimeoutError:
            child.close()
            raise ChatTemplateError(
                f"chat template: rendering ran past its time limit of {request['max_seconds']:g} "
                "s; the template loops too long"
            ) from None
        except (EOFError, OSError, ValueError):
            child.close()
            raise ChatTemplateError(
                f"chat template: its sandbox process ended while rendering (exit code "
                f"{child.process.returncode}); the template or the dialog may need more than "
                f"its memory limit of {MAX_RENDER_MEMORY >> 20} MiB"
            ) from None
        except BaseException:  # Ctrl-C: the child may be mid-render
            child.close()
            raise
        if "error" in reply:  # it may have spent its memory (a loop stopped at the deadline) or ended: not kept
            child.close()
        else:
            with _children_lock:
                _children.append(child)
    if "error" in reply:
        raise ChatTemplateError(reply["error"])
    return reply["text"]


@atexit.register
def close_children() -> None:
    """End the idle child processes (at exit; a later render starts new ones)."""
    with _children_lock:
        idle, _children[:] = list(_children), []
    for child in idle:
        child.close()


def _serve_renders() -> None:
    """The child's loop: cap this process's memory, then answer render requests until stdin closes."""
    _cap_address_space(MAX_RENDER_MEMORY)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(_READY)
    replies.flush()
    while len(header := requests.read(8)) == 8:
        try:
            request = _decoded(requests.read(int.from_bytes(header, "little")))
        except MemoryError:  # a request too large to read: answer, and end, since the stream is out of step
            request = None
        try:
            reply = {"text": _render_here(request)} if request is not None else {"error": _OUT_OF_MEMORY}
        except ChatTemplateError as e:
            reply = {"error": str(e)}
        data = _encoded(reply)
        replies.write(len(data).to_bytes(8, "little") + data)
        replies.flush()
        if request is None:
            return


def _encoded(message: dict) -> bytes:
    # UTF-8, not \u escapes (a CJK character would take 6 bytes, not 3); surrogatepass: text may hold lone halves
    return json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _decoded(data: bytes) -> dict:
    return json.loads(data.decode("utf-8", "surrogatepass"))


def _cap_address_space(extra: int) -> None:
    """Let this process's address space grow by `extra` bytes at most (Linux: /proc tells its size now;
    elsewhere there is no cap, and the size checks and the deadline still hold)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + extra
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    except (ImportError, OSError, ValueError):
        pass


if __name__ == "__main__":
    _serve_renders()
