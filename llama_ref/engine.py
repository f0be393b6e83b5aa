"""The fast path: continuous batching, chunked prefill and a prefix cache over one Transformer.

`Llama.generate` keeps the upstream shape because our posts explain it: one batch in, every row fed
from the shortest prompt's end one token per step, everything out at the end. Serving many requests
wants more, as vLLM and llama.cpp's server do it:

- **Continuous batching.** Each request holds one row (a "slot") of the model's KV cache for as long
  as it runs. Rows join and leave independently; every decode step advances all running rows at
  once, each at its own position, so a short answer never waits for a long one.
- **Chunked prefill.** A prompt is fed in chunks of up to `prefill_chunk` tokens, all of its tokens
  in one forward pass per chunk, never one token per step. Between chunks the running rows take a
  decode step, so a long prompt does not stall the answers already streaming.
- **A prefix cache.** After a prompt is prefilled its keys and values are kept, keyed by its token
  ids, in a memory-bounded LRU store. A later prompt that starts with the same tokens copies that
  stretch into its row and prefills only the rest. The explainer's requests about one symbol all
  start with the same system prompt and definition, so only the first of them pays for it.
- **A shared start (the anchor).** The first job admitted while no row reads the anchor prefills its
  prompt into it, a one-row cache beside the rows. Every job admitted while it is in use reads the
  start its prompt has in common with it from there, and keeps only the rest in its own row. A decode
  step then reads that start once for all rows (cascade attention), where each row's copy cost a read
  per row, and rows can be shorter than a prompt: more of them fit in the same memory.

- **Fair rows.** Jobs name their client (a server passes the peer's address). A free row goes to the
  waiting job whose client runs the fewest rows, and while another client waits, no client keeps more
  than half the rows: one of its rows that has run PREEMPT_AFTER_STEPS steps is paused. A paused job
  keeps its tokens; its keys and values go to the prefix cache, and it resumes where it stopped, its
  prompt and answer so far read back from there. Jobs of one client (LocalBackend's) run first come,
  first served, and are never paused.

One thread steps the engine: `run(jobs)` in the caller's thread, or `serve_forever()` in a worker
thread while other threads `submit()`. Jobs report through their own queues, so readers never touch
tensors (a handler thread must not free them). A job nobody waits for any more (`cancel()`, or its
`abandoned` callback, which the engine asks before every step) leaves the queue or frees its row at
the next step.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from llama_ref.errors import LlamaRefError
from llama_ref.generation import sample_top_p
from llama_ref.model import StepPlan
from llama_ref.tokenizer import StreamDecoder

DEFAULT_PREFILL_CHUNK = 512  # long enough to keep a matmul efficient, short enough to keep streams flowing
# A 2,300-token prompt of Qwen2.5-Coder-1.5B holds 66 MB of keys and values in bf16: room for the two most
# recent, which are the ones a post's next request shares most with (the anchor holds what all share). 256 MiB
# held four, for no more reuse in the make-run job, and was a tenth of its peak RSS on the AVX2 class.
DEFAULT_PREFIX_CACHE_BYTES = 128 << 20
# A row runs at least this many steps before it can be paused for another client's job: each pause costs a
# copy of the row's keys and values, so rows must not trade places every step.
PREEMPT_AFTER_STEPS = 16
CACHE_STEP = 256  # plan() rounds a cache's length up to this, so that similar runs reuse one allocation

_END = object()


class CacheShape(NamedTuple):
    """What Engine.reserve allocates: rows, positions a job may reach, positions of a row's own cache."""

    max_batch_size: int
    max_seq_len: int
    row_len: int


class Constraint(Protocol):
    """What holds a job's answer to a shape, token by token (constrain.JsonFieldsConstraint is one). The
    engine asks allows() of each pick, allowed_ids() only when a pick is refused, and calls advance() with
    the token it chose; allows() and allowed_ids() leave the state as it is."""

    def allows(self, token: int) -> bool: ...

    def allowed_ids(self, rejected: int | None = None) -> list[int]:
        """Every token that keeps the answer on its shape; empty if the vocabulary cannot spell it."""
        ...

    def advance(self, token: int) -> None: ...


class EngineError(LlamaRefError, RuntimeError):
    """Generation failed before the job finished."""


class EngineStopped(EngineError):
    """The engine was closed (or interrupted) before the job finished."""


