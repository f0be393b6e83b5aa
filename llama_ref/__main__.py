"""`python -m llama_ref`: stream a completion from a local model, like llama2.c's ./run.

Runs on one device with no torchrun and no GPU required, and ends with "achieved tok/s".
`python -m llama_ref serve` serves the model over an OpenAI-compatible API instead (llama_ref.serve).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from llama_ref.errors import LlamaRefError
from llama_ref.kernels import CHOICES, CPU_CLASSES, check_forced_name, force_cpu_class

MODEL_HELP = "a catalog name or a checkpoint path (default: the catalog's default, qwen2.5-coder-1.5b)"


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return parse_serve_args(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m llama_ref",
        description="Generate text with a LLaMA-family model from a GGUF file, a Hugging Face or Meta "
        "directory, or a llama2.c .bin, or a model named in the catalog (--list-models).",
        epilog="To serve the model over an OpenAI-compatible API instead: python -m llama_ref serve --help",
    )
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument(
        "--list-models",
        action="store_true",
        help="list the catalog's models, which are installed and which assembled, and exit",
    )
    parser.add_argument("--prompt", default="Once upon a time", help="prompt text (default: %(default)r)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 means greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on a GPU and on a CPU with native bf16, else fp32), fp32, bf16, fp16",
    )
    parser.add_argument(
        "--kernels",
        default="auto",
        choices=CHOICES,
        metavar="K",
        help="how layers multiply: auto (picked for this CPU class; see --explain-kernels), float "
        "(every weight in --dtype: the reference), int8-weights (int8 weights, any device), "
        "or, for the large projections: w7a8 (int8 products, any x86 with AVX2), w8a8 (exact "
        "int8 products: VNNI), bf16-blocked (bf16 in oneDNN's layout: AVX-512) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--explain-kernels",
        action="store_true",
        help="print which kernel each kind of layer gets on this machine, and why, and exit",
    )
    parser.add_argument(
        "--cpu",
        choices=CPU_CLASSES[:4],
        metavar="CLASS",
        help="run as a lesser CPU class (generic, avx2, vnni), down to torch's own kernels, to "
        "measure what such a CPU runs; the same as LLAMA_REF_CPU=CLASS",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode steps through torch.compile: faster for small models, but the first run "
        "compiles for about half a minute (needs a C++ compiler; without one, a warning)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="context length to allocate the KV cache for (default: 2048)"
    )
    args = parser.parse_args(argv)
    problem = None if args.cpu else check_forced_name(os.environ.get("LLAMA_REF_CPU"))
    if problem:
        parser.error(problem)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be 0 or more")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    args.command = "generate"
    return args


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    from llama_ref import serve

    parser = argparse.ArgumentParser(
        prog="python -m llama_ref serve",
        description="Serve the model over an OpenAI-compatible API (GET /v1/models, POST /v1/chat/completions, "
        "POST /v1/completions, streamed or not) until Ctrl-C. The model's name in requests is its "
        "catalog name, or its file name without the extension.",
    )
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; one other than loopback (0.0.0.0: your whole network) needs "
        f"--api-key or {serve.API_KEY_ENV} (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` of every client (default: {serve.API_KEY_ENV}, else no key)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        default=serve.DEFAULT_MAX_SEQ_LEN,
        help="longest prompt + answer, in tokens; the KV cache is allocated for it (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        default=serve.DEFAULT_MAX_BATCH_SIZE,
        help="most requests generating at once; more wait for a free row (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        default=serve.DEFAULT_MAX_BODY_BYTES,
        help="largest request body; a larger one gets 413 before it is read (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on a GPU and on a CPU with native bf16, else fp32), fp32, bf16, fp16",
    )
    args = parser.parse_args(argv)
    for name, low in (("port", 0), ("max_seq_len", 2), ("max_batch_size", 1), ("max_body_bytes", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.port > 65535:
        parser.error("--port must be at most 65535")
    args.command = "serve"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # a warning (--compile that could not compile, say) is one line for the user, not a source location
    warnings.formatwarning = lambda message, category, *_rest, **_kw: f"warning: {message}\n"
    if args.command == "serve":
        from llama_ref.serve import serve

        try:
            serve(
                args.model,
                args.host,
                args.port,
                max_seq_len=args.max_seq_len,
                max_batch_size=args.max_batch_size,
                dtype=args.dtype,
                api_key=args.api_key,
                max_body_bytes=args.max_body_bytes,
            )
        except LlamaRefError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from llama_ref.catalog import format_listing, list_models, resolve_model

    if args.list_models:
        print(format_listing(list_models()))
        return 0
    force_cpu_class(args.cpu)  # before torch runs anything: its dispatchers read the variables once
    # torch is imported here, after --help has had its chance to answer quickly
    from llama_ref.loading import load_llama
    from llama_ref.tokenizer import StreamDecoder

    try:
        if args.explain_kernels:
            print(explain_kernels(resolve_model(args.model), args.device, args.dtype, args.kernels))
            return 0
        max_seq_len = args.max_seq_len or 2048
        llama = load_llama(
            args.model,
            max_seq_len=max_seq_len,
            max_batch_size=1,
            device=args.device,
            dtype=args.dtype,
            kernels=args.kernels,
            compile=args.compile,
        )
        if args.chat:
            prompt_tokens = llama.tokenizer.encode(
                llama.render_chat([{"role": "user", "content": args.prompt}]), bos=False, eos=False
            )
        else:
            prompt_tokens = llama.tokenizer.encode(args.prompt, bos=llama.tokenizer.add_bos, eos=False)
            sys.stdout.write(args.prompt)
        max_gen_len = min(args.max_tokens, llama.model.max_seq_len - len(prompt_tokens))
        if max_gen_len < 1:
            raise LlamaRefError(
                f"the prompt has {len(prompt_tokens)} tokens, which leaves no room in "
                f"--max-seq-len {llama.model.max_seq_len}; raise --max-seq-len"
            )
        decoder = StreamDecoder(llama.tokenizer)

        def show(_row, token):
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

        _tokens, _prefill_s, decode_s, steps = timed_generation(
            llama,
            prompt_tokens,
            max_gen_len,
            on_token=show,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        sys.stdout.write(decoder.flush() + "\n")
    except LlamaRefError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    # decode steps per second, as llama2.c reports it: prefill excluded
    rate = steps / decode_s if decode_s > 0 else 0.0
    print(f"achieved tok/s: {rate:f}", file=sys.stderr)
    return 0


def explain_kernels(model_path, device: str, dtype: str, kernels: str) -> str:
    """The kernel table for this machine and the model's shapes, read from its header (no weights loaded)."""
    from llama_ref.checkpoints import open_checkpoint
    from llama_ref.device import pick_device, pick_dtype
    from llama_ref.kernels import plan
    from llama_ref.loading import layer_counts

    device_ = pick_device(device)
    dtype_ = pick_dtype(dtype, device_)
    layer_plan = plan(device_.type, dtype_, kernels)
    checkpoint = open_checkpoint(model_path)
    head = f"{checkpoint.path.name} on {device_.type} in {str(dtype_).removeprefix('torch.')}"
    return head + "\n" + layer_plan.explain(layer_counts(checkpoint.args))


def timed_generation(llama, prompt_tokens: list[int], max_gen_len: int, on_token=None, **sampling):
    """Generate for one prompt; returns (tokens, prefill_seconds, decode_seconds, decode_steps).

    Prefill runs until the first new token exists and decode covers the rest: the split behind
    llama2.c's "achieved tok/s", which counts decode steps only.
    """
    marks = []

    def timing_hook(row, token):
        marks.append(time.perf_counter())
        if on_token is not None:
            on_token(row, token)

    started = time.perf_counter()
    (tokens,), _ = llama.generate([prompt_tokens], max_gen_len, on_token=timing_hook, **sampling)
    finished = time.perf_counter()
    if not marks:
        return tokens, finished - started, 0.0, 0
    return tokens, marks[0] - started, finished - marks[0], len(marks) - 1


if __name__ == "__main__":
    sys.exit(main())
