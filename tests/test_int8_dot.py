"""int8 weights times int8 activations on a CPU (quantize.W8A8Linear): exact integer products whichever
kernel runs, a row's result independent of its batch, and the default bf16 CPU path of a real model."""

import pytest

torch = pytest.importorskip("torch")

from llama_ref import Llama  # noqa: E402
from llama_ref.catalog import resolve_model  # noqa: E402
from llama_ref.engine import Engine, Job  # noqa: E402
from llama_ref import quantize  # noqa: E402
from llama_ref.quantize import INT8_FEW_ROWS, W8A8Linear, int8_dot_available  # noqa: E402

needs_int8_dot = pytest.mark.skipif(not int8_dot_available(), reason="this CPU has no exact int8 products")


def layer_and_input(rows, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(96, 160, generator=g) * 0.05).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, 160, generator=g).bfloat16()
    x[0, 7] = 60.0  # an outlier, as real activations have: only its own row's scale may feel it
    return W8A8Linear(weight, b), weight, b, x


def int8_by_hand(weight, x):
    """The same rounding, with the integer products summed in float64: no int8 kernel involved."""
    w = weight.float()
    w_scale = w.abs().amax(1).clamp(min=1e-12) / 127
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127)
    xf = x.float()
    x_scale = xf.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xf / x_scale)
    return (xq.double() @ wq.double().T) * w_scale.double() * x_scale.double()


@needs_int8_dot
@pytest.mark.parametrize("rows", [1, 5, INT8_FEW_ROWS + 3])  # fbgemm's kernel for the first two, torch._int_mm's
def test_both_kernels_compute_the_exact_integer_products(rows):
    layer, weight, _bias, x = layer_and_input(rows, bias=False)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    torch.testing.assert_close(out.double(), int8_by_hand(weight, x), rtol=8e-3, atol=1e-3)  # bf16's rounding


@needs_int8_dot
def test_a_rows_answer_does_not_depend_on_its_batch_or_on_the_kernel():
    layer, _weight, _bias, x = layer_and_input(INT8_FEW_ROWS + 3)
    many = layer(x)  # torch._int_mm
    few = layer(x[:4])  # fbgemm
    alone = torch.cat([layer(x[i:i + 1]) for i in range(4)])
    assert torch.equal(few, alone)
    assert torch.equal(many[:4], few)
    # the outlier in row 0 coarsened row 0 only: every other row is as close to the float product as usual
    exact = x.float() @ layer_and_input(1)[1].float().T + layer_and_input(1)[2].float()
    error = ((many.float() - exact).norm(dim=1) / exact.norm(dim=1))
    assert error[1:].max() < 0.02, error
    assert error[0] > error[1:].max()


@needs_int8_dot
def test_a_batch_of_several_tokens_per_row_keeps_its_shape():
    layer, _weight, _bias, x = layer_and_input(6)
    out = layer(x.view(2, 3, 160))
    assert out.shape == (2, 3, 96)
    assert torch.equal(out.view(6, 96), layer(x))


@pytest.fixture(scope="module")
def smollm2_bf16():
    """SmolLM2 with int8 products in every layer but the output: its layers are below INT8_MIN_WEIGHTS, so
    by default they stay bf16 (test below); the default model's are all above it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "INT8_MIN_WEIGHTS", 0)
        return Llama.build(resolve_model("smollm2-135m"), max_seq_len=256, max_batch_size=4, device="cpu",
                           dtype="bf16")


def int8_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, W8A8Linear)]


@needs_int8_dot
def test_bf16_on_a_cpu_uses_int8_products_for_every_big_layer_but_the_output(smollm2_bf16):
    model = smollm2_bf16.model
    assert len(int8_layers(model)) == 4 * model.params.n_layers  # wqkv, wo, w13, w2 (fused where they can be)
    assert not isinstance(model.output, W8A8Linear)
    for kwargs in ({}, {"int8_dot": False}):  # too small to gain; or turned off
        plain = Llama.build(resolve_model("smollm2-135m"), max_seq_len=64, max_batch_size=1, device="cpu",
                            dtype="bf16", **kwargs)
        assert int8_layers(plain.model) == []


@needs_int8_dot
def test_int8_products_predict_the_tokens_bf16_predicts(smollm2_bf16):
    llama = smollm2_bf16
    text = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
            "The function above returns the n-th Fibonacci number by keeping the last two values.")
    tokens = torch.tensor([llama.tokenizer.encode(text, bos=False, eos=False)])
    plain = Llama.build(resolve_model("smollm2-135m"), max_seq_len=256, max_batch_size=1, device="cpu",
                        dtype="bf16", packed=False)
    with torch.no_grad():
        ours = llama.model.forward(tokens, 0)[0].float()
        theirs = plain.model.forward(tokens, 0)[0].float()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


@needs_int8_dot
def test_the_engine_answers_right_with_int8_products(smollm2_bf16):
    """(Token-for-token equality with generate() is tested in fp32: in bf16, chunked and whole prefills round
    differently, with int8 products or without.)"""
    llama = smollm2_bf16
    questions = ["What is 2+2? Answer with one number.", "What is the capital of France? Answer with one word."]
    prompts = [llama.tokenizer.encode(llama.render_chat([{"role": "user", "content": q}]), bos=False, eos=False)
               for q in questions]
    jobs = Engine(llama.model, llama.tokenizer, prefill_chunk=16).run([Job(p, 16) for p in prompts])
    answers = [llama.tokenizer.decode(job.tokens) for job in jobs]
    assert "4" in answers[0] and "Paris" in answers[1], answers