@dataclass(eq=False)
class Job:
    """One request: prompt and sampling in; tokens, text pieces and the ending out."""

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset[int] | None = None  # default: the tokenizer's end-of-turn tokens
    constraint: Constraint | None = field(default=None, repr=False)  # keeps the answer on a shape
    tokens: list[int] = field(default_factory=list)  # generated, without the stop token
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cached_tokens: int = 0  # prompt tokens not prefilled: their keys and values came from the prefix cache or anchor
    # Asked before every step while the job is queued or running (a server asks its client's socket);
    # True cancels the job. It runs in the engine's thread, so it must answer at once.
    abandoned: Callable[[], bool] | None = field(default=None, repr=False)
    client: object = None  # who sent it (a server: the peer's address); rows are shared fairly between clients
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _error: Exception | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)
    # a paused job's stream decoder and sampling generator, for the row it resumes in
    _paused: tuple[StreamDecoder, torch.Generator | None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Free this job's row at the engine's next step (a client went away)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """cancel() was called, or `abandoned` says nobody waits for the answer any more."""
        if not self._cancelled and self.abandoned is not None and self.abandoned():
            self._cancelled = True
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Job:
        """Block until the job has finished; raise EngineError if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self

    def pieces(self) -> Iterator[str]:
        """The answer's text as it is generated, blocking until each piece exists. Once exhausted,
        finish_reason and tokens are final. Raises EngineError if generation failed."""
        while (event := self._events.get()) is not _END:
            if isinstance(event, Exception):
                raise event
            yield event


@dataclass(eq=False)
class _Row:
    job: Job
    slot: int
    decoder: StreamDecoder  # the answer's text so far, piece by piece
    sequence: list[int] = field(default_factory=list)  # what it prefills: the prompt, and a resumed job's answer
    steps: int = 0  # decode steps since it was admitted
    filled: int = 0  # positions of this job's prompt and answer that have keys and values
    shared: int = 0  # of those, how many it reads from the anchor; its own row holds the rest, from index 0
    anchoring: bool = False  # its prompt is being prefilled into the anchor
    generator: torch.Generator | None = None
    next_token: int | None = None  # sampled, not yet fed back


class PrefixCache:
    """Keys and values of earlier prompts, keyed by token ids, least recently used out first.

    Any common prefix of a stored prompt is reusable: position i's keys and values depend only on
    tokens 0..i. So one entry per prompt serves every later prompt that shares any start with it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def longest_match(self, tokens: list[int]) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """(length, (k, v)) of the stored prompt sharing the longest start with `tokens`."""
        best, best_key = 0, None
        for key in self._entries:
            n = _common_prefix(key, tokens)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key]

    def wants(self, tokens: list[int], nbytes: int) -> bool:
        """Whether add() would keep a prompt of this many bytes: it fits, and no stored prompt covers it."""
        key = tuple(tokens)
        return nbytes <= self.max_bytes and not any(_common_prefix(stored, key) == len(key) for stored in self._entries)

    def add(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        key = tuple(tokens)
        size = k.numel() * k.element_size() * 2
        if size > self.max_bytes:
            return
        for stored in list(self._entries):
            if _common_prefix(stored, key) == len(stored):  # the new prompt extends a stored one
                self._drop(stored)
            elif _common_prefix(stored, key) == len(key):  # already covered by a longer one
                self._entries.move_to_end(stored)
                return
        self._entries[key] = (k, v)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        k, v = self._entries.pop(key)
        self._bytes -= k.numel() * k.element_size() * 2

    @property
    def nbytes(self) -> int:
        return self._bytes


NUCLEUS_CANDIDATES = 256


def sample_nucleus(probs: torch.Tensor, top_p: float, top_k: int | None, generator) -> int:
    """sample_top_p over the few most likely tokens when they already hold more than top_p of the mass.

    Sorting a 150k-token vocabulary every step cost a sixth of a decode step. The tokens past the
    most likely NUCLEUS_CANDIDATES would all be cut by top-p then, so the distribution is the same.
    """
    candidates = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    if candidates.values.sum() > top_p and (top_k is None or top_k <= NUCLEUS_CANDIDATES):
        pick = sample_top_p(candidates.values, top_p, top_k=top_k, generator=generator)
        return int(candidates.indices[0, int(pick)])
    return int(sample_top_p(probs, top_p, top_k=top_k, generator=generator))


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Continuous batching over `model` (a Transformer whose caches are set up) and `tokenizer`.

    max_batch_size and max_seq_len bound what plan() reserves (default: what the model's cache holds now)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        anchor: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size or model.max_batch_size
        self.max_seq_len = max_seq_len or model.max_seq_len
        self._anchored = anchor
        if anchor and getattr(model, "anchor_len", 0) < model.max_seq_len:
            model.setup_anchor(model.max_seq_len)
        self._anchor_tokens: list[int] = []  # the tokens whose keys and values the anchor holds
        self.device = model.device
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._slots: list[_Row | None] = [None] * model.max_batch_size
        self._waiting: deque[Job] = deque()
        self._prefilling: _Row | None = None
        self._changed = threading.Condition()
        self._closed = False
        self.stats = {
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "cancelled": 0,
            "paused": 0,
        }

    # ------------------------------------------------------------------ submitting and running

    def submit(self, job: Job) -> Job:
        """Queue a job (from any thread). Raises ValueError if it can never fit the cache."""
        if not job.prompt_tokens:
            raise ValueError("the prompt is empty; give at least one token")
        if job.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {job.max_tokens}")
        needed = len(job.prompt_tokens) + job.max_tokens
        if needed > self.model.max_seq_len:
            raise ValueError(
                f"the prompt's {len(job.prompt_tokens)} tokens + max_tokens={job.max_tokens} "
                f"exceed max_seq_len={self.model.max_seq_len}"
            )
        if job.max_tokens > self.model.row_len:  # its prompt can go into the anchor, its answer cannot
            raise ValueError(
                f"max_tokens={job.max_tokens} exceeds the {self.model.row_len} positions of a row "
                "(Engine.reserve's row_len)"
            )
        with self._changed:
            if self._closed:
                raise EngineStopped("the engine is stopping")
            self._waiting.append(job)
            self._changed.notify()
        return job

    def run(self, jobs: list[Job], on_finished: Callable[[int, Job], None] | None = None) -> list[Job]:
        """Submit `jobs` and step the engine in this thread until every one has finished, calling
        on_finished(index, job) as each one does."""
        for job in jobs:
            self.submit(job)
        pending = dict(enumerate(jobs))
        try:
            while pending:
                self.step()
                for index in [i for i, job in pending.items() if job.done]:
                    job = pending.pop(index)
                    if on_finished is not None:
                        on_finished(index, job)
        except BaseException as exc:  # Ctrl-C or a failing step: no job is left half-running
            self._fail_all(
                EngineError(f"generation failed: {exc}")
                if isinstance(exc, Exception)
                else EngineStopped("generation was interrupted")
            )
            raise
        return jobs

    def serve_forever(self) -> None:
        """The worker thread's loop: step while there is work, sleep on the condition when idle."""
        while True:
            with self._changed:
                while not self._closed and not self._has_work():
                    self._changed.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as exc:  # answer every waiting client, and keep serving
                self._fail_all(EngineError(f"generation failed: {exc}"))
        self._fail_all(EngineStopped("the engine is stopping"))

    def close(self) -> None:
        """Stop serve_forever() after its current step; unfinished jobs get an EngineError."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def plan(self, prompts: Sequence[Sequence[int]] = (), budgets: Sequence[int] = ()) -> CacheShape:
        """Reserve a KV cache that holds what these prompts and their answers' budgets need, not the largest
        thing they could, within the engine's limits; return its shape. Only while the engine is idle.

        The first prompt goes into the anchor, and each later one reads what it shares with it from there,
        so a row holds the rest of its prompt and its answer. A server, whose requests come later, plans
        with none: every row and every position of the limits."""
        if not prompts:
            shape = CacheShape(self.max_batch_size, self.max_seq_len, self.max_seq_len)
        else:

            def step(n: int) -> int:
                return min(self.max_seq_len, -(-n // CACHE_STEP) * CACHE_STEP)

            first = prompts[0]
            own = [budgets[0]] + [len(p) - _common_prefix(first, p[:-1]) + b for p, b in zip(prompts[1:], budgets[1:])]
            shape = CacheShape(
                min(self.max_batch_size, len(prompts)),
                step(max(len(p) + b for p, b in zip(prompts, budgets))),
                step(max(own)),
            )
        self.reserve(*shape)
        return shape

    def reserve(self, max_batch_size: int, max_seq_len: int, row_len: int | None = None) -> None:
        """Size the KV cache for this many rows of this many positions, reallocating it only when that
        changes; only while no job is queued or running. Callers that know their requests size the
        cache to them: memory is spent on what runs, not on the largest thing that could.

        row_len (default max_seq_len): positions of a row's own cache, past what it reads from the
        anchor. A job whose own part does not fit beside the anchor in use waits until the anchor is
        free, and then puts its own prompt there; so any job of at most max_seq_len positions whose
        max_tokens fits a row still runs."""
        model, row_len = self.model, row_len or max_seq_len
        if row_len < max_seq_len and not self._anchored:
            raise ValueError("rows shorter than max_seq_len need the anchor (Engine(anchor=True))")
        anchor_len = max_seq_len if self._anchored else 0
        if (model.max_batch_size, model.max_seq_len, model.row_len, model.anchor_len) == (
            max_batch_size,
            max_seq_len,
            row_len,
            anchor_len,
        ):
            return
        if self._has_work():
            raise EngineError("the KV cache can be resized only while the engine is idle")
        model.setup_caches(max_batch_size, max_seq_len, row_len=row_len, anchor_len=anchor_len)
        self._anchor_tokens = []
        self._slots = [None] * max_batch_size

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet running."""
        with self._changed:
            return len(self._waiting)

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(self._slots)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> None:
        """Admit a waiting job if a row is free, feed one prefill chunk, then one decode step for
        every row that is generating."""
        self._drop_cancelled()
        if self._prefilling is None:
            self._share_rows()
            self._admit()
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        decoding = [row for row in self._slots if row is not None and row.next_token is not None]
        if decoding:
            self._decode(decoding)

    def _rows_by_client(self) -> dict[object, int]:
        held: dict[object, int] = {}
        for row in self._slots:
            if row is not None:
                held[row.job.client] = held.get(row.job.client, 0) + 1
        return held

    def _next_waiting(self, held: dict[object, int]) -> Job:
        """The waiting job whose client runs the fewest rows; the first come among equals."""
        return min(self._waiting, key=lambda job: held.get(job.client, 0))

    def _share_rows(self) -> None:
        """While another client's job waits and no row is free, pause a row of a client that holds more than
        half the rows (one that has run PREEMPT_AFTER_STEPS steps), so that the job gets a row."""
        with self._changed:
            if not self._waiting or None in self._slots:
                return
            held = self._rows_by_client()
            client = self._next_waiting(held).client
        most = max(held, key=held.__getitem__)
        if most == client or held[most] <= max(1, len(self._slots) // 2):
            return
        ready = [
            row
            for row in self._slots
            if row is not None  # every slot is taken (checked above)
            and row.job.client == most
            and row.steps >= PREEMPT_AFTER_STEPS
            and row.next_token is not None
        ]
        if ready:
            self._pause(min(ready, key=lambda row: row.filled))  # the least to read back when it resumes

    def _pause(self, row: _Row) -> None:
        job = row.job
        # what its row holds: the prompt and the answer but the token sampled last, which is not fed yet
        self._remember(row, (job.prompt_tokens + job.tokens)[: row.filled])
        job._paused = (row.decoder, row.generator)
        self._release(row)
        with self._changed:
            self._waiting.appendleft(job)
        self.stats["paused"] += 1

    def _admit(self) -> None:
        with self._changed:
            if not self._waiting or None not in self._slots:
                return
            job = self._next_waiting(self._rows_by_client())
            # a resumed job prefills its answer so far too; at least the last token is fed: its logits give the next
            sequence = job.prompt_tokens + job.tokens
            head = sequence[:-1]
            anchor_in_use = any(r is not None and (r.shared or r.anchoring) for r in self._slots)
            anchoring = self._anchored and not anchor_in_use
            shared = _common_prefix(self._anchor_tokens, head) if anchor_in_use else 0
            if not anchoring and len(sequence) - shared + job.max_tokens - len(job.tokens) > self.model.row_len:
                return  # its own part does not fit a row beside this anchor: it waits until the anchor is free
            self._waiting.remove(job)
        slot = self._slots.index(None)
        row = _Row(
            job, slot, sequence=sequence, decoder=StreamDecoder(self.tokenizer), shared=shared, anchoring=anchoring
        )
        if job._paused is not None:
            row.decoder, row.generator = job._paused
            job._paused = None
        elif job.temperature > 0 and job.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(job.seed)
        if anchoring:  # keep what the anchor already holds of this prompt; the rest is written over
            shared = _common_prefix(self._anchor_tokens, head)
            del self._anchor_tokens[shared:]
        # positions past what the anchor gives come from the prefix cache where they can, into the anchor
        # or the row's own cache
        reused, stored = self.prefix_cache.longest_match(head)
        if stored is not None and reused > shared:
            k, v = stored
            own = 0 if anchoring else shared
            for layer, layer_k, layer_v in zip(self.model.layers, k, v):
                cache = layer.attention.anchor if anchoring else layer.attention.cache
                index = 0 if anchoring else slot
                cache.k[index, :, shared - own : reused - own] = layer_k[:, shared:reused]
                cache.v[index, :, shared - own : reused - own] = layer_v[:, shared:reused]
        start = max(reused, shared)
        if anchoring:
            self._anchor_tokens = sequence[:start]
        row.filled = start
        if not job.tokens:  # counted once, when it first runs, not when it resumes
            job.cached_tokens = start
            self.stats["prompt_tokens"] += len(job.prompt_tokens)
            self.stats["cached_tokens"] += start
        self._slots[slot] = row
        self._prefilling = row

    def _prefill_chunk(self, row: _Row) -> None:
        prompt = row.sequence
        end = min(row.filled + self.prefill_chunk, len(prompt))
        tokens = torch.tensor([prompt[row.filled : end]], dtype=torch.long, device=self.device)
        last = end == len(prompt)
        if row.anchoring:
            logits = self.model.forward(
                tokens, row.filled, StepPlan(rows=slice(0, 1), into_anchor=True, last_only=True)
            )
            self._anchor_tokens = prompt[:end]
        else:
            logits = self.model.forward(
                tokens, row.filled, StepPlan(rows=slice(row.slot, row.slot + 1), shared=row.shared, last_only=True)
            )
        row.filled = end
        if not last:
            return
        self._prefilling = None
        if row.anchoring:  # its whole prompt is the anchor now; its own row starts with the answer
            row.anchoring, row.shared = False, end
        if len(row.sequence) == len(row.job.prompt_tokens):  # a resumed job's prompt was kept when it first ran
            self._remember(row, row.job.prompt_tokens)
        self._accept(row, self._sample([row], logits[:, -1])[0])

    def _remember(self, row: _Row, tokens: list[int]) -> None:
        """Keep the keys and values of `tokens`, the start of what the row holds, in the prefix cache."""
        shared = min(row.shared, len(tokens))  # what it reads from the anchor, then from its own row
        attentions = list(self.model.attentions())
        first = attentions[0].cache
        assert first is not None
        _, heads, _, head_dim = first.k.shape
        shape = (len(attentions), heads, len(tokens), head_dim)
        if not self.prefix_cache.wants(tokens, 2 * first.k.element_size() * math.prod(shape)):
            return  # copied for nothing: a stored prompt covers it, or it would not fit
        # one copy, straight into the stored tensors: no per-layer concatenation, then a stack of those
        k = torch.empty(shape, dtype=first.k.dtype, device=first.k.device)
        v = torch.empty_like(k)
        for layer, attention in enumerate(attentions):
            cache, anchor = attention.cache, attention.anchor
            assert cache is not None
            for stored, name in ((k, "k"), (v, "v")):
                if shared:
                    assert anchor is not None
                    stored[layer, :, :shared] = getattr(anchor, name)[0, :, :shared]
                stored[layer, :, shared:] = getattr(cache, name)[row.slot, :, : len(tokens) - shared]
        self.prefix_cache.add(tokens, k, v)

    def _decode(self, rows: list[_Row]) -> None:
        # One forward pass over slots 0..highest running; free or still-prefilling slots in between
        # ride along at a harmless position (their own next write position, rewritten before it is read).
        width = max(row.slot for row in rows) + 1
        # (A row prefilling into the anchor has nothing in its own row yet: it rides at index 0.)
        tokens = torch.zeros((width, 1), dtype=torch.long, device=self.device)
        positions, shared = [0] * width, [0] * width
        for slot in range(width):
            other = self._slots[slot]
            if other is not None and not other.anchoring:
                positions[slot], shared[slot] = other.filled, other.shared
        for row in rows:
            assert row.next_token is not None  # step() decodes only rows with a token to feed
            tokens[row.slot, 0] = row.next_token
        shared_tensor = torch.tensor(shared, device=self.device) if self._anchored else None
        plan = StepPlan(rows=slice(0, width), shared=shared_tensor)
        logits = self.model.forward(tokens, torch.tensor(positions, device=self.device), plan)[:, -1]
        self.stats["decode_steps"] += 1
        for row in rows:
            row.filled += 1
            row.steps += 1
        chosen = self._sample(rows, logits[[row.slot for row in rows]])
        for row, token in zip(rows, chosen):
            self._accept(row, token)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        greedy = torch.argmax(logits, dim=-1).tolist()
        chosen = []
        for i, row in enumerate(rows):
            pick = greedy[i] if row.job.temperature <= 0 else self._draw(row, logits[i : i + 1])
            constraint = row.job.constraint
            # Lazy: the pick is checked first, and only a pick off the answer's shape pays for the allowed set.
            if constraint is not None and not constraint.allows(pick):
                ids = constraint.allowed_ids(rejected=pick)
                if not ids:  # a vocabulary that cannot spell the shape: the caller's checks judge the answer
                    row.job.constraint = None
                    chosen.append(pick)
                    continue
                allowed = torch.tensor(ids, dtype=torch.long, device=logits.device)
                masked = torch.full_like(logits[i : i + 1], float("-inf"))
                masked[0, allowed] = logits[i, allowed]
                pick = int(masked.argmax()) if row.job.temperature <= 0 else self._draw(row, masked)
            chosen.append(pick)
        return chosen

    def _draw(self, row: _Row, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits / row.job.temperature, dim=-1)
        return sample_nucleus(probs, row.job.top_p, row.job.top_k, row.generator)

    def _accept(self, row: _Row, token: int) -> None:
        """Record a sampled token: end the row on a stop token or its limit, else feed it next step."""
        job = row.job
        if job.constraint is not None:
            job.constraint.advance(token)
        stop_ids = job.stop_ids if job.stop_ids is not None else self.tokenizer.stop_ids
        if token in stop_ids:
            return self._finish(row, "stop")
        job.tokens.append(token)
        self.stats["generated_tokens"] += 1
        if text := row.decoder.push(token):
            job._events.put(text)
        if len(job.tokens) >= job.max_tokens:
            return self._finish(row, "length")
        row.next_token = token

    def _finish(self, row: _Row, reason: str) -> None:
        job = row.job
        if tail := row.decoder.flush():
            job._events.put(tail)
        job.finish_reason = reason
        self._release(row)
        job._events.put(_END)
        job._done.set()

    def _release(self, row: _Row) -> None:
        """Free the row's slot, and move the highest occupied slot down into it: decode steps run over
        slots 0..highest, so a hole would cost a whole row of work on every step until it is filled."""
        if self._prefilling is row:
            self._prefilling = None
        freed = row.slot
        self._slots[freed] = None
        highest = max((r.slot for r in self._slots if r is not None), default=-1)
        if highest > freed:
            moved = self._slots[highest]
            assert moved is not None  # highest is an occupied slot
            own = 0 if moved.anchoring else moved.filled - moved.shared
            for layer in self.model.layers:
                cache = layer.attention.cache
                cache.k[freed, :, :own] = cache.k[highest, :, :own]
                cache.v[freed, :, :own] = cache.v[highest, :, :own]
            moved.slot = freed
            self._slots[freed], self._slots[highest] = moved, None

    def _drop_cancelled(self) -> None:
        with self._changed:
            waiting = list(self._waiting)
        # asked outside the lock: `abandoned` may make a system call, and submit() must not wait on it
        cancelled = [job for job in waiting if job.cancelled]
        with self._changed:  # only this thread takes jobs out of the queue, so they are all still there
            for job in cancelled:
                self._waiting.remove(job)
        for job in cancelled:
            job.finish_reason = "cancelled"
            job._events.put(_END)
            job._done.set()
        for row in list(self._slots):  # finishing a row moves another into its slot
            if row is not None and row.job.cancelled:
                self._finish(row, "cancelled")
                cancelled.append(row.job)
        self.stats["cancelled"] += len(cancelled)

    def _fail_all(self, error: EngineError) -> None:
        with self._changed:
            waiting, self._waiting = list(self._waiting), deque()
        rows = [row for row in self._slots if row is not None]
        for row in rows:
            self._release(row)
        for job in waiting + [row.job for row in rows]:
            job._error = error
            job._events.put(error)
            job._done.set()
