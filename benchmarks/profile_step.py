"""Where a batched decode step of the whole job spends its time.

The job's decode steps run about 6.6 rows at about 2,500 positions (bench_job.py). This builds the
model with that many rows, fills every row's cache up to `--positions`, and profiles decode steps with
torch.profiler, grouped by operator, plus a split of the step into what reads the weights and what
reads the KV cache (attention).

    .venv/bin/python benchmarks/profile_step.py [--model NAME] [--rows 8] [--positions 2500] [--threads 2]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalog name or path (default: the default model)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--positions", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--shared",
        type=int,
        default=0,
        help="of those positions, how many every row reads from the anchor (default 0: none)",
    )
    parser.add_argument("--row-len", type=int, default=None, help="positions of a row's own cache")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llama_ref import Llama
    from llama_ref.catalog import resolve_model
    from llama_ref.model import StepPlan

    torch.set_num_threads(args.threads)
    llama = Llama.build(
        resolve_model(args.model) if args.model else None, max_seq_len=args.positions + 256, max_batch_size=args.rows
    )
    model = llama.model
    if args.shared or args.row_len:
        model.setup_caches(args.rows, args.positions + 256, row_len=args.row_len, anchor_len=args.positions + 256)
    for layer in model.layers:  # any values: the time does not depend on them
        for cache in filter(None, (layer.attention.cache, layer.attention.anchor)):
            cache.k.normal_()
            cache.v.normal_()
    rows = slice(0, args.rows)
    tokens = torch.randint(0, model.params.vocab_size, (args.rows, 1))
    # rows a few positions apart, as in the job
    positions = torch.arange(args.rows) * 7 + args.positions - 7 * args.rows

    shared = torch.full((args.rows,), args.shared) if args.shared else None

    def step():
        model.forward(tokens, positions, StepPlan(rows=rows, shared=shared))

    for _ in range(2):
        step()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - began) / args.steps * 1000
    print(f"{args.rows} rows at ~{args.positions} positions ({args.shared} from the anchor): {per_step:.1f} ms a step")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
