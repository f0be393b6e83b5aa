"""What makes a small model's one-token steps fast on a CPU: int8 copies of small bf16 layers, a KV cache in
fp32 when it is small, and torch.compile on request (`python -m llama_ref --compile`), which must fall back
to the plain steps, with one warning, where it cannot compile."""

import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tiny_checkpoints import make_tiny_model, write_gguf  # noqa: E402

from llama_ref import Llama, quantize  # noqa: E402
from llama_ref.catalog import resolve_model  # noqa: E402
from llama_ref.model import SMALL_CACHE_BYTES, ModelArgs, cache_bytes, kv_cache_dtype  # noqa: E402
from llama_ref.quantize import INT8_COPY_MAX_ROWS, BlockedLinear, can_block, int8_rows  # noqa: E402

needs_blocking = pytest.mark.skipif(
    not can_block(torch.nn.Linear(8, 8).bfloat16()),
    reason="bf16-blocked needs oneDNN's bf16 (AVX512BW/VL/DQ or AVX-NE-CONVERT), which this CPU lacks",
)


def layer_and_input(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(96, 160, generator=g) * 0.05).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    return weight, bias, torch.randn(rows, 160, generator=g).bfloat16()


@needs_blocking
def test_one_or_two_rows_are_multiplied_by_the_int8_copy_and_more_by_the_bf16_weight():
    weight, bias, x = layer_and_input(6)
    layer = BlockedLinear(weight, bias, int8_copy=True)
    q, scales = int8_rows(weight)
    # the kernel takes the scales in the activations' dtype
    by_int8 = x.double() @ (q.double() * scales.bfloat16().double()[:, None]).T + bias.double()
    by_bf16 = x.double() @ weight.double().T + bias.double()
    assert not torch.allclose(by_int8, by_bf16, rtol=0, atol=1e-3)  # the two can be told apart
    for rows in range(1, INT8_COPY_MAX_ROWS + 1):
        torch.testing.assert_close(layer(x[:rows]).double(), by_int8[:rows], rtol=8e-3, atol=2e-3)
    torch.testing.assert_close(layer(x).double(), by_bf16, rtol=8e-3, atol=2e-3)
    # a decode step's shape, (rows, 1, features), is kept
    assert layer(x[:1].view(1, 1, 160)).shape == (1, 1, 96)
    # without a copy every call reads the bf16 weight
    torch.testing.assert_close(BlockedLinear(weight, bias)(x[:1]).double(), by_bf16[:1], rtol=8e-3, atol=2e-3)


@needs_blocking
def test_int8_copies_of_a_real_models_weights_predict_the_tokens_bf16_predicts(monkeypatch):
    """SmolLM2's output layer (49152 x 576) is above INT8_COPY_MAX_WEIGHTS, so it gets a copy only here: its
    other layers have 4-bit copies from the GGUF. One-row calls (the copy) against the whole text at once."""
    monkeypatch.setattr(quantize, "INT8_COPY_MAX_WEIGHTS", 2**26)
    llama = Llama.build(
        resolve_model("smollm2-135m"),
        max_seq_len=256,
        max_batch_size=1,
        device="cpu",
        dtype="bf16",
        kernels="bf16-blocked",
    )
    output = llama.model.output
    assert isinstance(output, BlockedLinear) and output.q is not None
    text = (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "The function above returns the n-th Fibonacci number by keeping the last two values. Each "
        "step of the loop moves the pair one place along the sequence, so after n steps a holds F(n)."
    )
    tokens = torch.tensor([llama.tokenizer.encode(text, bos=False, eos=False)])
    seen = {}
    hook = output.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0][0]))
    with torch.no_grad():
        whole = llama.model.forward(tokens, 0)[0].float()
        hook.remove()
        one_by_one = torch.cat([output(row[None]) for row in seen["hidden"]]).float()
    agree = (one_by_one.argmax(-1) == whole.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


def test_a_small_kv_cache_is_fp32_on_a_cpu_and_a_big_one_keeps_the_models_dtype():
    tiny = ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768)  # stories15M
    qwen = ModelArgs(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, vocab_size=151936, hidden_dim=8960)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype(tiny, 1, 256, torch.bfloat16, cpu) == torch.float32
    assert kv_cache_dtype(tiny, 1, 256, torch.bfloat16, cuda) == torch.bfloat16
    assert cache_bytes(qwen, 8, 2048, torch.float32) > SMALL_CACHE_BYTES
    assert kv_cache_dtype(qwen, 8, 2048, torch.bfloat16, cpu) == torch.bfloat16
    # fp32 activations (a CPU without native bf16): a big cache is bf16 where the layers are quantized (compact),
    # fp32 where they are not (the float reference), and a small one stays fp32 either way
    assert kv_cache_dtype(qwen, 8, 2048, torch.float32, cpu, compact=True) == torch.bfloat16
    assert kv_cache_dtype(qwen, 8, 2048, torch.float32, cpu) == torch.float32
    assert kv_cache_dtype(tiny, 1, 256, torch.float32, cpu, compact=True) == torch.float32
    assert kv_cache_dtype(qwen, 8, 2048, torch.float32, cuda, compact=True) == torch.float32


