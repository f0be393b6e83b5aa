"""The whole job, side by side: llama_ref against llama.cpp (and transformers), in one run.

    python benchmarks/bench_job.py [--models qwen2.5-coder-1.5b,smollm2-135m] [--device cpu|cuda]
                                   [--dtype auto|fp32|bf16] [--threads N] [--run-c BINARY] [--quick]

What is measured, each engine in a subprocess of its own so that each peak RSS is that engine's alone:

1. The job: the requests of `explainer explain llama_ref/generation.py --symbol Llama.generate`, built as
   the CLI builds them and rendered with our Llama's chat template, greedy, max_tokens 512. llama_ref
   runs them all through its Engine (continuous batching, prefix cache); llama-cpp-python runs them one
   after another on the same GGUF and the same token ids, reusing the prefix each prompt shares with the
   one before, as llama.cpp's server does. Beside the job: single-stream prefill (one ~1,000-token
   prompt, no cache) and decode (128 tokens), the same prompts for every engine.
2. `explainer serve`: 16 concurrent openai-SDK clients against the same 16 requests one at a time.
3. llama2.c's stories15M shape (random weights) against run.c: quoted figures from the issue's host, or, with
   --run-c BINARY (llama2.c's run.c, built by you; it is not part of this project), run.c measured in the run.

The job runs once per CPU class (--cpu-classes): this CPU's own, and AVX2, the class of most laptops, forced
with LLAMA_REF_CPU=avx2 on a more capable CPU (llama_ref.kernels). The AVX2 run compares against llama.cpp
built for AVX2 only (--llama-cpp-avx2 DIR: `make bench` builds it there); each row names the features it ran
with. The serve and llama2.c sections run in this CPU's own class.

Results: a Markdown table on stdout and in benchmarks/results/bench_job.md, everything in bench_job.json.
--quick measures smollm2-135m only (what benchmarks/gpu.sh runs where there is no CUDA).

Measure on an otherwise idle machine. With as many threads as cores, a thread that loses its core to
another process stalls every operation until it gets it back: on 2 busy cores, 2 threads decoded about
80x slower than 1, in PyTorch and llama.cpp alike. On a shared machine, pass --threads 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from explainer.fileio import write_atomic

ROOT = Path(__file__).resolve().parent.parent

RESULTS = Path(__file__).parent / "results"
MODELS = ("qwen2.5-coder-1.5b", "smollm2-135m")
QUICK_MODELS = ("smollm2-135m",)

JOB_FILE, JOB_SYMBOL, JOB_MAX_TOKENS = "llama_ref/generation.py", "Llama.generate", 512
LLAMA_CPP_CTX, LLAMA_CPP_BATCH = 4096, 512  # n_ctx as our local backend's max_seq_len; n_batch: llama.cpp's default
PREFILL_TOKENS = 1000
DECODE_TOKENS = 128  # decode steps timed after the first new token
DECODE_QUESTION = "Write a short story about a robot who learns to paint."

SERVE_MAX_TOKENS = 64
# one question, and one client, per topic: 16 clients for a server of 8 rows
SERVE_TOPICS = (
    "a KV cache",
    "rotary position embeddings",
    "RMSNorm",
    "grouped-query attention",
    "top-p sampling",
    "a tokenizer",
    "SwiGLU",
    "greedy decoding",
    "continuous batching",
    "prefix caching",
    "a causal mask",
    "the softmax temperature",
    "bf16",
    "weight quantization",
    "a chat template",
    "beam search",
)

# stories15M.bin's shape (llama2.c README): dim 288, 6 layers, 6 heads (6 KV heads), vocab 32000, seq_len 256
STORIES15M = {
    "dim": 288,
    "hidden_dim": 768,
    "n_layers": 6,
    "n_heads": 6,
    "n_kv_heads": 6,
    "vocab_size": 32000,
    "seq_len": 256,
}
# run.c's "achieved tok/s" for stories15M on this project's 2-core development machine, by thread count.
# Not measured here: the figures are quoted from the issue that asked for this benchmark.
RUN_C_TOK_S = {2: 760.0, 1: 465.0}

# ours / llama.cpp (serve: concurrent / sequential), and the side of the target that passes
TARGETS = {
    "job_wall": ("<=", 0.5),
    "prefill": (">=", 1.0),
    "decode": (">=", 0.5),
    "rss": ("<=", 1.5),
    "serve": (">=", 4.0),
    "llama2c": (">=", 1.0),
}


# ---------------------------------------------------------------------------------------------------- the job


def job_requests():
    """The requests `explainer explain llama_ref/generation.py --symbol Llama.generate` sends, greedy."""
    from dataclasses import replace

    from explainer.chunking import chunk_file
    from explainer.explain import chunk_request, overview_request
    from explainer.languages import language

    english = language("en")
    chunked = chunk_file(ROOT / JOB_FILE, symbol=JOB_SYMBOL, display_path=JOB_FILE)
    requests = [overview_request(chunked, JOB_SYMBOL, english, JOB_MAX_TOKENS)]  # first, as explain sends it
    requests += [chunk_request(chunked, index, english, JOB_MAX_TOKENS) for index in range(len(chunked.chunks))]
    # greedy, so that both engines have one right answer to produce
    return [replace(request, temperature=0.0) for request in requests]


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_llama_ref(args) -> dict:
    """The job through LocalBackend.complete, as `explainer explain --backend local` sends it (without the
    answer cache), then single-stream prefill and decode. Writes the prompts' token ids to args.prompts for
    the other engines."""
    import torch

    from explainer.backends import UnusableAnswer
    from explainer.backends.local import LocalBackend
    from llama_ref.engine import Engine, Job

    torch.set_num_threads(args.threads)
    backend = LocalBackend(args.model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    llama, engine = backend.llama, backend.engine
    load_s = time.perf_counter() - started
    sync = torch.cuda.synchronize if llama.device.type == "cuda" else (lambda: None)

    requests = job_requests()
    prompts = [backend.prompt_tokens(request) for request in requests]
    longest = max(prompts, key=len)
    prefill_ids = (longest * (PREFILL_TOKENS // len(longest) + 1))[:PREFILL_TOKENS]
    decode_ids = llama.tokenizer.encode(
        llama.render_chat([{"role": "user", "content": DECODE_QUESTION}]), bos=False, eos=False
    )
    Path(args.prompts).write_text(
        json.dumps(
            {"job": prompts, "prefill": prefill_ids, "decode": decode_ids, "stop_ids": sorted(llama.tokenizer.stop_ids)}
        )
    )

    # Single-stream runs use an engine of their own without a prefix cache or anchor (each prompt is prefilled
    # whole), over the same model, so the job's engine starts with an empty cache.
    bare = Engine(llama.model, llama.tokenizer, prefix_cache_bytes=0, anchor=False)
    bare.reserve(1, max(len(prefill_ids) + 1, len(decode_ids) + DECODE_TOKENS + 1))

    def timed(jobs) -> float:
        sync()
        began = time.perf_counter()
        bare.run(jobs)
        sync()
        return time.perf_counter() - began

    timed([Job(decode_ids[:8], 4)])  # warm-up: first-call allocations and kernel selection
    prefill_s = min(timed([Job(prefill_ids, 1)]) for _ in range(2))
    decode_s = min(
        timed([Job(decode_ids, DECODE_TOKENS + 1, stop_ids=frozenset())])
        - timed([Job(decode_ids, 1, stop_ids=frozenset())])
        for _ in range(2)
    )

    answers = []
    sync()
    began = time.perf_counter()
    try:
        backend.complete(requests, on_done=lambda _index, answer: answers.append(answer))
    except UnusableAnswer:  # answers cut off at max_tokens: counted below, as for llama.cpp
        pass
    sync()
    wall_s = time.perf_counter() - began
    stats = dict(engine.stats)
    # unusable (not answered) or kept only up to a loop: both ran to max_tokens
    ran_out = len(requests) - len(answers) + sum(a.tokens_out >= JOB_MAX_TOKENS for a in answers)
    return {
        "load_s": load_s,
        "wall_s": wall_s,
        "requests": len(requests),
        "tokens_in": stats["prompt_tokens"],
        "tokens_out": stats["generated_tokens"],
        "cut_off": ran_out,
        "cached_tokens": stats["cached_tokens"],
        "engine_stats": stats,
        "prefill_tok_s": len(prefill_ids) / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "device": str(llama.device),
        "dtype": str(llama.model.dtype).replace("torch.", ""),
        "max_batch_size": llama.model.max_batch_size,
        "cpu_class": llama.plan.cpu,
        "features": llama.plan.features,
        "kernels": {role: choice.kernel for role, choice in llama.plan.choices.items()},
    }


def child_llama_cpp(args) -> dict:
    """The same job one request at a time through llama-cpp-python, then the same single-stream runs."""
    import llama_cpp

    if args.device != "cpu" and not llama_cpp.llama_supports_gpu_offload():
        return {"skipped": f"this llama-cpp-python is a CPU build; not comparable on {args.device}"}
    prompts = json.loads(Path(args.prompts).read_text())
    stop_ids = set(prompts["stop_ids"])
    started = time.perf_counter()
    # n_threads_batch too: it defaults to every core, not to n_threads, and prompts are fed in batches
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=LLAMA_CPP_CTX,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=LLAMA_CPP_BATCH,
        n_gpu_layers=0 if args.device == "cpu" else -1,
        verbose=False,
    )
    load_s = time.perf_counter() - started

    def complete(ids, max_tokens, stop=stop_ids, fresh=False) -> tuple[list[int], list[float]]:
        """Greedy tokens and the time each arrived. Unless fresh, llama.cpp keeps the KV of the prefix
        `ids` shares with what it evaluated last (Llama.generate's reset=True does that), as its server does."""
        if fresh:
            llm.reset()
        tokens, marks = [], []
        for token in llm.generate(ids, temp=0.0, reset=True):
            marks.append(time.perf_counter())
            if token in stop:
                break
            tokens.append(token)
            if len(tokens) >= max_tokens:
                break
        return tokens, marks

    complete(prompts["decode"][:8], 4, fresh=True)  # warm-up, as for llama_ref

    def prefill_seconds() -> float:
        began = time.perf_counter()
        _, marks = complete(prompts["prefill"], 1, stop=set(), fresh=True)
        return marks[0] - began

    def decode_seconds() -> float:
        _, marks = complete(prompts["decode"], DECODE_TOKENS + 1, stop=set(), fresh=True)
        return marks[-1] - marks[0]

    prefill_s = min(prefill_seconds() for _ in range(2))
    decode_s = min(decode_seconds() for _ in range(2))

    llm.reset()
    cached, tokens_out, cut_off = 0, 0, 0
    began = time.perf_counter()
    for ids in prompts["job"]:
        # what generate() will reuse: the evaluated tokens this prompt starts with (it re-feeds at least one)
        cached += min(common_prefix(llm._input_ids.tolist(), ids), len(ids) - 1)
        tokens, _ = complete(ids, JOB_MAX_TOKENS)
        tokens_out += len(tokens)
        cut_off += len(tokens) >= JOB_MAX_TOKENS
    wall_s = time.perf_counter() - began
    return {
        "load_s": load_s,
        "wall_s": wall_s,
        "requests": len(prompts["job"]),
        "tokens_in": sum(len(p) for p in prompts["job"]),
        "tokens_out": tokens_out,
        "cut_off": cut_off,
        "cached_tokens": cached,
        "prefill_tok_s": len(prompts["prefill"]) / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "version": llama_cpp.__version__,
        "build": os.environ.get("LLAMA_CPP_BUILD", "native"),
    }


def child_transformers(args) -> dict:
    """Single-stream prefill and decode with transformers' generate on the same GGUF (a static KV cache on
    CUDA, where it avoids reallocating every step)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    from llama_ref.device import pick_device, pick_dtype

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    prompts = json.loads(Path(args.prompts).read_text())
    path = Path(args.model)
    started = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    hf = hf.to(device).eval()
    load_s = time.perf_counter() - started
    static = {"cache_implementation": "static"} if device.type == "cuda" else {}

    def generate(ids, count) -> float:
        tensor = torch.tensor([ids], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=0,
                **static,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    generate(prompts["decode"][:8], 4)  # warm-up
    prefill_s = min(generate(prompts["prefill"], 1) for _ in range(2))
    decode_s = min(generate(prompts["decode"], DECODE_TOKENS + 1) - generate(prompts["decode"], 1) for _ in range(2))
    return {
        "load_s": load_s,
        "prefill_tok_s": len(prompts["prefill"]) / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "cache": "static" if static else "dynamic",
        "dtype": str(dtype).replace("torch.", ""),
        "version": transformers.__version__,
    }


# ------------------------------------------------------------------------------------------ explainer serve


def child_serve(args) -> dict:
    """requests/s and tokens/s of `explainer serve` for 16 requests sent one at a time, then all at once."""
    import openai
    import torch

    from llama_ref.engine import PrefixCache
    from llama_ref.serve import open_server

    torch.set_num_threads(args.threads)
    # as many rows as clients (`explainer serve --max-batch-size 16`): the default 8 would make the
    # concurrent phase two waves
    server = open_server(args.model, "127.0.0.1", 0, dtype=args.dtype, max_batch_size=len(SERVE_TOPICS))

    class QuietHandler(server.RequestHandlerClass):
        def log_message(self, *_args) -> None:  # 33 access-log lines would bury the benchmark's progress
            pass

    server.RequestHandlerClass = QuietHandler
    listener = threading.Thread(target=server.serve_forever)
    listener.start()
    questions = [f"In two sentences, what is {topic} in a language model?" for topic in SERVE_TOPICS]

    def ask(question: str) -> int:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=3600)
        answer = client.chat.completions.create(
            model=server.model_name,
            max_tokens=SERVE_MAX_TOKENS,
            temperature=0,
            messages=[{"role": "user", "content": question}],
        )
        return answer.usage.completion_tokens

    def forget_prompts() -> None:
        # Each phase starts with an empty prefix cache, so that neither reuses the other's prompts.
        server.engine.prefix_cache = PrefixCache(server.engine.prefix_cache.max_bytes)

    def phase(concurrent: bool) -> dict:
        forget_prompts()
        counts = [0] * len(questions)

        def client(index: int) -> None:
            counts[index] = ask(questions[index])

        began = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for i in range(len(questions)):
                client(i)
        wall_s = time.perf_counter() - began
        return {
            "wall_s": wall_s,
            "requests": len(questions),
            "tokens_out": sum(counts),
            "requests_per_s": len(questions) / wall_s,
            "tokens_per_s": sum(counts) / wall_s,
        }

    try:
        ask("Say hello.")  # warm-up
        sequential, concurrent = phase(False), phase(True)
    finally:
        server.shutdown()
        listener.join()
        server.server_close()
    return {
        "sequential": sequential,
        "concurrent": concurrent,
        "clients": len(questions),
        "max_batch_size": server.llama.model.max_batch_size,
    }


# ------------------------------------------------------------------------------------ llama2.c's stories15M


def write_stories15m_shape(folder: Path) -> Path:
    """A llama2.c version-0 checkpoint (export.py's legacy_export layout) with stories15M's shape and random
    weights, and a tokenizer.bin beside it. Speed depends on the shape alone; no download needed."""
    import numpy as np

    s = STORIES15M
    dim, hidden, layers, vocab, seq_len = s["dim"], s["hidden_dim"], s["n_layers"], s["vocab_size"], s["seq_len"]
    head_dim = dim // s["n_heads"]
    kv_dim = s["n_kv_heads"] * head_dim
    rng = np.random.default_rng(0)
    path = folder / "stories15M-shape.bin"
    with path.open("wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, s["n_heads"], s["n_kv_heads"], vocab, seq_len))
        # file order: embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, rope tables;
        # a positive vocab_size means the classifier shares the embedding
        shapes = [
            (vocab, dim),
            (layers, dim),
            (layers, dim, dim),
            (layers, kv_dim, dim),
            (layers, kv_dim, dim),
            (layers, dim, dim),
            (layers, dim),
            (layers, hidden, dim),
            (layers, dim, hidden),
            (layers, hidden, dim),
            (dim,),
            (seq_len, head_dim // 2),
            (seq_len, head_dim // 2),
        ]
        for shape in shapes:
            f.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("<f4").tobytes())
    # tokenizer.bin: <unk>, <s>, </s> as llama2.c's export writes them, the 256 byte pieces, then filler pieces
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [f"t{i}".encode() for i in range(len(pieces), vocab)]
    with (folder / "tokenizer.bin").open("wb") as f:
        f.write(struct.pack("<I", max(map(len, pieces))))
        for i, piece in enumerate(pieces):
            f.write(struct.pack("<fI", -float(i), len(piece)) + piece)
    return path


def child_llama2c(args) -> dict:
    """Decode tok/s on the stories15M shape on the CPU, as `python -m llama_ref --dtype D [--compile]` runs it."""
    import torch

    from llama_ref import Llama
    from llama_ref.__main__ import timed_generation

    torch.set_num_threads(args.threads)
    seq_len = STORIES15M["seq_len"]
    llama = Llama.build(
        args.model, max_seq_len=seq_len, max_batch_size=1, device="cpu", dtype=args.dtype, compile=args.compile
    )
    bos = [llama.tokenizer.bos_id]  # run.c's empty prompt: BOS only
    no_stop = [-1]  # random weights could emit </s> at any step; run.c's loop runs the full count too
    started = time.perf_counter()
    timed_generation(llama, bos, 16, temperature=0, stop_tokens=no_stop)  # warm-up (and compiling, with --compile)
    warmup_s = time.perf_counter() - started
    best = 0.0
    for _ in range(3):  # the best of 3, as measure_run_c takes run.c's
        _, _, decode_s, steps = timed_generation(llama, bos, seq_len - 1, temperature=0, stop_tokens=no_stop)
        best = max(best, steps / decode_s)
    return {
        "decode_tok_s": best,
        "threads": args.threads,
        "tokens": seq_len - 1,
        "warmup_s": warmup_s,
        "dtype": str(llama.model.dtype).replace("torch.", ""),
        "compiled": llama.model.compiled_step is not None,
    }  # False where compiling failed


CHILDREN = {
    "llama_ref": child_llama_ref,
    "llama.cpp": child_llama_cpp,
    "transformers": child_transformers,
    "serve": child_serve,
    "llama2c": child_llama2c,
}


def run_child(
    kind: str,
    model: str,
    args,
    prompts: Path | None = None,
    threads: int | None = None,
    dtype: str | None = None,
    compile: bool = False,
    env: dict | None = None,
) -> dict:
    """One measurement in a fresh interpreter: its JSON is the last line of its stdout; stderr passes through.
    env: variables for it (a forced CPU class, the llama.cpp build to import)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        str(model),
        "--device",
        args.device,
        "--dtype",
        dtype or args.dtype,
        "--threads",
        str(threads or args.threads),
    ]
    if compile:
        command.append("--compile")
    if prompts is not None:
        command += ["--prompts", str(prompts)]
    print(f"bench: {kind} on {Path(model).name}{' ' + str(env) if env else ''} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        if proc.returncode == 3:  # the child's "not installed" exit
            return json.loads(lines[-1])
        return {"skipped": f"failed (exit {proc.returncode}; its error is above)"}
    result = json.loads(lines[-1])
    print(f"bench: {kind} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def child_main(args) -> int:
    try:
        result = CHILDREN[args.child](args)
    except ImportError as exc:
        if exc.name not in ("llama_cpp", "transformers", "openai"):
            raise
        print(json.dumps({"skipped": f"{exc.name} is not installed"}))
        return 3
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: the cloud hosts
    behind one model name differ (AMD EPYC family 25 is Zen 3 or 4, family 26 Zen 5), and so does their speed."""
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.machine()
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def calibrate(threads: int) -> dict:
    """What this machine does right now, on the two operations an engine's speed hangs on: bf16 matmul
    GFLOPS (512 rows, compute-bound, as prefill) and the rate at which one row's multiplication reads bf16
    weights (memory-bound, as a decode step). Two runs on different days compare through these."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dim, hidden, layers = 1536, 8960, 16  # Qwen2.5-1.5B's feed-forward shape; 16 layers are more than caches hold
    weights = [torch.randn(hidden, dim, dtype=torch.bfloat16) for _ in range(layers)]

    def best_of(fn, runs: int) -> float:
        fn()
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return min(times)

    rows = torch.randn(512, dim, dtype=torch.bfloat16)
    matmul_s = best_of(lambda: F.linear(rows, weights[0]), 10)
    one_row = torch.randn(1, dim, dtype=torch.bfloat16)
    read_s = best_of(lambda: [F.linear(one_row, w) for w in weights], 5)
    return {
        "bf16_gflops": round(2 * 512 * dim * hidden / matmul_s / 1e9),
        "bf16_read_gb_s": round(layers * hidden * dim * 2 / read_s / 1e9, 1),
    }


def machine(args, dtype: str, load_before: float, calibration: dict) -> dict:
    import torch

    cpu = cpu_name()
    described = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": dtype,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        **calibration,
    }
    if args.device.startswith("cuda"):
        described["gpu"] = torch.cuda.get_device_name(0)
    described["code"] = code_version()
    return described


def code_version() -> str:
    """The commit measured, marked "+changes" when llama_ref/ or explainer/ differ from it."""

    def git(*command) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" +changes" if git("status", "--porcelain", "llama_ref", "explainer") else "")


def ratio(ours, theirs) -> float | None:
    return ours / theirs if ours and theirs else None


def verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    side, bound = TARGETS[name]
    met = value <= bound if side == "<=" else value >= bound
    return f"{value:.2f}x ({side} {bound:g}x: {'met' if met else 'NOT met'})"


def cell(row: dict, key: str, digits: int = 1) -> str:
    if "skipped" in row:
        return "-"
    value = row.get(key)
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_table(name: str, rows: dict) -> tuple[str, dict]:
    ours, cpp, hf = rows["llama_ref"], rows["llama.cpp"], rows["transformers"]
    both = "skipped" not in ours and "skipped" not in cpp
    ratios = {
        "job_wall": ratio(ours.get("wall_s"), cpp.get("wall_s")) if both else None,
        "prefill": ratio(ours.get("prefill_tok_s"), cpp.get("prefill_tok_s")) if both else None,
        "decode": ratio(ours.get("decode_tok_s"), cpp.get("decode_tok_s")) if both else None,
        "rss": ratio(ours.get("peak_rss_mib"), cpp.get("peak_rss_mib")) if both else None,
    }
    head = (
        f"| measure | llama_ref ({ours.get('dtype', '?')}) | llama.cpp | transformers ({hf.get('dtype', '-')}) "
        "| llama_ref / llama.cpp |"
    )
    title = f"### {name}"
    if "cpu_class" in ours:
        title += (
            f", CPU class {ours['cpu_class']} ({ours['features']}); llama_ref's layers: "
            + ", ".join(f"{role} {kernel}" for role, kernel in ours["kernels"].items())
            + f"; llama.cpp build: {cpp.get('build', '?')}"
        )
    lines = [title, "", head, "|---|---:|---:|---:|---|"]

    def row(label, key, digits=1, target=None, hf_key=None):
        lines.append(
            f"| {label} | {cell(ours, key, digits)} | {cell(cpp, key, digits)} | "
            f"{cell(hf, hf_key, digits) if hf_key else ''} | {verdict(target, ratios[target]) if target else ''} |"
        )

    row(f"whole job: wall s ({ours.get('requests', '?')} requests)", "wall_s", target="job_wall")
    row("whole job: prompt tokens", "tokens_in", 0)
    row("whole job: prompt tokens reused from cache", "cached_tokens", 0)
    row("whole job: tokens out", "tokens_out", 0)
    row("whole job: answers that ran to max_tokens", "cut_off", 0)
    row("load s", "load_s", 1, hf_key="load_s")
    row(
        f"prefill tok/s ({PREFILL_TOKENS}-token prompt, no cache)",
        "prefill_tok_s",
        target="prefill",
        hf_key="prefill_tok_s",
    )
    row(f"decode tok/s ({DECODE_TOKENS} tokens, one stream)", "decode_tok_s", target="decode", hf_key="decode_tok_s")
    row("peak RSS MiB (the whole child process)", "peak_rss_mib", 0, target="rss", hf_key="peak_rss_mib")
    for label, result in (("llama.cpp", cpp), ("transformers", hf)):
        if "skipped" in result:
            lines.append(f"\n{label}: {result['skipped']}.")
    return "\n".join(lines), ratios


def class_runs(args) -> list[tuple[str, dict, dict]]:
    """(class, llama_ref's environment, llama.cpp's environment) for each class the job runs in."""
    from llama_ref.kernels import FORCED_ISA, X86_CLASSES, cpu_class, read_cpu

    native = cpu_class(read_cpu())
    avx2_cpp = (
        {
            "PYTHONPATH": args.llama_cpp_avx2,
            "LLAMA_CPP_BUILD": "AVX2 only (GGML_NATIVE=OFF, AVX2/FMA/F16C on, AVX-512 off)",
        }
        if args.llama_cpp_avx2
        else {}
    )
    runs = []
    for wanted in args.cpu_classes.split(","):
        name = native if wanted == "native" else wanted
        if name in (run[0] for run in runs):
            continue
        order = list(X86_CLASSES)
        if name != native and not (name in order and native in order and order.index(name) < order.index(native)):
            print(f"bench: skipping class {name}: not below this CPU's own ({native})", file=sys.stderr)
            continue
        # the dispatchers' own variables too: a child may import torch before llama_ref could set them
        env = {"LLAMA_REF_CPU": name, **FORCED_ISA[name]} if name != native else {}
        runs.append((name, env, avx2_cpp if name == "avx2" else {}))
    return runs


def classes_table(classes: dict, ratios: dict) -> str:
    """One row per CPU class and model: the ratios each target is judged on."""
    lines = [
        "### Per CPU class (llama_ref / llama.cpp, in the same run)",
        "",
        "| CPU class | features | model | llama.cpp build | whole job | prefill | decode | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cpu_class, models in classes.items():
        for name, rows in models.items():
            ours, r = rows["llama_ref"], ratios[cpu_class][name]
            lines.append(
                f"| {cpu_class} | {ours.get('features', '?')} | {name} | {rows['llama.cpp'].get('build', '-')} | "
                f"{verdict('job_wall', r['job_wall'])} | {verdict('prefill', r['prefill'])} | "
                f"{verdict('decode', r['decode'])} | {verdict('rss', r['rss'])} |"
            )
    return "\n".join(lines)


def serve_table(serve: dict) -> tuple[str, dict]:
    lines = [
        f"### explainer serve: {len(SERVE_TOPICS)} chat requests (max_tokens {SERVE_MAX_TOKENS}, temperature 0; "
        f"the server started with --max-batch-size {len(SERVE_TOPICS)})",
        "",
        "| model | one at a time: req/s | tok/s | all at once: req/s | tok/s | concurrent / sequential |",
        "|---|---:|---:|---:|---:|---|",
    ]
    ratios = {}
    for name, result in serve.items():
        if "skipped" in result:
            lines.append(f"| {name} | {result['skipped']} | | | | |")
            continue
        seq, con = result["sequential"], result["concurrent"]
        ratios[name] = ratio(con["requests_per_s"], seq["requests_per_s"])
        lines.append(
            f"| {name} | {seq['requests_per_s']:.2f} | {seq['tokens_per_s']:.1f} | "
            f"{con['requests_per_s']:.2f} | {con['tokens_per_s']:.1f} | {verdict('serve', ratios[name])} |"
        )
    return "\n".join(lines), ratios


def measure_run_c(binary: str, checkpoint: Path, threads: int) -> dict:
    """run.c's "achieved tok/s" on the same checkpoint, greedy, with OMP_NUM_THREADS=threads: the best of 3.
    run.c is llama2.c's (MIT) and not part of this project; pass a binary you built (--run-c)."""
    best = None
    for _ in range(3):
        try:
            done = subprocess.run(
                [
                    binary,
                    str(checkpoint),
                    "-z",
                    str(checkpoint.parent / "tokenizer.bin"),
                    "-n",
                    str(STORIES15M["seq_len"]),
                    "-t",
                    "0",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"skipped": f"run.c could not run: {exc}"}
        found = [line for line in done.stderr.splitlines() if line.startswith("achieved tok/s:")]
        if done.returncode or not found:
            return {"skipped": f"run.c failed (exit {done.returncode}): {(done.stderr.strip() or '?')[-200:]}"}
        tok_s = float(found[-1].split(":", 1)[1])
        best = tok_s if best is None else max(best, tok_s)
    return {"tok_s": best}


def llama2c_table(runs: dict, run_c: dict) -> tuple[str, dict]:
    s = STORIES15M
    title = (
        f"### llama2.c format, stories15M shape (dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads, "
        f"vocab {s['vocab_size']}, seq_len {s['seq_len']}; random weights, CPU; run.c computes in fp32, "
        f"llama_ref in its default dtype for this CPU and, for reference, in fp32)"
    )
    measured = {threads: r["tok_s"] for threads, r in run_c.items() if "tok_s" in r}
    source = (
        "measured in this run, --run-c"
        if run_c
        else "quoted from the issue, measured on another host; pass --run-c to measure it here"
    )
    head = (
        f"| threads | llama_ref dtype | steps | llama_ref decode tok/s | run.c tok/s ({source}) | llama_ref / run.c |"
    )
    lines = [title, "", head, "|---:|---|---|---:|---:|---|"]
    ratios = {}
    for run, result in runs.items():
        threads, dtype, *compiled = run.split("/")
        steps = "plain"
        if compiled:  # what the first steps cost: compiling, or reading torch's cache of an earlier compile
            steps = (
                f"--compile (warm-up {result['warmup_s']:.0f} s)"
                if result.get("compiled")
                else "--compile failed: plain"
                if "compiled" in result
                else "--compile"
            )
        reference = measured.get(threads) if run_c else RUN_C_TOK_S[int(threads)]
        ratios[run] = ratio(result.get("decode_tok_s"), reference)
        lines.append(
            f"| {threads} | {result.get('dtype', dtype)} | {steps} | {cell(result, 'decode_tok_s')} | "
            f"{'failed' if reference is None else f'{reference:.0f}'} | {verdict('llama2c', ratios[run])} |"
        )
    lines += [f"\nrun.c on {threads} thread(s): {r['skipped']}." for threads, r in run_c.items() if "skipped" in r]
    return "\n".join(lines), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated catalog names or GGUF paths (default: {','.join(MODELS)})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="llama_ref's and transformers' dtype: auto (bf16 on a GPU "
        "and on CPUs with native bf16, else fp32), fp32, bf16",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every engine")
    parser.add_argument(
        "--run-c",
        metavar="BINARY",
        help="llama2.c's run.c, built by you (gcc -Ofast -fopenmp -march=native run.c -lm -o run): "
        "measured on the stories15M-shape checkpoint in this run, instead of the quoted figures",
    )
    parser.add_argument("--quick", action="store_true", help=f"measure {','.join(QUICK_MODELS)} only")
    parser.add_argument(
        "--cpu-classes",
        default="native,avx2",
        help="the CPU classes to run the job in: native (this CPU's own) and lesser ones forced with "
        "LLAMA_REF_CPU (default: %(default)s; a class at or above this CPU's own runs once)",
    )
    parser.add_argument(
        "--llama-cpp-avx2",
        metavar="DIR",
        help="a llama-cpp-python built for AVX2 only, installed with pip --target DIR: the llama.cpp "
        "of the AVX2 run (without it, the AVX2 run compares with this environment's llama.cpp)",
    )
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # the llama2c child's steps
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    from llama_ref.catalog import resolve_model

    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    load_before = os.getloadavg()[0]
    calibration = calibrate(args.threads) if args.device == "cpu" else {}
    results = {"classes": {}, "serve": {}, "llama2c": {}, "run_c": {}}
    with tempfile.TemporaryDirectory(prefix="bench-job-") as scratch:
        for cpu_class, env, cpp_env in class_runs(args):
            results["classes"][cpu_class] = {}
            for name in names:
                path = resolve_model(name)
                prompts = Path(scratch) / f"{path.stem}.{cpu_class}.prompts.json"
                rows = {"llama_ref": run_child("llama_ref", path, args, prompts, env=env)}
                engines = ("llama.cpp", "transformers") if not env else ("llama.cpp",)
                for engine in engines:
                    rows[engine] = (
                        run_child(engine, path, args, prompts, env=cpp_env if engine == "llama.cpp" else env)
                        if prompts.exists()
                        else {"skipped": "no prompts: llama_ref's run failed"}
                    )
                rows.setdefault("transformers", {"skipped": "measured in this CPU's own class only"})
                results["classes"][cpu_class][name] = rows
        for name in names:
            results["serve"][name] = run_child("serve", resolve_model(name), args)
        checkpoint = write_stories15m_shape(Path(scratch))
        # no more threads than the run was given: on a shared machine, more would measure the contention
        for threads in sorted((t for t in RUN_C_TOK_S if t <= args.threads), reverse=True):
            # plain steps in the default dtype and in fp32 (run.c's), and compiled steps in the default dtype
            for dtype, compile in dict.fromkeys(((args.dtype, False), (args.dtype, True), ("fp32", False))):
                run = f"{threads}/{dtype}" + ("/compiled" if compile else "")
                results["llama2c"][run] = run_child(
                    "llama2c", checkpoint, args, threads=threads, dtype=dtype, compile=compile
                )
            if args.run_c:
                results["run_c"][str(threads)] = measure_run_c(args.run_c, checkpoint, threads)

    every_row = [r for models in results["classes"].values() for r in models.values()]
    dtype = next((r["llama_ref"].get("dtype") for r in every_row if "dtype" in r["llama_ref"]), "?")
    results["machine"] = machine(args, dtype, load_before, calibration)
    sections, results["ratios"] = [], {"classes": {}}
    for cpu_class, models in results["classes"].items():
        results["ratios"]["classes"][cpu_class] = {}
        for name, rows in models.items():
            table, results["ratios"]["classes"][cpu_class][name] = model_table(name, rows)
            sections.append(table)
    sections.insert(0, classes_table(results["classes"], results["ratios"]["classes"]))
    table, results["ratios"]["serve"] = serve_table(results["serve"])
    sections.append(table)
    table, results["ratios"]["llama2c"] = llama2c_table(results["llama2c"], results["run_c"])
    sections.append(table)

    m = results["machine"]
    versions = {engine: row["version"] for rows in every_row for engine, row in rows.items() if "version" in row}
    header = (
        f"## Benchmark: the whole job, side by side\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; {m['threads']} CPU "
        f"thread(s) for every engine; Python {m['python']}, torch {m['torch']}"
        + "".join(f", {engine} {version}" for engine, version in versions.items())
        + f"; llama_ref on {m['device']} in {dtype}, code {m['code']}. "
        f"Load average (1 min) {m['load_average_before']} before, {m['load_average_after']} after."
        + (
            f" Calibration before the run, {m['threads']} thread(s): bf16 matmul {m['bf16_gflops']} GFLOPS "
            f"(512 rows), bf16 weights read at {m['bf16_read_gb_s']} GB/s (one row)."
            if "bf16_gflops" in m
            else ""
        )
        + "\n\n"
        f"The job: the requests of `explainer explain {JOB_FILE} --symbol {JOB_SYMBOL}`, greedy, max_tokens "
        f"{JOB_MAX_TOKENS}. llama_ref runs them together through its Engine (continuous batching, prefix "
        f"cache); llama.cpp (llama-cpp-python, the same GGUF and token ids) one after another, reusing the "
        f"prefix each shares with the one before. Load time is not part of the job's wall time. Ratios are "
        f"llama_ref / llama.cpp; each engine ran in its own process, so each peak RSS is its own."
    )
    # the run's own threads raise the load average after it, so only the one before tells of other work
    if m["load_average_before"] >= 1:
        header += (
            " The machine was busy as this run started (the load average before), so every figure may be a "
            "lower bound; with as many threads as cores, a thread that loses its core stalls every operation."
        )
    report = header + "\n\n" + "\n\n".join(sections) + "\n"
    print(report)
    write_atomic(RESULTS / "bench_job.md", report)
    write_atomic(RESULTS / "bench_job.json", json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
