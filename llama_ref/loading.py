"""Build a model from a checkpoint: pick the device and dtype, check that weights and KV cache fit
there before anything is allocated, then stream the weights in one tensor at a time.

The upstream reference loads every shard into memory at once on a hard-coded CUDA device and learns
about memory by running out of it; here a model that can't fit is refused with the ways out named.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama_ref.checkpoints import Checkpoint, CheckpointError, open_checkpoint
from llama_ref.device import check_fits, pick_device, pick_dtype
from llama_ref.model import ModelArgs, Transformer
from llama_ref.quantize import (Int8Linear, block_linears, int8_dot_available, int8_linears, pack_linears,
                                quantize_linears)


def load_model(model_path: str | Path, max_seq_len: int, max_batch_size: int, device: str | None = None,
               dtype: str | torch.dtype | None = None, int8: bool = False, packed: bool = True,
               int8_dot: bool = True):
    """(model, tokenizer, chat template or None) for the checkpoint at `model_path`, on one device,
    with its KV cache set up. Raises CheckpointError, DeviceError or TokenizerError.

    With `packed`, bf16 linear layers on a CPU are laid out for speed. With `int8_dot` too, on a CPU whose
    int8 kernels are exact (quantize.int8_dot_available), every linear layer but the output and those too
    small to gain multiplies int8 weights by int8 activations (quantize.W8A8Linear: about twice as fast,
    results within what the 4-bit copies change). Otherwise each weight is held in oneDNN's layout, and those
    that were 4-bit in a GGUF are also kept packed in 4 bits, which decode steps read instead
    (quantize.PackedLinear)."""
    device = pick_device(device)  # a mistyped device or dtype is reported before a slow load
    dtype = pick_dtype(dtype, device)
    checkpoint = open_checkpoint(model_path)
    args = checkpoint.args
    max_seq_len = min(max_seq_len, args.context_length)  # positions past the trained context are noise
    cache_dtype = kv_cache_dtype(args, max_batch_size, max_seq_len, dtype, device)
    check_fits(weight_bytes(checkpoint, dtype, int8), cache_bytes(args, max_batch_size, max_seq_len, cache_dtype),
               device, quantized=int8)

    # Build on the meta device (no memory), then allocate once on the target device and stream
    # the checkpoint's tensors in one at a time: never two full copies of the weights.
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        if int8:
            quantize_linears(model, skip=("output",) if args.tie_embeddings else ())
    model = model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    _load_weights(model, checkpoint)
    if packed and not int8 and device.type == "cpu" and dtype == torch.bfloat16:
        if int8_dot and int8_dot_available():
            int8_linears(model, skip=("output",))  # the layers big enough to gain; the others as below
        if checkpoint.read_int4 is not None:
            pack_linears(model, checkpoint.int4_groups)
        block_linears(model, int8_copies=int8_dot)
    model.setup_caches(max_batch_size, max_seq_len, dtype=cache_dtype, device=device)
    model.eval()
    # Only the tokenizer and template outlive the load: the checkpoint holds the file's mapping, and
    # its pages would stay resident beside the weights they were copied into.
    return model, checkpoint.tokenizer, checkpoint.chat_template


def _load_weights(model: Transformer, checkpoint: Checkpoint) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    missing = {name for name in params if not (name == "output.weight" and model.params.tie_embeddings)}
    missing |= {f"{name}.weight" for name, m in modules.items() if isinstance(m, Int8Linear)}
    for name, tensor in checkpoint.tensors(model.norm.weight.dtype):
        owner = modules.get(name.rsplit(".", 1)[0])
        if isinstance(owner, Int8Linear) and name.endswith(".weight"):
            owner.load_float_weight(tensor)
        elif name in params:
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{checkpoint.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(params[name].shape)}; the file does not match its own header")
            with torch.no_grad():
                params[name].copy_(tensor)
        else:
            continue  # tensors we don't use, e.g. precomputed rotary tables
        missing.discard(name)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing tensors {', '.join(sorted(missing)[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete")


def weight_bytes(checkpoint: Checkpoint, dtype: torch.dtype, int8: bool) -> int:
    element = torch.finfo(dtype).bits // 8
    total = 0
    for name, shape in checkpoint.tensor_shapes.items():
        count = 1
        for size in shape:
            count *= size
        is_linear = len(shape) == 2 and "tok_embeddings" not in name
        total += count * (1 if int8 and is_linear else element)
    return total


# A KV cache that holds at most this much in fp32 is kept in fp32 on a CPU, whatever the weights' dtype: the
# attention of a one-token step over it is then one SDPA call. In bf16 the same step took two matmuls, each of
# which cost oneDNN a new setup for every new length (stories15M's shape, 2 threads, torch 2.13: 30-60 us each
# in bf16, against 14 us for SDPA in fp32 over the whole step), and SDPA itself is slower in bf16.
SMALL_CACHE_BYTES = 64 << 20


def kv_cache_dtype(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: fp32 for a small cache on a CPU (SMALL_CACHE_BYTES), else the model's dtype."""
    small = cache_bytes(args, batch, seq_len, torch.float32) <= SMALL_CACHE_BYTES
    return torch.float32 if device.type == "cpu" and small else dtype


def cache_bytes(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    element = torch.finfo(dtype).bits // 8
    return 2 * args.n_layers * batch * seq_len * args.n_kv_heads * args.head_dim * element
