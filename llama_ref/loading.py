"""Build a model from a checkpoint: pick the device and dtype, check that weights and KV cache fit
there before anything is allocated, then stream the weights in one tensor at a time.

The upstream reference loads every shard into memory at once on a hard-coded CUDA device and learns
about memory by running out of it; here a model that can't fit is refused with the ways out named.
load_llama() is the way in by name: a catalog name or a checkpoint path, every failure one LlamaRefError.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llama_ref import kernels as kernel_table
from llama_ref.checkpoints import Checkpoint, CheckpointError, Rows, open_checkpoint
from llama_ref.device import check_fits, pick_device, pick_dtype
from llama_ref.kernels import Plan, plan, role
from llama_ref.model import ModelArgs, Transformer, cache_bytes, kv_cache_dtype
from llama_ref.quantize import FUSED, Int8DotLinear, Int8Embedding, Int8Linear, block_linears, pack_linears

# kernels whose modules are filled as the checkpoint's tensors stream in (load_float_weight)
STREAMED = ("int8-weights", "w8a8", "w7a8")


def load_llama(
    model: str | Path | None = None,
    *,
    max_seq_len: int,
    max_batch_size: int,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
    compile: bool = False,
):
    """A Llama for `model`: a catalog name (assembled into the cache on first use) or a checkpoint path;
    default: the catalog's default model. Every way this can fail (an unknown name, a broken file, no room on
    the device, a kernel this machine lacks) raises a LlamaRefError whose str() is one line for the user."""
    from llama_ref.catalog import resolve_model
    from llama_ref.generation import Llama

    return Llama.build(
        resolve_model(model),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        kernels=kernels,
        compile=compile,
    )


def load_model(
    model_path: str | Path,
    max_seq_len: int,
    max_batch_size: int,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
):
    """(model, tokenizer, chat template or None, plan) for the checkpoint at `model_path`, on one device,
    with its KV cache set up. Each layer gets the kernel kernels.plan() picks for this machine and for
    `kernels` (auto: the table's row for this CPU class). Raises a LlamaRefError: CheckpointError,
    DeviceError, KernelError or TokenizerError."""
    torch_device = pick_device(device)  # a mistyped device, dtype or kernel is reported before a slow load
    dtype = pick_dtype(dtype, torch_device)
    layer_plan = plan(torch_device.type, dtype, kernels)
    checkpoint = open_checkpoint(model_path)
    args = checkpoint.args
    max_seq_len = min(max_seq_len, args.context_length)  # positions past the trained context are noise

    # Build on the meta device (no memory) with each layer's kernel in place, then allocate once on the
    # target device and stream the checkpoint's tensors in one at a time; quantized layers take each
    # weight as it comes, so no float copy of them ever exists.
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        targets = place_kernels(model, layer_plan, dtype)
    # a large cache under fp32 activations is bf16 where the layers are quantized anyway (kv_cache_dtype)
    model.compact_kv = torch_device.type == "cpu" and dtype == torch.float32 and layer_plan.quantized()
    cache_dtype = kv_cache_dtype(args, max_batch_size, max_seq_len, dtype, torch_device, model.compact_kv)
    check_fits(
        model_bytes(model),
        cache_bytes(args, max_batch_size, max_seq_len, cache_dtype),
        torch_device,
        quantized=layer_plan.quantized(),
    )
    model = model.to_empty(device=torch_device)
    if args.tie_embeddings and type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding:
        model.output.weight = model.tok_embeddings.weight
    _load_weights(model, checkpoint, targets)
    if "bf16-blocked" in (layer_plan.kernel(kind) for kind in ("linear", "small", "output")):
        # the layers still plain are the table's bf16-blocked ones (a row has no float projections beside them)
        if checkpoint.read_int4 is not None:
            pack_linears(model, checkpoint.int4_groups)
        block_linears(model)
    model.setup_caches(max_batch_size, max_seq_len, dtype=cache_dtype, device=torch_device)
    model.eval()
    release_freed_memory()
    # Only the tokenizer and template outlive the load: the checkpoint holds the file's mapping, and
    # its pages would stay resident beside the weights they were copied into.
    return model, checkpoint.tokenizer, checkpoint.chat_template, layer_plan


@dataclass
class Target:
    """Where a checkpoint tensor goes when its layer was replaced: rows offset..offset+rows of the module at
    `path`, part `part` of `parts` (a fused layer takes its weight once all parts have come)."""

    path: str
    part: int = 0
    parts: int = 1
    offset: int = 0


def place_kernels(model: Transformer, layer_plan: Plan, dtype: torch.dtype) -> dict[str, list[Target]]:
    """Replace (on the meta device) each layer whose kernel is streamed by its empty module, fusing the
    layers of FUSED, and return where each checkpoint tensor of a replaced layer goes."""
    targets: dict[str, list[Target]] = {}
    small_model = is_small(model)

    def make(kernel: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if kernel == "int8-weights":
            return Int8Linear(in_features, out_features, bias, dtype=dtype)
        return Int8DotLinear(
            in_features,
            out_features,
            bias,
            weight_bits=8 if kernel == "w8a8" else 7,
            int_mm=kernel == "w8a8",
            dtype=dtype,
        )

    for prefix, fused, names, parts in list(_fused_groups(model)):
        module = model.get_submodule(prefix)
        rows = sum(part.out_features for part in parts)
        kernel = layer_plan.kernel(role(prefix, rows * parts[0].in_features))
        if kernel not in STREAMED:
            continue
        setattr(module, fused, make(kernel, parts[0].in_features, rows, parts[0].bias is not None))
        offset = 0
        for index, (name, part) in enumerate(zip(names, parts)):
            for tensor in ("weight", "bias") if part.bias is not None else ("weight",):
                targets[f"{prefix}.{name}.{tensor}"] = [Target(f"{prefix}.{fused}", index, len(names), offset)]
            offset += part.out_features
            setattr(module, name, None)
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear:
            continue
        kernel = layer_plan.kernel(role(name, layer.in_features * layer.out_features, small_model))
        if kernel in STREAMED:
            parent, _, attribute = name.rpartition(".")
            setattr(
                model.get_submodule(parent),
                attribute,
                make(kernel, layer.in_features, layer.out_features, layer.bias is not None),
            )
            targets[f"{name}.weight"] = [Target(name)]
            if layer.bias is not None:
                targets[f"{name}.bias"] = [Target(name)]
    args = model.params
    if layer_plan.kernel(role("embedding", args.vocab_size * args.dim)) == "int8-weights":
        model.tok_embeddings = Int8Embedding(args.vocab_size, args.dim, dtype=dtype)
        targets["tok_embeddings.weight"] = [Target("tok_embeddings")]
    if model.params.tie_embeddings:  # the file has no output.weight: the embedding's rows are its rows
        if type(model.output) is not nn.Linear:
            targets.setdefault("tok_embeddings.weight", []).extend(targets.pop("output.weight"))
        elif type(model.tok_embeddings) is not nn.Embedding:
            model.output.weight = nn.Parameter(torch.empty_like(model.output.weight))  # its own, not shared
            targets["tok_embeddings.weight"].append(Target("output"))
    return targets


def _fused_groups(model: nn.Module):
    """(prefix, names, parts) of each group of FUSED layers in `model` that are all still nn.Linear."""
    for prefix, module in model.named_modules():
        for fused, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if hasattr(module, fused) and all(type(part) is nn.Linear for part in parts):
                yield prefix, fused, names, parts


def is_small(model: nn.Module) -> bool:
    """No projection of `model` (a fused group counted once) reaches kernels.SMALL_WEIGHTS."""
    sizes = [sum(part.weight.numel() for part in parts) for _, _, _, parts in _fused_groups(model)]
    sizes += [
        layer.weight.numel()
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear) and name != "output"
    ]
    return max(sizes, default=0) < kernel_table.SMALL_WEIGHTS


def layer_counts(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(layers, weights) of each role (kernels.ROLES) in a model of this shape; a fused group's parts take the
    group's role, as place_kernels gives it."""
    with torch.device("meta"):
        model = Transformer(args)
    counts: dict[str, tuple[int, int]] = {
        role("embedding", args.vocab_size * args.dim): (1, args.vocab_size * args.dim)
    }
    grouped: dict[str, str] = {}
    for prefix, _, names, parts in _fused_groups(model):
        weights = sum(part.weight.numel() for part in parts)
        grouped.update({f"{prefix}.{name}": role(prefix, weights) for name in names})
    small_model = is_small(model)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            kind = grouped.get(name) or role(name, layer.weight.numel(), small_model)
            layers, weights = counts.get(kind, (0, 0))
            counts[kind] = (layers + 1, weights + layer.weight.numel())
    return counts


def _load_weights(model: Transformer, checkpoint: Checkpoint, targets: dict[str, list[Target]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = {name for name in params if not (name == "output.weight" and model.params.tie_embeddings)}
    missing -= {name for name in params if name.rsplit(".", 1)[0] in {t.path for ts in targets.values() for t in ts}}
    missing |= set(targets)
    pending: dict[str, list] = {}  # a fused layer's parts that have come so far
    # a large matrix that only quantized layers take is read a slice of rows at a time: never whole in float
    by_rows = frozenset(
        name
        for name, ts in targets.items()
        if name in checkpoint.tensor_shapes
        and _numel(checkpoint.tensor_shapes[name]) >= ROWS_AT_A_TIME
        and all(t.parts == 1 and type(model.get_submodule(t.path)) is not nn.Linear for t in ts)
    )
    for name, tensor in checkpoint.tensors(model.norm.weight.dtype, by_rows):
        if name in targets:
            for target in targets[name]:
                _load_into(model, checkpoint, name, tensor, target, pending)
        elif name in params:
            assert isinstance(tensor, torch.Tensor)  # only tensors that go to targets come as Rows (by_rows)
            _check_shape(checkpoint, name, tensor, params[name].shape)
            with torch.no_grad():
                params[name].copy_(tensor)
        else:
            continue  # tensors we don't use, e.g. precomputed rotary tables
        missing.discard(name)
    if missing:
        raise CheckpointError(
            f"{checkpoint.path}: missing tensors {', '.join(sorted(missing)[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete"
        )


# Matrices of at least this many weights are read by rows (Checkpoint.tensors' by_rows): the output and embedding
# matrices of a large vocabulary, whose fp32 copy was most of a load's peak memory
ROWS_AT_A_TIME = 2**25


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _load_into(
    model: Transformer,
    checkpoint: Checkpoint,
    name: str,
    tensor: torch.Tensor | Rows,
    target: Target,
    pending: dict,
) -> None:
    module = model.get_submodule(target.path)
    if name.endswith(".bias"):
        bias = module.bias
        assert isinstance(bias, torch.Tensor) and isinstance(tensor, torch.Tensor)  # a bias is never read by rows
        with torch.no_grad():
            bias[target.offset : target.offset + tensor.shape[0]].copy_(tensor)
        return
    if type(module) is nn.Linear:  # a tied output that keeps floats beside a quantized embedding
        assert isinstance(tensor, torch.Tensor)  # by_rows leaves out what a plain nn.Linear takes
        with torch.no_grad():
            module.weight.copy_(tensor)
        return
    assert isinstance(module, (Int8Linear, Int8DotLinear, Int8Embedding))  # what place_kernels put there
    parts = pending.setdefault(target.path, [None] * target.parts)
    parts[target.part] = tensor
    if any(part is None for part in parts):
        return
    del pending[target.path]
    weight = parts[0] if len(parts) == 1 else torch.cat(parts)  # a Rows (by_rows) comes alone
    parts.clear()
    if isinstance(module, Int8Embedding):
        expected = tuple(module.weight.shape)
    else:
        expected = (module.out_features, module.in_features)
    _check_shape(checkpoint, name, weight, expected)
    module.load_float_weight(weight)


def _check_shape(checkpoint: Checkpoint, name: str, tensor: torch.Tensor | Rows, expected) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            f"{checkpoint.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}; "
            "the file does not match its own header"
        )


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). A load frees
    many small temporaries in pieces that glibc keeps, and they would stay in the process's RSS."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a libc without malloc_trim (musl)
        pass


def model_bytes(model: Transformer) -> int:
    """What the model's weights will take once loaded (built on the meta device: nothing is allocated)."""
    total = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    for layer in model.modules():
        if isinstance(layer, Int8DotLinear):  # fbgemm's packed copy, and torch._int_mm's
            total += layer.in_features * layer.out_features * (2 if layer.int_mm else 1)
    return total
