"""How much would drafting from the prompt (prompt-lookup speculative decoding) save on the explain job?

Speculative decoding lets one forward pass accept several tokens when a cheap draft guesses them right.
Prompt lookup drafts by finding the last n generated tokens earlier in the prompt or the answer and
proposing what followed there; explanations quote the code they explain, so it looked promising for
the whole job (issue 9). This measures the upper bound without running a model: it replays the real
answers of `make run`'s job (`explainer explain llama_ref/generation.py --symbol Llama.generate`, read
from the answer cache) and counts the verify steps greedy drafting would take, if every step cost what
a one-token step costs. Real steps cost more: each verifies 1 + k tokens per row.

    make run                                      # fills the cache with the job's answers
    .venv/bin/python benchmarks/prompt_lookup.py  # [--cache-dir DIR] [--model NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB_FILE, JOB_SYMBOL = "llama_ref/generation.py", "Llama.generate"


def draft(sequence: list[int], k: int, longest_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, for
    the longest n (up to longest_ngram) that occurs earlier at all."""
    for n in range(min(longest_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start : start + n] == tail:
                return sequence[start + n : start + n + k]
    return []


def verify_steps(prompt: list[int], answer: list[int], k: int, longest_ngram: int = 3) -> int:
    """Forward passes a greedy speculative decoder needs to produce `answer` after `prompt`: each accepts
    the draft's longest prefix that matches, plus the model's own next token."""
    sequence, produced, steps = list(prompt), 0, 0
    while produced < len(answer):
        guess = draft(sequence, k, longest_ngram)
        accepted = 0
        while (
            accepted < len(guess)
            and produced + accepted < len(answer)
            and guess[accepted] == answer[produced + accepted]
        ):
            accepted += 1
        gained = min(accepted + 1, len(answer) - produced)
        sequence += answer[produced : produced + gained]
        produced += gained
        steps += 1
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="the answer cache `make run` used (default: explainer's default)")
    parser.add_argument("--model", default=None, help="the local model's catalog name (default: the default model)")
    args = parser.parse_args()

    from explainer.backends import Request
    from explainer.cache import Cache, key_for
    from explainer.chunking import chunk_file
    from explainer.explain import chunk_request, overview_request
    from explainer.languages import language
    from llama_ref import chat
    from llama_ref.catalog import DEFAULT_MODEL, resolve_model
    from llama_ref.checkpoints import open_checkpoint

    name = args.model or DEFAULT_MODEL
    checkpoint = open_checkpoint(resolve_model(name))
    tokenizer = checkpoint.tokenizer
    backend = argparse.Namespace(name="local", model=name)  # what a cache key holds of the local backend
    english = language("en")
    chunked = chunk_file(ROOT / JOB_FILE, symbol=JOB_SYMBOL, display_path=JOB_FILE)
    requests = [overview_request(chunked, JOB_SYMBOL, english, Request.max_tokens)]
    requests += [chunk_request(chunked, i, english, Request.max_tokens) for i in range(len(chunked.chunks))]
    cache = Cache(args.cache_dir)
    pairs = []
    for request in requests:
        completion = cache.get(key_for(backend, request))
        if completion is not None:
            text = chat.render_chat(checkpoint.chat_template, tokenizer, list(request.messages), True, None)
            pairs.append(
                (tokenizer.encode(text, bos=False, eos=False), tokenizer.encode(completion.text, bos=False, eos=False))
            )
    if not pairs:
        print(f"no cached answers of the job for {name} in {cache.path}: run `make run` first", file=sys.stderr)
        return 1
    tokens = sum(len(answer) for _, answer in pairs)
    print(f"{len(pairs)} of the job's {len(requests)} answers ({name}), {tokens} tokens")
    print("| draft length k | steps | tokens per step |\n|---:|---:|---:|")
    for k in (1, 2, 4, 8):
        steps = sum(verify_steps(prompt, answer, k) for prompt, answer in pairs)
        print(f"| {k} | {steps} | {tokens / steps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