def test_one_token_steps_over_a_fp32_cache_give_the_logits_of_one_whole_pass(tmp_path):
    path = write_gguf(make_tiny_model(tmp_path), tmp_path / "tiny.gguf")
    # plain bf16 layers: steps and the whole pass then differ only in how attention reads the cache
    llama = Llama.build(path, max_seq_len=64, max_batch_size=1, device="cpu", dtype="bf16", kernels="float")
    assert llama.model.layers[0].attention.cache.k.dtype == torch.float32
    tokens = torch.tensor([llama.tokenizer.encode("Once upon a time there was a little", bos=True, eos=False)])
    with torch.no_grad():
        whole = llama.model.forward(tokens, 0)[0].float()
        steps = torch.cat([llama.model.forward(tokens[:, i : i + 1], i)[0] for i in range(tokens.shape[1])]).float()
    torch.testing.assert_close(steps, whole, rtol=0.02, atol=0.05 * whole.abs().max().item())
    assert (steps.argmax(-1) == whole.argmax(-1)).float().mean() >= 0.9


def run_cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "llama_ref", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return str(write_gguf(make_tiny_model(folder), folder / "tiny.gguf"))


def greedy(tiny_gguf, *extra, **env):
    return run_cli(
        "--model",
        tiny_gguf,
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        "--prompt",
        "Once upon a time",
        *extra,
        **env,
    )


