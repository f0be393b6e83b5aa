"""int8 weights times int8 activations rounded per token (quantize.Int8DotLinear): exact integer products
whichever kernel runs, a row's result independent of its batch, and a real model on each path. 8-bit weights
(w8a8) need a CPU that adds int8 products exactly (VNNI); 7-bit ones (w7a8) are exact on any x86 with fbgemm."""

import pytest

torch = pytest.importorskip("torch")

from llama_ref import Llama, kernels  # noqa: E402
from llama_ref.catalog import resolve_model  # noqa: E402
from llama_ref.engine import Engine, Job  # noqa: E402
from llama_ref.kernels import fbgemm_available, int8_exact  # noqa: E402
from llama_ref.quantize import INT8_FEW_ROWS, Int8DotLinear  # noqa: E402

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm (x86 builds of torch)")
needs_exact_int8 = pytest.mark.skipif(
    not int8_exact(), reason="w8a8 needs exact int8 products (AVX512-VNNI, AVX-VNNI or AMX), which this CPU lacks"
)
# (weight bits, torch._int_mm for many rows), and what each needs
PATHS = [pytest.param((8, True), marks=needs_exact_int8, id="w8a8"), pytest.param((7, False), id="w7a8")]


def layer_and_input(rows, path, seed=0, bias=True, dtype=torch.bfloat16):
    bits, int_mm = path
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(96, 160, generator=g) * 0.05).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 160, generator=g).to(dtype)
    x[0, 7] = 60.0  # an outlier, as real activations have: only its own row's scale may feel it
    return Int8DotLinear.from_float(weight, b, weight_bits=bits, int_mm=int_mm), weight, b, x


def int8_by_hand(weight, x, bits):
    """The same rounding, with the integer products summed in float64: no int8 kernel involved."""
    w = weight.float()
    limit = 2 ** (bits - 1) - 1
    w_scale = w.abs().amax(1).clamp(min=1e-12) / limit
    wq = torch.round(w / w_scale[:, None]).clamp(-limit, limit)
    xf = x.float()
    x_scale = xf.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xf / x_scale)
    return (xq.double() @ wq.double().T) * w_scale.double() * x_scale.double()


@needs_fbgemm
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 5, INT8_FEW_ROWS + 3])  # fbgemm's kernel; w8a8's torch._int_mm for the last
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_computes_the_exact_integer_products(rows, path, dtype):
    layer, weight, _bias, x = layer_and_input(rows, path, bias=False, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    tolerance = {"rtol": 8e-3, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), int8_by_hand(weight, x, path[0]), **tolerance)


@needs_fbgemm
def test_seven_bit_weights_stay_exact_where_eight_bit_ones_would_saturate_avx2():
    """The products that overflow AVX2's 16-bit pair sums with 8-bit weights (255 * 127 * 2 > 32767): with 7-bit
    weights they are exact on every x86, whether or not the CPU has VNNI."""
    layer = Int8DotLinear.from_float(torch.full((32, 64), 63.0), weight_bits=7)  # the top of 7 bits, scale 1
    x = torch.full((3, 64), 127.0)  # the top of int8 (u8 255 in fbgemm)
    assert torch.equal(layer(x), torch.full((3, 32), 64.0 * 127 * 63))
    x[:, ::2] = -127.0  # and the bottom, mixed in
    x[:, 1::2] = 126.0
    assert torch.equal(layer(x), torch.full((3, 32), 32.0 * (126 - 127) * 63))


@needs_fbgemm
@pytest.mark.parametrize("path", PATHS)
def test_a_rows_answer_does_not_depend_on_its_batch_or_on_the_kernel(path):
    layer, weight, bias, x = layer_and_input(INT8_FEW_ROWS + 3, path)
    many = layer(x)  # torch._int_mm for w8a8
    few = layer(x[:4])  # fbgemm
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    assert torch.equal(few, alone)
    assert torch.equal(many[:4], few)
    # the outlier in row 0 coarsened row 0 only: every other row is as close to the float product as usual
    exact = x.float() @ weight.float().T + bias.float()
    error = (many.float() - exact).norm(dim=1) / exact.norm(dim=1)
    assert error[1:].max() < 0.03, error
    assert error[0] > error[1:].max()


