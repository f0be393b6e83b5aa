"""Weight-only quantisation of linear layers.

Int8Linear: each output row stored as int8 with one fp scale. Halves bf16 weight memory (a quarter
of fp32) at a small accuracy cost; activations stay in the model dtype, so no int8 kernels are needed.
PackedLinear: a bf16 layer that also keeps a GGUF's 4-bit weights packed, for decode steps.
BlockedLinear: a bf16 layer on a CPU whose weight oneDNN reordered once, at load, instead of at every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_ref.quants import GROUP  # values per (scale, min) group of GGUF's Q4_0, Q4_1 and Q4_K blocks


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        # Qwen2's q/k/v biases stay in the model dtype: they are a few thousand numbers
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        weight = weight.to(self.weight.device, torch.float32)
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.scales.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias


def _children(model: nn.Module):
    """(parent, attribute name, full name, module) for every submodule, listed before any is replaced."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Swap every nn.Linear (except those named in skip) for an empty Int8Linear, in place."""
    for parent, attribute, full_name, child in list(_children(model)):
        if isinstance(child, nn.Linear) and full_name not in skip:
            setattr(parent, attribute, Int8Linear(child.in_features, child.out_features, child.bias is not None,
                                                  dtype=child.weight.dtype, device=child.weight.device))


# ---------------------------------------------------------------------------- bf16 weights in oneDNN's layout

# F.linear on a bf16 CPU tensor hands the weight to oneDNN, which reorders it into its blocked layout on
# every call: for the few rows of a decode step that copy costs more than the multiplication. Reordered
# once at load, the same multiplication read the weights about twice as fast (2 cores, Zen 5, torch 2.13,
# weights cycled through more than the caches hold: 8960x1536, 1 row 1.5 ms against 2.5 ms; 16 rows 2.6
# against 3.7) and, for prefill-sized calls, as fast or slightly faster (256 rows: 1.02x).


def can_block(linear: nn.Module) -> bool:
    """Whether this layer's weight can live in oneDNN's layout: bf16 on a CPU, with oneDNN in this torch."""
    return (isinstance(linear, nn.Linear) and linear.weight is not None and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _blocked(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only tunes the layout; the reordered weight serves any number of rows.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


class BlockedLinear(nn.Module):
    """A bf16 linear layer on a CPU whose weight is held in oneDNN's blocked layout (opaque: no `weight`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("blocked", _blocked(weight), persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _blocked_linear(x, self.blocked, self.bias)


# ---------------------------------------------------------------------------- 4-bit copies for decoding

# A decode step multiplies a few rows by every weight, so it is bound by how many weight bytes it reads.
# torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) reads half a byte per weight instead of bf16's two.
# Against the same weights in oneDNN's layout (above), measured on 1 thread (Zen 5, torch 2.13, 8960x1536
# weights cycled through more than the caches hold): 1 row took 0.67 ms against 1.52, 4 rows 1.05 against
# 1.51, 8 rows 2.19 against 1.91 and 16 rows 4.3 against 2.6. So layers keep their bf16 weight for larger
# calls (prefill above all, where the 4-bit kernel is many times slower) and use the 4-bit copy for calls
# of at most PACKED_MAX_ROWS rows.
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
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > PACKED_MAX_ROWS or getattr(self, "packed", None) is None:
            if self.weight is None:  # block() moved it
                return _blocked_linear(x, self.blocked, self.bias)
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, x.shape[-1]), self.packed, GROUP,
                                                         self.scales_zeros)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def can_pack(linear: nn.Module) -> bool:
    """Whether torch's CPU int4 kernel takes this layer's shape and dtype."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.bfloat16
            and linear.out_features % 16 == 0 and linear.in_features % (2 * 16) == 0
            and linear.in_features % GROUP == 0)


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


def block_linears(model: nn.Module) -> int:
    """Hold every bf16 CPU linear layer's weight in oneDNN's layout (BlockedLinear, PackedLinear.block),
    fusing the layers of FUSED where a module has a slot for them. A weight shared with another module (tied
    embeddings) is copied, not moved: the embedding keeps reading rows of the plain one. Returns how many
    layers changed."""
    changed = 0
    for module in list(model.modules()):
        for fused, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if not hasattr(module, fused) or not all(type(part) is nn.Linear and can_block(part) for part in parts):
                continue
            biases = [part.bias for part in parts]
            if any(b is None for b in biases) != all(b is None for b in biases):
                continue  # some with a bias, some without: they stay separate
            bias = None if biases[0] is None else torch.cat(biases)
            setattr(module, fused, BlockedLinear(torch.cat([part.weight for part in parts]), bias))
            for name in names:
                setattr(module, name, None)
            changed += len(parts)
    for parent, attribute, _full_name, child in list(_children(model)):
        if isinstance(child, PackedLinear) and can_block(child):
            child.block()
        elif type(child) is nn.Linear and can_block(child):
            setattr(parent, attribute, BlockedLinear(child.weight, child.bias))
        else:
            continue
        changed += 1
    return changed
