"""How layers hold their weights: the modules behind each kernel of kernels.py's table.

Int8Linear (int8-weights): each output row stored as int8 with one fp scale, times float activations.
Int8Embedding: the same rows for a token table, widened to the model's dtype as they are looked up.
Int8DotLinear (w8a8, w7a8): int8 weights times activations rounded per token at each call: integer dot
products at several times fp32's rate, from a quarter of its bytes.
BlockedLinear, PackedLinear (bf16-blocked): bf16 weights in oneDNN's layout, small ones with int8 copies for
one-row calls, and 4-bit copies of a GGUF's 4-bit weights for decode steps.

The int8 modules are built empty (on the meta device, at load) and filled by load_float_weight(weight), one
tensor at a time, so no float copy of the model exists at any point of a load.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from llama_ref.quants import GROUP  # values per (scale, min) group of GGUF's Q4_0, Q4_1 and Q4_K blocks


def int8_rows(
    weight, slice_rows: int = 256, limit: int = 127, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): each row of a float weight (out, in) as int8 in -limit..limit times one fp32 scale (its max
    |w| / limit). Rounded slice_rows rows at a time, in place in a copy of each slice: never an fp32 copy of the
    whole weight. `weight` is a tensor or a checkpoint's Rows, read a slice at a time; `out` (int8, at least as
    wide as the weight, on its device) receives q in its first columns."""
    rows, columns = weight.shape
    device = out.device if out is not None else getattr(weight, "device", torch.device("cpu"))
    scales = torch.empty(rows, dtype=torch.float32, device=device)
    q = torch.empty(weight.shape, dtype=torch.int8, device=device) if out is None else out
    for start in range(0, rows, slice_rows):
        part = weight[start : start + slice_rows].detach().to(device, torch.float32, copy=True)
        scale = scales[start : start + slice_rows]
        torch.amax(part.abs(), dim=1, out=scale)
        scale.clamp_(min=1e-8).div_(limit)
        part.div_(scale[:, None]).round_().clamp_(-limit, limit)
        q[start : start + slice_rows, :columns] = part
    return q[:, :columns], scales


class Int8Linear(nn.Module):
    """int8 weights (one scale per output row) times activations in the model's dtype."""

    weight: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        # Qwen2's q/k/v biases stay in the model dtype: they are a few thousand numbers
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load_float_weight(self, weight) -> None:
        _q, scales = int8_rows(weight, out=self.weight)
        self.scales.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows <= INT8_COPY_MAX_ROWS and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            # reads the int8 weight as it is, where widening it would write a float copy first; for more rows
            # the kernel is many times slower than widening (benchmarks/results/kernels_avx2.md)
            flat = x.reshape(rows, self.in_features).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias


class Int8Embedding(nn.Module):
    """A token table held as int8 rows with one scale each; looked-up rows come back in `dtype`."""

    weight: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, 1, dtype=torch.float32, device=device))
        self.dtype = dtype or torch.get_default_dtype()

    @torch.no_grad()
    def load_float_weight(self, weight) -> None:
        _q, scales = int8_rows(weight, out=self.weight)
        self.scales.copy_(scales[:, None])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (F.embedding(tokens, self.weight).float() * F.embedding(tokens, self.scales)).to(self.dtype)


