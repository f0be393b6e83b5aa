"""Llama and generate(): text from any checkpoint llama_ref reads (loading.py builds the model).

`Llama.generate` keeps the public shape of Meta's reference (facebookresearch/llama,
llama/generation.py) because it is the function our posts walk through. What changes is what made
the reference hard to run: every tensor lives on the model's device (never a hard-coded "cuda"),
nothing needs torch.distributed or NCCL, memory is checked before it is allocated (loading.py), and logprobs
are computed after the sampled token is written (so generated tokens get real values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple  # generate() keeps the upstream signature, as Meta wrote it

import torch
import torch.nn.functional as F

from llama_ref import chat
from llama_ref.catalog import default_model_path
from llama_ref.chat import Dialog
from llama_ref.loading import load_model
from llama_ref.model import LAST_ONLY, Transformer


class Llama:
    @staticmethod
    def build(
        model_path: str | Path | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        kernels: str = "auto",
        compile: bool = False,
    ) -> Llama:
        """Load any supported checkpoint (format detected from the path; default: the catalog's default
        model) onto one device, with a KV cache for max_batch_size rows of max_seq_len positions.
        kernels: how layers multiply (llama_ref.kernels): "auto" picks by this machine's capabilities,
        "float" keeps every weight in the dtype, "int8-weights" halves or quarters their memory anywhere.
        compile: decode steps through torch.compile (Transformer.compile_steps), for long generations."""
        model, tokenizer, chat_template, layer_plan = load_model(
            model_path or default_model_path(), max_seq_len, max_batch_size, device, dtype, kernels
        )
        if compile:
            model.compile_steps()
        return Llama(model, tokenizer, chat_template, layer_plan)

    def __init__(self, model: Transformer, tokenizer, chat_template: str | None = None, plan=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.chat_template = chat_template or chat.fallback_template(tokenizer)
        self.plan = plan  # which kernel each kind of layer got (kernels.Plan), where build() chose

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        stop_tokens: Optional[List[int]] = None,
        on_token: Optional[Callable[[int, int], None]] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to max_gen_len tokens, all prompts in one batch.

        Returns the new tokens of each prompt (the prompt too with echo) cut at the first stop token,
        and, with logprobs, each returned token's log-probability. The keyword-only extras are
        ours: top_k, a per-call seed, stop tokens (default: the tokenizer's end-of-turn set) and
        on_token(row, token), called as each token is produced, for streaming.
        """
        params = self.model  # its KV cache holds max_batch_size rows of max_seq_len positions
        bsz = len(prompt_tokens)
        if bsz > params.max_batch_size:
            raise ValueError(f"{bsz} prompts exceed max_batch_size={params.max_batch_size}; build with a larger batch")

        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        if min_prompt_len == 0 or max_prompt_len > params.max_seq_len:
            raise ValueError(
                f"prompt lengths must be 1..{params.max_seq_len} tokens (max_seq_len); "
                f"got {min_prompt_len}..{max_prompt_len}"
            )
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        device = self.device
        pad_id = self.tokenizer.pad_id
        stop = torch.tensor(sorted(stop_tokens or self.tokenizer.stop_ids), dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        if logprobs:
            token_logprobs = torch.zeros_like(tokens, dtype=torch.float)

        prev_pos = 0
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
        input_text_mask = tokens != pad_id
        if min_prompt_len == total_len and logprobs:
            # nothing to generate: score the prompts in one pass
            logits = self.model.forward(tokens, prev_pos)
            token_logprobs[:, 1:] = -F.cross_entropy(
                input=logits[:, :-1].transpose(1, 2), target=tokens[:, 1:], reduction="none", ignore_index=pad_id
            )
        for cur_pos in range(min_prompt_len, total_len):
            # Without logprobs only the last position's logits are needed: prefill skips the rest.
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, None if logprobs else LAST_ONLY)
            if temperature > 0:
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p, top_k=top_k, generator=generator)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)

            next_token = next_token.reshape(-1)
            # only replace token if prompt has already been generated
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                # after writing next_token, so that generated positions are scored too
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    input=logits.transpose(1, 2),
                    target=tokens[:, prev_pos + 1 : cur_pos + 1],
                    reduction="none",
                    ignore_index=pad_id,
                )
            generated = ~input_text_mask[:, cur_pos]
            if on_token is not None:
                for row in (generated & ~eos_reached).nonzero().flatten().tolist():
                    on_token(row, int(next_token[row]))
            eos_reached |= generated & torch.isin(next_token, stop)
            prev_pos = cur_pos
            if eos_reached.all():
                break

        logprob_rows: list[list[float]] = token_logprobs.tolist() if logprobs else []
        out_tokens: list[list[int]] = []
        out_logprobs: list[list[float]] = []
        stop_set = set(stop.tolist())
        for i, toks in enumerate(tokens.tolist()):
            # cut to max gen len
            start = 0 if echo else len(prompt_tokens[i])
            toks = toks[start : len(prompt_tokens[i]) + max_gen_len]
            row_logprobs = logprob_rows[i][start : len(prompt_tokens[i]) + max_gen_len] if logprobs else None
            # cut to the first stop token produced by the model (a stop token inside an echoed prompt stays)
            first_new = len(prompt_tokens[i]) - start
            for stop_idx in range(first_new, len(toks)):
                if toks[stop_idx] in stop_set:
                    toks = toks[:stop_idx]
                    row_logprobs = row_logprobs[:stop_idx] if row_logprobs is not None else None
                    break
            out_tokens.append(toks)
            if row_logprobs is not None:
                out_logprobs.append(row_logprobs)
        return (out_tokens, out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        **extras,
    ) -> list[dict]:
        """Complete plain-text prompts; extras (top_k, seed, stop_tokens, on_token) go to generate()."""
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        return self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo, extras, as_message=False)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        **extras,
    ) -> list[dict]:
        """Answer each dialog (a list of {"role", "content"} messages) with the checkpoint's own chat template."""
        prompt_tokens = [self.tokenizer.encode(self.render_chat(dialog), bos=False, eos=False) for dialog in dialogs]
        return self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, False, extras, as_message=True)

    def render_chat(self, dialog: Dialog, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text for `dialog` in this checkpoint's chat format; raises chat.ChatTemplateError."""
        return chat.render_chat(self.chat_template, self.tokenizer, dialog, add_generation_prompt, tools)

    def _complete(self, prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo, extras, as_message):
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        results = []
        for start in range(0, len(prompt_tokens), self.model.max_batch_size):
            batch = prompt_tokens[start : start + self.model.max_batch_size]
            tokens, probs = self.generate(batch, max_gen_len, temperature, top_p, logprobs, echo, **extras)
            for i, toks in enumerate(tokens):
                new_tokens = len(toks) - (len(batch[i]) if echo else 0)
                # a stop token ends a turn; running out of room (max_gen_len or max_seq_len) doesn't
                room = min(max_gen_len, self.model.max_seq_len - len(batch[i]))
                text = self.tokenizer.decode(toks)
                result = {
                    "generation": {"role": "assistant", "content": text} if as_message else text,
                    "finish_reason": "length" if new_tokens >= room else "stop",
                    "prompt_tokens": len(batch[i]),
                    "completion_tokens": new_tokens,
                }
                if logprobs:
                    result["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                    result["logprobs"] = probs[i]
                results.append(result)
        return results


def sample_top_p(
    probs: torch.Tensor, p: float, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probabilities add up to p (and, optionally, at most top_k)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    if top_k is not None:
        probs_sort[:, top_k:] = 0.0
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)
