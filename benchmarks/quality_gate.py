"""Quality gate for a kernel path: teacher-forced on the `make run` job's answers, against fp32 float layers.

    python benchmarks/quality_gate.py [--kernels auto,w7a8,...] [--dtype auto] [--model M] [--requests N]

1. The job's requests (`explainer explain llama_ref/generation.py --symbol Llama.generate`, greedy, as
   benchmarks/bench_job.py builds them) are answered once by the first path through the Engine; the answers are
   kept in benchmarks/results/quality_answers.json, to be read as well as measured.
2. Each prompt + answer is fed to the fp32 reference (every layer fp32, --kernels float) and to each path, and
   the next-token distributions over the answer's positions are compared: how often the likeliest token is the
   same (agreement), and the mean KL divergence of the path from the reference, in nats.

The prompts share their start (system prompt and the whole function): it is fed once into cache row 0, and
each request continues from there, so the fp32 reference costs minutes, not an hour.

Gate (issue 23): agreement >= 90% and mean KL <= 0.02 nats. Results: benchmarks/results/quality_gate.md/.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from explainer.fileio import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_job import JOB_MAX_TOKENS, RESULTS, common_prefix, job_requests  # noqa: E402

GATE_AGREEMENT, GATE_KL = 0.90, 0.02


def answer_job(model: str, kernels: str, dtype: str, count: int) -> dict:
    """The job's prompts as token ids, and greedy answers from `kernels`'s path."""
    import torch

    from explainer.backends.local import LocalBackend
    from llama_ref.engine import Job

    backend = LocalBackend(model, device="cpu", dtype=dtype, kernels=kernels)
    prompts = [backend.prompt_tokens(request) for request in job_requests()[:count]]
    llama = backend.llama
    engine = backend.engine
    engine.reserve(min(8, len(prompts)), max(len(p) for p in prompts) + JOB_MAX_TOKENS + 1)
    with torch.inference_mode():
        jobs = engine.run([Job(p, JOB_MAX_TOKENS) for p in prompts])
    return {
        "model": model,
        "kernels": kernels,
        "prompts": prompts,
        "answers": [job.tokens for job in jobs],
        "texts": [llama.tokenizer.decode(job.tokens) for job in jobs],
    }


def answer_logprobs(llama, prompts: list[list[int]], answers: list[list[int]]):
    """For each request, the log-probabilities (answer tokens, vocab) the model gives each answer position."""
    import torch

    model = llama.model
    shared = min(min(common_prefix(prompts[0], p) for p in prompts), min(len(p) for p in prompts) - 1)
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    model.setup_caches(1, longest + 1)
    out = []
    with torch.inference_mode():
        model.forward(torch.tensor([prompts[0][:shared]]), 0)
        for prompt, answer in zip(prompts, answers):
            # positions len(prompt)-1 .. end-1 predict the answer's tokens (and what follows its last one)
            rest = torch.tensor([prompt[shared:] + answer[:-1]]) if answer else torch.tensor([prompt[shared:]])
            logits = model.forward(rest, shared)[0, len(prompt) - shared - 1 :]
            out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def compare(reference, candidate) -> dict:

    agree = total = 0
    kl_sum = 0.0
    for ref, got in zip(reference, candidate):
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
        kl_sum += float((ref.exp() * (ref - got)).sum(-1).sum())
    return {"positions": total, "agreement": agree / total, "kl": kl_sum / total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--kernels", default="auto", help="comma-separated --kernels values to gate (default: auto)")
    parser.add_argument("--dtype", default="auto", help="the paths' dtype (the reference is always fp32)")
    parser.add_argument("--requests", type=int, default=17, help="how many of the job's requests (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--answers",
        type=Path,
        default=RESULTS / "quality_answers.json",
        help="reuse these answers if they are for this model and job (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    import torch

    from llama_ref import Llama
    from llama_ref.catalog import resolve_model
    from llama_ref.kernels import read_cpu

    torch.set_num_threads(args.threads)
    paths = args.kernels.split(",")
    job = json.loads(args.answers.read_text()) if args.answers.exists() else None
    expected = None
    if job is not None and job.get("model") == args.model:
        from explainer.backends.local import LocalBackend

        backend = LocalBackend(args.model, device="cpu")
        expected = [backend.prompt_tokens(r) for r in job_requests()[: args.requests]]
    if job is None or job.get("model") != args.model or job["prompts"][: args.requests] != expected:
        began = time.perf_counter()
        job = answer_job(args.model, paths[0], args.dtype, args.requests)
        print(
            f"answered {len(job['answers'])} requests with {paths[0]} in {time.perf_counter() - began:.0f} s",
            file=sys.stderr,
        )
        write_atomic(args.answers, json.dumps(job, indent=1, ensure_ascii=False) + "\n")
    prompts, answers = job["prompts"][: args.requests], job["answers"][: args.requests]

    path = resolve_model(args.model)
    began = time.perf_counter()
    reference = answer_logprobs(
        Llama.build(path, max_seq_len=8192, max_batch_size=1, device="cpu", dtype="fp32", kernels="float"),
        prompts,
        answers,
    )
    print(f"fp32 reference in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    cpu = read_cpu()
    results = {"model": args.model, "requests": len(prompts), "cpu": cpu.features(), "paths": {}}
    for kernels in paths:
        llama = Llama.build(path, max_seq_len=8192, max_batch_size=1, device="cpu", dtype=args.dtype, kernels=kernels)
        row = compare(reference, answer_logprobs(llama, prompts, answers))
        row.update(
            cpu_class=llama.plan.cpu,
            dtype=str(llama.model.dtype).removeprefix("torch."),
            layers={role: choice.kernel for role, choice in llama.plan.choices.items()},
            passed=row["agreement"] >= GATE_AGREEMENT and row["kl"] <= GATE_KL,
        )
        results["paths"][kernels] = row
        del llama
        print(
            f"{kernels}: agreement {row['agreement']:.1%}, KL {row['kl']:.4f} nats over {row['positions']} "
            f"positions ({'passed' if row['passed'] else 'FAILED'})",
            file=sys.stderr,
        )

    lines = [
        f"# Quality gate: {args.model}, {len(prompts)} requests of the make-run job, teacher-forced against "
        f"fp32 float layers",
        "",
        f"CPU: {cpu.features()}. Command: `python benchmarks/quality_gate.py --kernels {args.kernels}`",
        "",
        "| --kernels | class | dtype | linear / small / output / embedding | agreement | mean KL (nats) | gate |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for kernels, row in results["paths"].items():
        layers = " / ".join(row["layers"].values())
        lines.append(
            f"| {kernels} | {row['cpu_class']} | {row['dtype']} | {layers} | {row['agreement']:.1%} | "
            f"{row['kl']:.4f} | {'passed' if row['passed'] else 'failed'} |"
        )
    write_atomic(RESULTS / "quality_gate.md", "\n".join(lines) + "\n")
    write_atomic(RESULTS / "quality_gate.json", json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0 if all(row["passed"] for row in results["paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