def _children(model: nn.Module):
    """(parent, attribute name, full name, module) for every submodule, listed before any is replaced."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            yield module, child_name, f"{name}.{child_name}" if name else child_name, child


# ---------------------------------------------------------------------------- bf16 weights in oneDNN's layout

# F.linear on a bf16 CPU tensor hands the weight to oneDNN, which reorders it into its blocked layout on
# every call: for the few rows of a decode step that copy costs more than the multiplication. Reordered once
# at load, decode-sized calls read the weights faster and prefill-sized ones no slower.


def can_block(linear: nn.Module) -> bool:
    """Whether this layer's weight can live in oneDNN's layout: bf16 on a CPU whose oneDNN does bf16."""
    from llama_ref.kernels import onednn_bf16

    return (
        isinstance(linear, nn.Linear)
        and linear.weight is not None
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.bfloat16
        and onednn_bf16()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _blocked(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only tunes the layout; the reordered weight serves any number of rows.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


# torch.compile can't lower this call (its lowering wants the weight frozen into the graph): compiled steps
# (Transformer.compile_steps) run it as it is, between compiled parts
@torch.compiler.disable
def _blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


# Small layers also keep an int8 copy (one scale per output row) for calls of one or two rows, which torch's
# weight-only int8 kernel (_weight_int8pack_mm: bf16 activations times int8 weights) multiplies with less
# fixed cost per call than oneDNN, from half the bytes. A decode step of a small model is mostly that fixed
# cost, and its int8 weights stay in the caches where bf16 ones are evicted. For bigger layers the kernel is
# no faster than oneDNN, so layers of more than INT8_COPY_MAX_WEIGHTS weights don't get one: the output
# layers of SmolLM2 and of Qwen2.5-Coder-1.5B.
INT8_COPY_MAX_ROWS = 2
INT8_COPY_MAX_WEIGHTS = 2**24


class BlockedLinear(nn.Module):
    """A bf16 linear layer on a CPU whose weight is held in oneDNN's blocked layout (opaque: no `weight`), with
    an int8 copy for calls of at most INT8_COPY_MAX_ROWS rows if int8_copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8_copy: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("blocked", _blocked(weight), persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        q, scales = int8_rows(weight) if int8_copy else (None, None)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer(
            "q_scales",
            None if scales is None else scales.to(weight.dtype),  # the kernel's dtype
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.q is None or rows > INT8_COPY_MAX_ROWS:
            return _blocked_linear(x, self.blocked, self.bias)
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features), self.q, self.q_scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def can_copy_int8(out_features: int, in_features: int) -> bool:
    """Whether a bf16 CPU layer of this shape gets an int8 copy (BlockedLinear): small enough, and a torch
    with the kernel."""
    return out_features * in_features <= INT8_COPY_MAX_WEIGHTS and hasattr(torch.ops.aten, "_weight_int8pack_mm")


# ---------------------------------------------------------------------------- 4-bit copies for decoding

# A decode step multiplies a few rows by every weight, so it is bound by how many weight bytes it reads.
# torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) reads half a byte per weight instead of bf16's two,
# which wins against the same weights in oneDNN's layout (above) for a few rows and loses from about eight. So
# layers keep their bf16 weight for larger calls (prefill above all, where the 4-bit kernel is many times
# slower) and use the 4-bit copy for calls of at most PACKED_MAX_ROWS rows.
PACKED_MAX_ROWS = 4


class PackedLinear(nn.Linear):
    """An nn.Linear that also holds its weight as 4-bit groups packed for torch's CPU int4 kernel.

    Only for weights that were 4-bit in the checkpoint (GGUF Q4_0, Q4_1, Q4_K): each group of 32 values
    is q * scale + min with q in 0..15, which the kernel computes as (q - 8) * scale + zero with
    zero = min + 8 * scale. So the packed copy holds the file's own values, not a second rounding of them.
    Calls of more rows use the bf16 weight, or, once block() has run, the same weight in oneDNN's layout.
    """

    def attach(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        """Pack q (out, in) uint8 and scale, min (out, in / GROUP) next to the weight."""
        dtype = self.weight.dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        # the kernel wants (in / GROUP, out, 2): each group's scale and zero, in the activations' dtype
        scales_zeros = torch.stack([scale.float().t(), (low.float() + 8 * scale.float()).t()], dim=-1)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.to(dtype).contiguous(), persistent=False)

    def block(self) -> None:
        """Swap the bf16 weight for the same values in oneDNN's layout (see BlockedLinear)."""
        self.register_buffer("blocked", _blocked(self.weight), persistent=False)
        self.weight = None  # type: ignore[assignment]  # nn.Linear's weight is a Tensor; forward() checks for None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > PACKED_MAX_ROWS or getattr(self, "packed", None) is None:
            if self.weight is None:  # block() moved it
                return _blocked_linear(x, self.blocked, self.bias)
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, x.shape[-1]), self.packed, GROUP, self.scales_zeros
        )
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def can_pack(linear: nn.Module) -> bool:
    """Whether torch's CPU int4 kernel takes this layer's shape and dtype."""
    return (
        type(linear) is nn.Linear
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.bfloat16
        and linear.out_features % 16 == 0
        and linear.in_features % (2 * 16) == 0
        and linear.in_features % GROUP == 0
    )


def pack_linears(model: nn.Module, read_int4) -> int:
    """Give every bf16 CPU linear layer whose weight was 4-bit in the checkpoint a packed copy for decoding
    (read_int4(name) -> (q, scale, min) or None). Returns how many layers got one."""
    packed = 0
    for parent, attribute, full_name, child in list(_children(model)):
        groups = read_int4(f"{full_name}.weight") if can_pack(child) else None
        if groups is None:
            continue
        layer = PackedLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        layer.weight, layer.bias = child.weight, child.bias
        layer.attach(*groups)
        setattr(parent, attribute, layer)
        packed += 1
    return packed