@pytest.mark.slow  # torch.compile builds C++
@needs_blocking
def test_compiled_steps_compute_what_plain_steps_compute(tiny_gguf, tmp_path, monkeypatch):
    """In bf16, with the int8 copies a step of this model reads. The compiled kernels round differently (they
    keep fused intermediates in fp32), so the logits are close, not equal."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compiled here, not read back
    llama = Llama.build(tiny_gguf, max_seq_len=64, max_batch_size=1, device="cpu", dtype="bf16", kernels="bf16-blocked")
    tokens = torch.tensor([llama.tokenizer.encode("Once upon a time there was a little", bos=True, eos=False)])

    def steps():
        with torch.no_grad():
            return torch.cat([llama.model.forward(tokens[:, i : i + 1], i)[0] for i in range(tokens.shape[1])]).float()

    plain = steps()
    llama.model.compile_steps()
    compiled = steps()
    if shutil.which(os.environ.get("CXX", "g++")):  # a compiler to compile with: no fallback happened
        assert llama.model.compiled_step is not None
    torch.testing.assert_close(compiled, plain, rtol=0.02, atol=0.05 * plain.abs().max().item())
    assert (compiled.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow  # torch.compile builds C++
def test_compiled_steps_write_what_plain_steps_write(tiny_gguf, tmp_path):
    """In fp32, where compiled and plain kernels agree to the last bits that matter for greedy tokens."""
    plain = greedy(tiny_gguf, "--dtype", "fp32")
    # a cache of its own: the steps are compiled here, not read back from an earlier run's cache
    compiled = greedy(tiny_gguf, "--dtype", "fp32", "--compile", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout and len(plain.stdout) > len("Once upon a time")
    if shutil.which(os.environ.get("CXX", "g++")):  # a compiler to compile with
        assert "torch.compile failed" not in compiled.stderr, compiled.stderr
    assert compiled.stderr.strip().splitlines()[-1].startswith("achieved tok/s: ")


@pytest.mark.slow  # torch.compile tries, and fails, in a child process
def test_without_a_compiler_compile_warns_once_and_writes_the_same(tiny_gguf, tmp_path):
    plain = greedy(tiny_gguf, "--dtype", "bf16")
    compiled = greedy(
        tiny_gguf,
        "--dtype",
        "bf16",
        "--compile",
        CXX=str(tmp_path / "no-such-compiler"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout
    lines = compiled.stderr.strip().splitlines()
    assert sum("torch.compile failed, so decoding runs without it" in line for line in lines) == 1, lines
    # one line for the warning, not a source location and a line of torch's code
    assert all(line.startswith(("warning: ", "achieved tok/s: ")) for line in lines), lines


def test_a_compact_bf16_cache_is_widened_to_exactly_what_an_fp32_copy_of_it_gives():
    from llama_ref.model import attend_chunk, attend_one_token

    g = torch.Generator().manual_seed(3)
    rows, kv_heads, heads, own, span, head_dim = 3, 2, 6, 40, 25, 16
    keys = torch.randn(rows, kv_heads, own, head_dim, generator=g).bfloat16()
    values = torch.randn(rows, kv_heads, own, head_dim, generator=g).bfloat16()
    shared = tuple(torch.randn(kv_heads, span, head_dim, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(rows, heads, 1, head_dim, generator=g)
    bias = torch.zeros(rows, 1, 1, span + own)
    bias[1, ..., span + 30 :] = float("-inf")  # a shorter row
    wide = attend_one_token(q, keys.float(), values.float(), bias, tuple(part.float() for part in shared))
    compact = attend_one_token(q, keys, values, bias, shared)
    assert compact.dtype == torch.float32
    torch.testing.assert_close(compact, wide, rtol=1e-5, atol=1e-6)
    plain = attend_one_token(q, keys, values, bias[..., span:])  # no anchor
    torch.testing.assert_close(plain, attend_one_token(q, keys.float(), values.float(), bias[..., span:]))

    chunk = torch.randn(1, heads, 7, head_dim, generator=g)
    mask = torch.ones(1, 1, 7, own, dtype=torch.bool).tril(diagonal=own - 7)
    torch.testing.assert_close(
        attend_chunk(chunk, keys[:1], values[:1], mask), attend_chunk(chunk, keys[:1].float(), values[:1].float(), mask)
    )


def test_a_compact_cache_gives_the_fp32_caches_greedy_tokens_through_the_engine(tmp_path):
    from llama_ref.engine import Engine, Job

    path = write_gguf(make_tiny_model(tmp_path), tmp_path / "tiny.gguf")
    llama = Llama.build(path, max_seq_len=96, max_batch_size=3, device="cpu", dtype="fp32", kernels="w7a8")
    assert llama.model.compact_kv  # fp32 activations with quantized layers
    generator = torch.Generator().manual_seed(5)
    start = torch.randint(3, llama.model.params.vocab_size, (30,), generator=generator).tolist()
    prompts = [start + torch.randint(3, 200, (n,), generator=generator).tolist() for n in (2, 9, 5)]

    def answers(dtype):
        engine = Engine(llama.model, llama.tokenizer, prefill_chunk=8, prefix_cache_bytes=0)
        engine.reserve(3, 96, row_len=48)  # rows read the prompts' shared start from the anchor
        llama.model.setup_caches(3, 96, dtype=dtype, row_len=48, anchor_len=96)
        jobs = engine.run([Job(p, 12, stop_ids=frozenset()) for p in prompts])
        assert next(llama.model.attentions()).cache.k.dtype == dtype
        return [job.tokens for job in jobs]

    wide, compact = answers(torch.float32), answers(torch.bfloat16)
    # keys and values rounded to bf16 may move a near tie; the random model's answers agree almost everywhere
    agree = sum(a == b for x, y in zip(wide, compact) for a, b in zip(x, y)) / sum(map(len, wide))
    assert agree >= 0.9, (wide, compact)
