import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference

from llama_ref import quants
from llama_ref.quants import dequantize

# byte offsets of the fp16 scale fields in each block (ggml block layouts)
FP16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def random_blocks(qtype, rows, blocks_per_row, seed=0):
    """Random quantised rows whose fp16 fields are finite, as the reader hands them over: (rows, bytes)."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        raw[:, at : at + 2] = rng.normal(0, 0.1, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", list(FP16_FIELDS), ids=lambda q: q.name)
def test_quantised_types_match_the_gguf_library(qtype):
    raw = random_blocks(qtype, rows=1, blocks_per_row=64)
    expected = torch.from_numpy(reference(raw, qtype)).reshape(-1)
    ours = dequantize(raw, qtype, (expected.numel(),))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "qtype, array",
    [  # in the dtypes GGUFReader gives each
        pytest.param(Q.F32, np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32), id="F32"),
        pytest.param(Q.F16, np.random.default_rng(2).normal(size=(3, 40)).astype(np.float16), id="F16"),
        pytest.param(Q.BF16, np.random.default_rng(3).integers(0, 256, (3, 80), dtype=np.uint8), id="BF16"),
    ],
)
def test_float_types_match_the_gguf_library(qtype, array):
    expected = torch.from_numpy(reference(array, qtype)).reshape(3, 40)
    torch.testing.assert_close(dequantize(array, qtype, (3, 40)), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda q: q.name)
def test_rows_spanning_several_chunks_keep_their_shape(monkeypatch, qtype):
    block_size = GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 3 * block_size)  # chunks that straddle rows
    raw = random_blocks(qtype, rows=5, blocks_per_row=4, seed=4)
    expected = torch.from_numpy(reference(raw, qtype))
    ours = dequantize(raw, qtype, (5, 4 * block_size))
    assert ours.shape == (5, 4 * block_size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_bf16_output_rounds_the_float32_values():
    raw = random_blocks(Q.Q4_K, rows=2, blocks_per_row=2, seed=5)
    expected = torch.from_numpy(reference(raw, Q.Q4_K)).to(torch.bfloat16)
    ours = dequantize(raw, Q.Q4_K, (2, 512), torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, expected)


def test_bf16_to_bf16_keeps_the_raw_bits():
    bits = np.array([0x3F80, 0x7FC1, 0xFF81, 0x0001], dtype=np.uint16)  # 1.0, two NaN payloads, a subnormal
    ours = dequantize(bits.view(np.int16), Q.BF16, (4,), torch.bfloat16)
    assert ours.view(torch.int16).numpy().view(np.uint16).tolist() == bits.tolist()


def test_result_is_a_copy_of_read_only_data():
    array = np.arange(8, dtype=np.float32)
    array.flags.writeable = False
    ours = dequantize(array, Q.F32, (2, 4))
    ours += 1
    assert array.tolist() == list(range(8))


def test_unsupported_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"IQ2_XXS.*supported: .*Q4_K"):
        dequantize(np.zeros(66, dtype=np.uint8), Q.IQ2_XXS, (256,))


def test_byte_count_must_match_the_shape():
    with pytest.raises(ValueError, match="shape"):
        dequantize(random_blocks(Q.Q8_0, rows=1, blocks_per_row=2), Q.Q8_0, (96,))


def test_callers_thread_count_is_left_alone():
    threads = torch.get_num_threads()
    dequantize(random_blocks(Q.Q4_K, rows=1, blocks_per_row=1), Q.Q4_K, (256,))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("qtype", quants.FOUR_BIT, ids=lambda q: q.name)
def test_four_bit_groups_rebuild_the_reference_values_exactly(qtype):
    block_size = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, rows=3, blocks_per_row=512 // block_size, seed=4)
    expected = torch.from_numpy(reference(raw, qtype)).reshape(3, 512)
    q, scale, low = quants.int4_groups(raw, qtype, (3, 512))
    assert q.shape == (3, 512) and scale.shape == low.shape == (3, 16)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    rebuilt = q.view(3, 16, 32).float() * scale[..., None] + low[..., None]
    torch.testing.assert_close(rebuilt.view(3, 512), expected, rtol=0, atol=0)


def test_four_bit_groups_refuse_other_types():
    with pytest.raises(ValueError, match="Q6_K is not a 4-bit type; 4-bit types: Q4_0, Q4_1, Q4_K"):
        quants.int4_groups(random_blocks(Q.Q6_K, 1, 1), Q.Q6_K, (256,))
