"""Each kernel of llama_ref's table (llama_ref/kernels.py) on one layer shape, on this CPU: ms per call.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1,8,64,256] [--shape 8960x1536]

Weights are cycled through more than the caches hold (as a decode step reads them), activations in fp32 or, for
bf16-blocked, bf16. A kernel this CPU cannot run is listed with why. Run it under LLAMA_REF_CPU=avx2 to measure
what an AVX2 CPU runs. Writes benchmarks/results/kernels_<class>.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from explainer.fileio import write_atomic

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--shape", default="8960x1536", help="out x in of the layer (default: Qwen2.5-1.5B's w1)")
    args = parser.parse_args(argv)

    import torch

    import llama_ref  # noqa: F401 - applies LLAMA_REF_CPU before torch runs anything
    from llama_ref.kernels import available, cpu_class, read_cpu
    from llama_ref.quantize import BlockedLinear, Int8DotLinear, Int8Linear

    torch.set_num_threads(args.threads)
    out_features, in_features = (int(n) for n in args.shape.split("x"))
    count = max(2, (256 << 20) // (out_features * in_features))  # more than the caches hold, even in int8
    weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(2)]
    cpu = read_cpu()

    def layers(kernel: str):
        if kernel == "float":
            return [torch.nn.Linear(in_features, out_features, bias=False) for _ in range(count)], torch.float32
        if kernel == "int8-weights":
            made = []
            for i in range(count):
                layer = Int8Linear(in_features, out_features)
                layer.load_float_weight(weights[i % 2])
                made.append(layer)
            return made, torch.float32
        if kernel == "bf16-blocked":
            return [BlockedLinear(weights[i % 2].bfloat16()) for i in range(count)], torch.bfloat16
        bits = 8 if kernel == "w8a8" else 7
        return [
            Int8DotLinear.from_float(weights[i % 2], weight_bits=bits, int_mm=kernel == "w8a8") for i in range(count)
        ], torch.float32

    rows_list = [int(r) for r in args.rows.split(",")]
    lines = [
        f"# Kernels on one {out_features}x{in_features} layer, class {cpu_class(cpu)} ({cpu.features()}), "
        f"{args.threads} thread(s), torch {torch.__version__}",
        "",
        "Command: `python benchmarks/bench_kernels.py"
        + (f" --threads {args.threads}" if args.threads != 2 else "")
        + "`; ms per call, the best of 3 passes over "
        + f"{count} layers.",
        "",
        "| kernel | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in rows_list) + " |",
        "|---|" + "---:|" * len(rows_list),
    ]
    with torch.inference_mode():
        for kernel in ("float", "int8-weights", "w7a8", "w8a8", "bf16-blocked"):
            dtype = torch.bfloat16 if kernel == "bf16-blocked" else torch.float32
            why = available(kernel, "cpu", dtype)
            if why:
                lines.append(f"| {kernel} | {why} |" + " |" * (len(rows_list) - 1))
                continue
            made, dtype = layers(kernel)
            cells = []
            for rows in rows_list:
                x = torch.randn(rows, in_features).to(dtype)
                for layer in made[:2]:
                    layer(x)
                best = float("inf")
                for _ in range(3):
                    began = time.perf_counter()
                    for layer in made:
                        layer(x)
                    best = min(best, (time.perf_counter() - began) / len(made))
                cells.append(f"{best * 1e3:.2f}")
            lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
            del made
            print(lines[-1], file=sys.stderr)
    report = "\n".join(lines) + "\n"
    write_atomic(RESULTS / f"kernels_{cpu_class(cpu)}.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
