#!/usr/bin/env bash
# One command for a CUDA machine: llama_ref's parity tests with the GPU visible, then the whole-job
# benchmark on CUDA in bf16 (transformers beside it, with a static KV cache). Without CUDA it runs the
# CPU path in quick mode instead, so the script itself can be tried anywhere.
#     benchmarks/gpu.sh            (after `make install`; PYTHON=... to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    "$PYTHON" -c 'import torch; print("CUDA:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
    # the parity tests that exist in this checkout (pytest refuses a missing path)
    tests=()
    for test in tests/test_engine.py tests/test_qwen_parity.py tests/test_checkpoints.py; do
        [ -f "$test" ] && tests+=("$test")
    done
    "$PYTHON" -m pytest -q "${tests[@]}"
    exec "$PYTHON" benchmarks/bench_job.py --device cuda --dtype bf16 "$@"
fi
echo "gpu.sh: no CUDA here; running the CPU benchmark in quick mode (make test runs the parity tests on CPU)" >&2
exec "$PYTHON" benchmarks/bench_job.py --device cpu --quick "$@"
