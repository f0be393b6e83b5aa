"""The bf16-blocked kernel: bf16 weights in oneDNN's layout (quantize.BlockedLinear), with 4-bit copies of
4-bit GGUF weights for decode steps (quantize.PackedLinear): the same values as the bf16 weights they sit
beside, used for few rows only. It needs a CPU whose oneDNN does bf16; tests/test_kernels.py covers what other
CPUs run instead."""

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from tiny_checkpoints import make_tiny_model, write_gguf  # noqa: E402

from llama_ref import Llama  # noqa: E402
from llama_ref.kernels import onednn_bf16  # noqa: E402
from llama_ref.quantize import PACKED_MAX_ROWS, PackedLinear  # noqa: E402

needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_bf16(),
    reason="bf16-blocked needs oneDNN's bf16 (AVX512BW/VL/DQ or AVX-NE-CONVERT), which this CPU lacks",
)


def packed_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, PackedLinear)]


@pytest.fixture(scope="module", params=[Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def gguf_path(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param.name)
    return write_gguf(make_tiny_model(directory), directory / "tiny.gguf", request.param)


def decode_logits(llama, prompt, rows):
    """Prefill `prompt` into `rows` cache rows, then the logits of one decode step for all of them."""
    model = llama.model
    tokens = torch.tensor([prompt] * rows)
    model.forward(tokens[:, :-1], 0)
    return model.forward(tokens[:, -1:], len(prompt) - 1)[:, -1]


@needs_onednn_bf16
def test_every_four_bit_matrix_gets_a_packed_copy_in_bf16_on_cpu(gguf_path):
    llama = Llama.build(gguf_path, max_seq_len=64, max_batch_size=2, device="cpu", dtype="bf16", kernels="bf16-blocked")
    # 7 matrices in each of 2 layers, and the output matrix
    assert len(packed_layers(llama.model)) == 15
    plain = Llama.build(gguf_path, max_seq_len=64, max_batch_size=2, device="cpu", dtype="bf16", kernels="float")
    assert packed_layers(plain.model) == []


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
def test_decode_steps_read_the_files_values(gguf_path, rows):
    """The packed path is as close to the file's exact (fp32) values as the bf16 weights are."""
    prompt = [1, 37, 99, 200, 5, 17, 301, 44]
    exact = decode_logits(
        Llama.build(gguf_path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="fp32", kernels="float"),
        prompt,
        rows,
    )
    bf16 = decode_logits(
        Llama.build(gguf_path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="bf16", kernels="float"),
        prompt,
        rows,
    )
    packed = decode_logits(
        Llama.build(gguf_path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="bf16", kernels="bf16-blocked"),
        prompt,
        rows,
    )
    bf16_error = (bf16 - exact).abs().max().item()
    packed_error = (packed - exact).abs().max().item()
    assert packed_error <= 2 * bf16_error + 1e-3, (packed_error, bf16_error)
    assert packed.argmax(-1).tolist() == exact.argmax(-1).tolist()


def test_packed_linear_uses_the_4_bit_copy_for_few_rows_only():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 96), generator=generator, dtype=torch.uint8)
    scale = torch.rand(64, 3, generator=generator) / 10
    low = -torch.rand(64, 3, generator=generator)
    exact = (q.view(64, 3, 32).float() * scale[..., None] + low[..., None]).view(64, 96)
    layer = PackedLinear(96, 64, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(exact)
    layer.attach(q, scale, low)
    for rows in (1, 3, PACKED_MAX_ROWS):
        x = torch.randn(1, rows, 96, generator=generator).to(torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), x.float() @ exact.T, rtol=2e-2, atol=5e-2)
    # a prefill-sized call goes through the bf16 weight: a packed copy of other values does not show
    layer.attach(torch.zeros_like(q), scale, low)
    x = torch.randn(1, PACKED_MAX_ROWS + 1, 96, generator=generator).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))
    assert not torch.allclose(layer(x[:, :1]).float(), (x[:, :1] @ layer.weight.T).float(), atol=1e-1)


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_a_blocked_layer_multiplies_as_the_plain_one_for_any_number_of_rows(bias):
    from llama_ref.quantize import BlockedLinear

    generator = torch.Generator().manual_seed(1)
    plain = torch.nn.Linear(96, 64, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(64, 96, generator=generator))
    blocked = BlockedLinear(plain.weight, plain.bias)
    for rows in (1, 3, 300):
        x = torch.randn(2, rows, 96, generator=generator).to(torch.bfloat16)
        torch.testing.assert_close(blocked(x), plain(x), rtol=1e-2, atol=1e-2)


@needs_onednn_bf16
def test_a_tied_output_matrix_is_blocked_as_a_copy_and_the_embedding_keeps_its_rows(tmp_path):
    from llama_ref.quantize import BlockedLinear

    gguf_path = write_gguf(make_tiny_model(tmp_path, tie_embeddings=True), tmp_path / "tied.gguf", Q.Q4_0)
    plain = Llama.build(
        gguf_path, max_seq_len=64, max_batch_size=PACKED_MAX_ROWS + 1, device="cpu", dtype="bf16", kernels="float"
    )
    fast = Llama.build(
        gguf_path,
        max_seq_len=64,
        max_batch_size=PACKED_MAX_ROWS + 1,
        device="cpu",
        dtype="bf16",
        kernels="bf16-blocked",
    )
    blocked = [
        name
        for name, m in fast.model.named_modules()
        if isinstance(m, BlockedLinear) or getattr(m, "blocked", None) is not None
    ]
    assert len(blocked) == 15  # every matrix: 7 in each of 2 layers, and the output
    tokens = torch.arange(plain.model.params.vocab_size)[None]
    torch.testing.assert_close(
        fast.model.tok_embeddings(tokens),
        plain.model.tok_embeddings(tokens),
        rtol=0.01,
        atol=0.01 * plain.model.tok_embeddings.weight.abs().max().item(),
    )
    # more rows than the 4-bit copies serve: every matrix, the output's copy too, is the bf16 one reordered
    prompt, rows = [1, 37, 99, 200, 5], PACKED_MAX_ROWS + 1
    torch.testing.assert_close(
        decode_logits(fast, prompt, rows), decode_logits(plain, prompt, rows), rtol=0.02, atol=0.02
    )


@needs_onednn_bf16
def test_plain_bf16_layers_reading_the_same_input_are_fused_into_one_call(tmp_path):
    """A GGUF without 4-bit weights: wq, wk, wv become one blocked layer, and w1, w3 another; every step
    gives the logits the separate layers give."""
    path = write_gguf(make_tiny_model(tmp_path), tmp_path / "f32.gguf")
    rows = 3
    plain = Llama.build(path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="bf16", kernels="float")
    fused = Llama.build(path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="bf16", kernels="bf16-blocked")
    for layer in fused.model.layers:
        assert layer.attention.wqkv is not None and layer.attention.wq is None
        assert layer.feed_forward.w13 is not None and layer.feed_forward.w1 is None
    prompt = [1, 37, 99, 200, 5, 17]
    torch.testing.assert_close(
        decode_logits(fused, prompt, rows), decode_logits(plain, prompt, rows), rtol=0.02, atol=0.02
    )
    # and through generate(): the same greedy tokens
    assert fused.generate([prompt], 12, temperature=0)[0] == plain.generate([prompt], 12, temperature=0)[0]
