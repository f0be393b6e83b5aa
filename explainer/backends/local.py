"""The local model: our own llama_ref runs a catalog model (default Qwen2.5-Coder-1.5B-Instruct) or any
checkpoint it reads, on this machine.

Requests go to llama_ref's Engine: continuous batching, chunked prefill and a prefix cache. A post's
chunk requests all start with the same system prompt and definition, so the engine prefills that
once and every later request reuses its keys and values. torch is imported only when the model is
built.

A request that names its answer's shape (Request.json_answer, as the translator's do) is decoded under
that constraint: the model cannot drop a marker, add one, or leave the JSON object.

Small models sometimes fall into a loop, repeating one sentence until max_tokens. Such an answer has
said all it will say: it is stopped as soon as its tail repeats itself exactly, or at max_tokens, and
kept up to the end of the first copy of the repeated text (a shaped answer that loops is unusable).
Any other answer cut off at max_tokens is an UnusableAnswer, as with the openai backend.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from explainer.backends import Completion, Request, UnusableAnswer
from explainer.errors import UserError
from explainer.markdown_segments import UnreadableMarkdown, parser, read_markdown

DEFAULT_MAX_SEQ_LEN = 4096  # prompt + answer per row; our prompts need far less than the models' trained context
# Rows the engine runs at once. The KV cache grows with it: 8 x 4096 positions of Qwen2.5-Coder-1.5B in
# bf16 is 0.9 GiB. More rows add little on a CPU of few cores, where prefill, not decode, bounds a post.
DEFAULT_MAX_BATCH_SIZE = 8
# The model is built with a cache this small; each complete() sizes it to its requests (Engine.plan).
BUILD_SEQ_LEN = 256
# A stretch this long said twice is a loop (about eight English words); shorter ones may be meant.
LOOP_CHARS = 40
# While generating, an answer whose last LOOP_TAIL_CHARS characters are one unit of at most LOOP_PERIOD
# characters said over and over is stopped at once (checked every LOOP_CHECK_TOKENS tokens): it has said
# all it will, and running on to max_tokens would cost minutes. Prose never repeats itself so exactly.
LOOP_TAIL_CHARS = 240
LOOP_PERIOD = 120
LOOP_CHECK_TOKENS = 16
LOOP_TAIL_TOKENS = 400  # enough tokens for the tail and one period, in any script
SENTENCE_ENDS = (".", "!", "?", "\n", "。", "！", "？")

log = logging.getLogger(__name__)


class LocalBackend:
    """Backend over llama_ref. `model` is a catalog name (default: the catalog's default model) or a
    checkpoint path. The model is built on the first complete(), so a run answered entirely from
    the cache never loads it."""

    name = "local"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        kernels: str = "auto",
    ):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        from llama_ref.catalog import CATALOG, DEFAULT_MODEL

        self._spec = DEFAULT_MODEL if model is None else model
        # what posts and messages call it: a catalog name, or a checkpoint's file name
        self.model = self._spec if self._spec in CATALOG else Path(self._spec).name
        self.device, self.dtype = device, dtype
        self.kernels = kernels  # which kernels run the layers: they change the numbers, so the answers too
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._llama = None
        self._engine = None

    @functools.cached_property
    def cache_identity(self) -> str:
        """What the answers depend on besides the request (explainer.cache keys by it): the model's content
        (llama_ref.identity: the catalog's sha256, or a file's size, header and tensor index; never its
        name, so another file called model.gguf is another model), the dtype and the kernels."""
        from llama_ref.identity import model_identity

        try:
            content = model_identity(self._spec)
        except OSError as exc:
            raise UserError(f"cannot read the model {self._spec}: {exc.strerror or exc}; check the path") from None
        kernels = self.kernels
        if kernels == "auto":  # the table's row for this CPU (llama_ref.kernels), named without importing torch
            from llama_ref.kernels import cpu_class, read_cpu

            kernels = f"auto:{cpu_class(read_cpu())}"
        return f"{content} dtype={self.dtype or 'auto'} kernels={kernels}"

    def prompt_tokens(self, request: Request) -> list[int]:
        """The request's tokens in the model's chat format. The messages hold an explained file's text,
        which may spell a special token's name: it stays text, never a control token (chat_tokens)."""
        from llama_ref.chat import chat_tokens
        from llama_ref.errors import LlamaRefError

        llama = self.llama
        try:
            return chat_tokens(llama.chat_template, llama.tokenizer, list(request.messages))
        except LlamaRefError as exc:  # the checkpoint's own chat template: a broken or hostile model file
            raise UserError(f"{self.model}: {exc}; use another checkpoint or fix its chat template") from None

    def complete(
        self, requests: list[Request], on_done: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """Answer every request, in order. Each answer reaches on_done as soon as it is finished. An
        answer cut off (at max_tokens, or where max_seq_len ends), or a prompt that fills max_seq_len,
        raises UnusableAnswer after every other answer has reached on_done."""
        if not requests:
            return []
        from llama_ref.engine import Job

        prompts = [self.prompt_tokens(r) for r in requests]
        # A prompt that fills the context gets no answer; the others still run. max_tokens fits what the
        # context leaves after the prompt: an answer that needs more is cut off there.
        too_long = [i for i, p in enumerate(prompts) if len(p) >= self.max_seq_len]
        runs = [i for i in range(len(requests)) if i not in too_long]
        budgets = {i: min(requests[i].max_tokens, self.max_seq_len - len(prompts[i])) for i in runs}
        jobs = [
            Job(
                prompts[i],
                budgets[i],
                temperature=requests[i].temperature,
                top_p=requests[i].top_p,
                seed=requests[i].seed,
                constraint=self._constraint(requests[i], budgets[i]),
            )
            for i in runs
        ]
        looping: set[int] = set()
        for job in jobs:
            job.abandoned = self._loop_watch(job, looping)
        results: list[Completion | None] = [None] * len(requests)
        cut_off, loops, repeating = [], [], []  # repeating: shaped answers stopped in a loop (unusable)

        def finished(k: int, job) -> None:
            index = runs[k]
            text = self.llama.tokenizer.decode(job.tokens)
            if job.constraint is not None and job.constraint.forced:
                cut_off.append(index)  # closed only because the budget ran out: cut off, however well-formed
                return
            if job.finish_reason == "length" or id(job) in looping:
                # a shaped answer cut short is broken, whatever it repeated
                text = before_loop(text) if requests[index].json_answer is None else None
                if text is None:
                    (repeating if id(job) in looping else cut_off).append(index)
                    return
                loops.append(index)
            results[index] = Completion(
                text=text, finish_reason="stop", tokens_in=len(job.prompt_tokens), tokens_out=len(job.tokens)
            )
            if on_done is not None:
                on_done(index, results[index])

        if jobs:
            self.engine.plan([prompts[i] for i in runs], [budgets[i] for i in runs])
            self.engine.run(jobs, on_finished=finished)
        if loops:
            log.warning(
                "the model kept repeating itself in %d of %d answers; each was kept up to the first repeat",
                len(loops),
                len(requests),
            )
        reasons: dict[int, str] = {}
        for i in too_long:
            reasons[i] = (
                f"{self.model}: request {i + 1} of {len(requests)} has {len(prompts[i])} prompt tokens, "
                f"which leaves no room for an answer in max_seq_len={self.max_seq_len}; "
                "send less text per request"
            )
        for i in cut_off:
            limit = (
                f"max_tokens={requests[i].max_tokens}"
                if budgets[i] == requests[i].max_tokens
                else f"{budgets[i]} tokens, all that max_seq_len={self.max_seq_len} left after the prompt"
            )
            reasons[i] = (
                f"{self.model}: the answer to request {i + 1} of {len(requests)} was cut off at {limit} "
                "(finish_reason=length); allow more tokens or send less per request"
            )
        for i in repeating:
            reasons[i] = (
                f"{self.model}: the answer to request {i + 1} of {len(requests)} kept repeating itself "
                "and was stopped; try another model or ask again"
            )
        if reasons:
            first = min(too_long or cut_off or repeating)
            others = f" (and {len(reasons) - 1} other request(s) of this call)" if len(reasons) > 1 else ""
            raise UnusableAnswer(reasons[first] + others, reasons)
        return results

    def _loop_watch(self, job, looping: set[int]) -> Callable[[], bool]:
        """The job's `abandoned` check: True (and its id in `looping`) once its answer has become a loop."""
        decode = self.llama.tokenizer.decode

        def looping_now() -> bool:
            count = len(job.tokens)
            if count == 0 or count % LOOP_CHECK_TOKENS or not repeats_itself(decode(job.tokens[-LOOP_TAIL_TOKENS:])):
                return False
            looping.add(id(job))
            return True

        return looping_now

    def _constraint(self, request: Request, max_tokens: int):
        """Constrained decoding for an answer of a known shape: every token the model picks keeps it on
        the shape (llama_ref.constrain), so a JSON answer cannot lose a marker or its closing brace."""
        if request.json_answer is None:
            return None
        from llama_ref.constrain import JsonFieldsConstraint

        return JsonFieldsConstraint(
            request.json_answer, self.llama.tokenizer, self.llama.model.params.vocab_size, max_tokens
        )

    @property
    def llama(self):
        """The llama_ref.Llama, built on first use."""
        if self._llama is None:
            from llama_ref.errors import LlamaRefError
            from llama_ref.loading import load_llama  # torch is imported here, not before

            try:
                self._llama = load_llama(
                    self._spec,
                    max_seq_len=BUILD_SEQ_LEN,
                    max_batch_size=1,
                    device=self.device,
                    dtype=self.dtype,
                    kernels=self.kernels,
                )
            except LlamaRefError as exc:
                raise UserError(str(exc)) from None
        return self._llama

    @property
    def engine(self):
        """The llama_ref Engine over the model, shared by every complete()."""
        if self._engine is None:
            from llama_ref.engine import Engine

            self._engine = Engine(
                self.llama.model, self.llama.tokenizer, max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len
            )
        return self._engine


def from_settings(settings) -> LocalBackend:
    """The registry's factory (explainer.backends.BACKENDS)."""
    return LocalBackend(settings.model, max_batch_size=settings.batch_size or DEFAULT_MAX_BATCH_SIZE)


def repeats_itself(text: str) -> bool:
    """Whether `text` ends in a loop: its last LOOP_TAIL_CHARS characters (whitespace runs as one space)
    are one unit of at most LOOP_PERIOD characters, repeated."""
    flat = " ".join(text.split())
    if len(flat) <= LOOP_TAIL_CHARS:
        return False
    tail = flat[-LOOP_TAIL_CHARS:]
    return any(
        flat[-LOOP_TAIL_CHARS - period : -period] == tail
        for period in range(1, min(LOOP_PERIOD, len(flat) - LOOP_TAIL_CHARS) + 1)
    )


def before_loop(text: str) -> str | None:
    """If `text` repeats itself (a stretch of LOOP_CHARS characters, whitespace aside, comes back
    later), the text before the repeat begins, up to its last sentence end; else None. Characters,
    not words, so that Chinese and Japanese answers are judged alike."""
    flat, origin = [], []  # whitespace runs as one space; origin[k]: where flat[k] is in text
    for position, char in enumerate(text):
        if char.isspace():
            if flat and flat[-1] == " ":
                continue
            char = " "
        flat.append(char)
        origin.append(position)
    flat = "".join(flat)
    first_seen: dict[str, int] = {}
    for start in range(len(flat) - LOOP_CHARS + 1):
        stretch = flat[start : start + LOOP_CHARS]
        if stretch in first_seen:
            repeat = origin[start]
            # The repeat may begin with the first copy's last character (". The" after "Intro.")
            sentence_end = max(text.rfind(mark, 0, repeat + 1) for mark in SENTENCE_ENDS)
            return _without_empty_last_item(text[: sentence_end + 1 if sentence_end >= 0 else repeat].rstrip()) or None
        first_seen.setdefault(stretch, start)
    return None


def _without_empty_last_item(text: str) -> str:
    """`text` without a list item left empty at its end: the "." of "5." reads as a sentence end, so a cut
    before a loop may end on the marker of an item the model had not written yet."""
    try:
        tokens = read_markdown(parser(), text)
    except UnreadableMarkdown:
        return text
    lines = text.split("\n")
    for opening, closing in zip(tokens[-3::-1], tokens[-2::-1]):
        if opening.type == "list_item_open" and opening.map is not None and opening.map[1] >= len(lines):
            if closing.type == "list_item_close":
                return "\n".join(lines[: opening.map[0]]).rstrip()
            break
    return text