@needs_fbgemm
@pytest.mark.parametrize("path", PATHS)
def test_a_batch_of_several_tokens_per_row_keeps_its_shape(path):
    layer, _weight, _bias, x = layer_and_input(6, path)
    out = layer(x.view(2, 3, 160))
    assert out.shape == (2, 3, 96)
    assert torch.equal(out.view(6, 96), layer(x))


# w8a8: SmolLM2 with int8 products in every projection (its layers are below kernels.SMALL_WEIGHTS, so by
# default they stay in float, test below). w7a8: Qwen2.5-Coder-0.5B as the table gives it to an AVX2 CPU: its
# projections are above SMALL_WEIGHTS, as the default model's are. (SmolLM2 with every tiny layer in 7 bits
# is a model no CPU class gets; its 2+2 came out wrong.) Qwen2.5-Coder-0.5B, loaded twice, is for make test.
MODEL_PATHS = [
    pytest.param(("smollm2-135m", "w8a8", "bf16"), marks=needs_exact_int8, id="w8a8"),
    pytest.param(("qwen2.5-coder-0.5b", "w7a8", "fp32"), marks=[needs_fbgemm, pytest.mark.slow], id="w7a8"),
]


@pytest.fixture(scope="module", params=MODEL_PATHS)
def model_int8(request):
    name, kernel, dtype = request.param
    with pytest.MonkeyPatch.context() as patch:
        if name == "smollm2-135m":
            patch.setattr(kernels, "SMALL_WEIGHTS", 0)
        return name, Llama.build(
            resolve_model(name), max_seq_len=256, max_batch_size=4, device="cpu", dtype=dtype, kernels=kernel
        )


def int8_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, Int8DotLinear)]


def test_int8_products_go_to_every_big_layer(model_int8):
    name, llama = model_int8
    threshold = 0 if name == "smollm2-135m" else kernels.SMALL_WEIGHTS  # as the fixture built it
    big = [
        layer
        for layer, m in llama.model.named_modules()
        if layer != "output"
        and isinstance(m, (torch.nn.Linear, Int8DotLinear))
        and m.in_features * m.out_features >= threshold
    ]
    assert big and sorted(big) == sorted(set(int8_layers(llama.model)) - {"output"})  # w2 and w13 at least


@needs_fbgemm
def test_a_small_models_projections_stay_in_float():
    plain = Llama.build(
        resolve_model("smollm2-135m"), max_seq_len=64, max_batch_size=1, device="cpu", dtype="fp32", kernels="w7a8"
    )
    assert [name for name in int8_layers(plain.model) if name != "output"] == []  # too small to gain


def test_int8_products_predict_the_tokens_float_predicts(model_int8):
    name, llama = model_int8
    text = (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "The function above returns the n-th Fibonacci number by keeping the last two values."
    )
    tokens = torch.tensor([llama.tokenizer.encode(text, bos=False, eos=False)])
    plain = Llama.build(
        resolve_model(name), max_seq_len=256, max_batch_size=1, device="cpu", dtype=llama.model.dtype, kernels="float"
    )
    with torch.no_grad():
        ours = llama.model.forward(tokens, 0)[0].float()
        theirs = plain.model.forward(tokens, 0)[0].float()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_the_engine_answers_right_with_int8_products(model_int8):
    """(Token-for-token equality of the engine with generate() is tested with float kernels, in test_engine.py.)"""
    _name, llama = model_int8
    questions = ["What is 2+2? Answer with one number.", "What is the capital of France? Answer with one word."]
    prompts = [
        llama.tokenizer.encode(llama.render_chat([{"role": "user", "content": q}]), bos=False, eos=False)
        for q in questions
    ]
    jobs = Engine(llama.model, llama.tokenizer, prefill_chunk=16).run([Job(p, 16) for p in prompts])
    answers = [llama.tokenizer.decode(job.tokens) for job in jobs]
    assert "4" in answers[0] and "Paris" in answers[1], answers