# Layers that read the same input, fused into one call where all of them are plain bf16 layers: a decode step of
# a small model is mostly the fixed cost of each call (stories15M's shape: 43 calls a token; 25 fused).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def block_linears(model: nn.Module, int8_copies: bool = True) -> int:
    """Hold every bf16 CPU linear layer's weight in oneDNN's layout (BlockedLinear, PackedLinear.block),
    fusing the layers of FUSED where a module has a slot for them; with int8_copies, those small enough
    (can_copy_int8) and without 4-bit copies also get int8 copies. A weight shared with another module (tied
    embeddings) is copied, not moved: the embedding keeps reading rows of the plain one. Returns how many
    layers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, PackedLinear) and can_block(module):
            module.block()  # in place: the module stays where it is
            changed += 1

    def make(weight, bias):
        return BlockedLinear(weight, bias, int8_copy=int8_copies and can_copy_int8(*weight.shape))

    return changed + _convert(model, make, lambda layer: type(layer) is nn.Linear and can_block(layer))


def _convert(model: nn.Module, make, convertible) -> int:
    """Swap each linear layer for which convertible(layer) holds for make(weight, bias), first fusing the layers
    of FUSED where a module has a slot for them and all are convertible. Returns how many layers changed.
    Modules are looked up by name as it goes: a list of them would keep every replaced weight alive until the
    end (at load, a second copy of the model's weights at the peak)."""
    changed = 0
    for prefix in [name for name, module in model.named_modules() if any(hasattr(module, f) for f in FUSED)]:
        module = model.get_submodule(prefix)
        for fused, names in FUSED.items():
            if not hasattr(module, fused):
                continue
            found = (getattr(module, name, None) for name in names)
            parts = [part for part in found if part is not None and convertible(part)]
            if len(parts) < len(names):
                continue  # one is missing or not convertible: they stay as they are
            biases = [part.bias for part in parts]
            if any(b is None for b in biases) != all(b is None for b in biases):
                continue  # some with a bias, some without: they stay separate
            bias = None if biases[0] is None else torch.cat(biases)
            weight = torch.cat([part.weight for part in parts])
            del parts
            for name in names:
                setattr(module, name, None)
            setattr(module, fused, make(weight, bias))
            del weight, bias, biases
            changed += len(names)
    for full_name in [name for name, _ in model.named_modules()]:
        parent_name, _, attribute = full_name.rpartition(".")
        child = model.get_submodule(full_name)
        if convertible(child):
            setattr(model.get_submodule(parent_name), attribute, make(child.weight, child.bias))
            changed += 1
        del child
    return changed


# ---------------------------------------------------------------------------- int8 weights and activations

# Int8DotLinear holds each weight as int8 with one scale per output row and, at every call, rounds each input
# row to int8 with a scale of its own (max |x| / 127). A row's result then depends on that row alone, whatever
# else is in the batch and whichever kernel runs:
# - fbgemm, for calls of a few rows, through the op that takes activations already rounded with a given
#   scale and zero point (torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32): scale 1 and zero
#   point 128, so it multiplies exactly our integers, and returns fp32 products times the weights' scales.
# - torch._int_mm (oneDNN) for larger calls, where it is faster than fbgemm (int_mm: on exact int8 CPUs).
# Weights take 8 bits (-127..127) where the CPU adds int8 products exactly (VNNI, kernels.int8_exact). On AVX2,
# fbgemm multiplies u8 activations by s8 weights with vpmaddubsw, which adds each pair of products in 16 bits
# and saturates above 32767: 255 * 127 * 2 does. With 7-bit weights (-63..63) a pair is at most 255 * 63 * 2 =
# 32130, so the sums are exact again. 7-bit activations would do the same, but lose more of the model's next-token
# agreement with fp32 (benchmarks/results/README.md).
INT8_FEW_ROWS = 48  # calls of at most this many rows go to fbgemm where torch._int_mm serves the rest
FBGEMM_LINEAR = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)


class Int8DotLinear(nn.Module):
    """A linear layer on a CPU with weights of `weight_bits` bits (one scale per output row) in int8, times int8
    activations rounded per token at each call; returns the input's dtype. Build it empty and
    load_float_weight(), or from_float(weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        weight_bits: int = 8,
        int_mm: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.int_mm = weight_bits, int_mm
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.fbgemm = None  # fbgemm's own packed copy of the weight
        self.register_buffer("q", None, persistent=False)  # (out, in), for torch._int_mm (int_mm only)
        self.register_buffer("scales", None, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> Int8DotLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, dtype=weight.dtype, **kwargs)
        layer.load_float_weight(weight)
        if bias is not None:
            assert layer.bias is not None  # built with a bias, since `bias` was given
            layer.bias.data = bias.detach().clone()
        return layer

    @torch.no_grad()
    def load_float_weight(self, weight) -> None:
        q, scales = int8_rows(weight, limit=2 ** (self.weight_bits - 1) - 1)
        with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors will go; kernels.py checks
            warnings.simplefilter("ignore")  # for them, so a torch without them takes another kernel
            qweight = torch._make_per_channel_quantized_tensor(
                q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0
            )
            self.fbgemm = torch.ops.quantized.linear_prepack(qweight, None)
        self.scales = scales
        self.q = q if self.int_mm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        flat = x.reshape(-1, k).float()
        rows = flat.shape[0]
        step = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
        rounded = (flat / step).round_()  # within ±127: step is max |x| / 127
        if self.q is None or rows <= INT8_FEW_ROWS:
            assert FBGEMM_LINEAR is not None  # kernels.py offers w8a8 and w7a8 only with a torch that has it
            out = FBGEMM_LINEAR(rounded, 1.0, 128, self.fbgemm)  # = products * weight scales
        else:
            out = torch._int_mm(rounded.to(torch.int8), self.q.t()).float()
            out.mul_(self.scales)
        # in place: a new output-sized tensor per operation costs more than the operation (page faults)
        out = out.mul_(step).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias
