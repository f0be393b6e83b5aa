"""Weight-only quantisation of linear layers.

Int8Linear: each output row stored as int8 with one fp scale. Halves bf16 weight memory (a quarter
of fp32) at a small accuracy cost; activations stay in the model dtype, so no int8 kernels are needed.
PackedLinear: a bf16 layer that also keeps a GGUF's 4-bit weights packed, for decode steps.
BlockedLinear: a bf16 layer on a CPU whose weight oneDNN reordered once, at load, instead of at every call;
small ones also keep an int8 copy for one-row calls.
W8A8Linear: int8 weights times int8 activations (rounded per token at each call) on a CPU: exact integer
dot products at twice bf16's rate, from half its bytes.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from llama_ref.quants import GROUP  # values per (scale, min) group of GGUF's Q4_0, Q4_1 and Q4_K blocks


def int8_rows(weight: torch.Tensor, slice_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): each row of a float weight (out, in) as int8 in -127..127 times one fp32 scale (its max |w| /
    127). Rounded slice_rows rows at a time: never an fp32 copy of the whole weight."""
    weight = weight.detach()
    scales = weight.abs().amax(dim=1).float().clamp(min=1e-8) / 127.0
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start in range(0, weight.shape[0], slice_rows):
        part = weight[start:start + slice_rows].float() / scales[start:start + slice_rows, None]
        q[start:start + slice_rows] = torch.round(part).clamp(-127, 127)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        # Qwen2's q/k/v biases stay in the model dtype: they are a few thousand numbers
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        q, scales = int8_rows(weight.to(self.weight.device))
        self.weight.copy_(q)
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


# torch.compile can't lower this call (its lowering wants the weight frozen into the graph): compiled steps
# (Transformer.compile_steps) run it as it is, between compiled parts
@torch.compiler.disable
def _blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


# Small layers also keep an int8 copy (one scale per output row) for calls of one or two rows, which torch's
# weight-only int8 kernel (_weight_int8pack_mm: bf16 activations times int8 weights) multiplies with less
# fixed cost per call than oneDNN, from half the bytes. A decode step of a small model is mostly that fixed
# cost, and its int8 weights stay in the caches where bf16 ones are evicted: stories15M's shape decoded at
# 450 tok/s with the copies against 290 without (2 threads, Zen 4, torch 2.13). For bigger layers the
# kernel is no faster than oneDNN (49152x576, 1 row: 1.8 ms against 1.9; 4 rows: 3.1 against 1.4), so
# layers of more than INT8_COPY_MAX_WEIGHTS weights don't get one: the output layers of SmolLM2 (one-stream
# decode 66 tok/s with a copy or without) and of Qwen2.5-Coder-1.5B.
INT8_COPY_MAX_ROWS = 2
INT8_COPY_MAX_WEIGHTS = 2 ** 24


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
        self.register_buffer("q_scales", None if scales is None else scales.to(weight.dtype),  # the kernel's dtype
                             persistent=False)

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
    return (out_features * in_features <= INT8_COPY_MAX_WEIGHTS
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


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


def _convert(model: nn.Module, make, convertible, skip: tuple[str, ...] = (), big_enough=lambda k, n: True) -> int:
    """Swap each linear layer for which convertible(layer) and big_enough(in, out) hold (but those named in
    skip) for make(weight, bias), first fusing the layers of FUSED where a module has a slot for them, all
    are convertible and the fused shape is big enough. Returns how many layers changed. Modules are looked
    up by name as it goes: a list of them would keep every replaced weight alive until the end (at load,
    a second copy of the model's weights at the peak)."""
    changed = 0
    for prefix in [name for name, module in model.named_modules() if any(hasattr(module, f) for f in FUSED)]:
        module = model.get_submodule(prefix)
        for fused, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if (not hasattr(module, fused) or not all(part is not None and convertible(part) for part in parts)
                    or any(f"{prefix}.{name}".lstrip(".") in skip for name in names)
                    or not big_enough(parts[0].in_features, sum(part.out_features for part in parts))):
                continue
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
        if convertible(child) and full_name not in skip and big_enough(child.in_features, child.out_features):
            setattr(model.get_submodule(parent_name), attribute, make(child.weight, child.bias))
            changed += 1
        del child
    return changed


# ---------------------------------------------------------------------------- int8 weights and activations

# A CPU with AVX512-VNNI multiplies int8 by int8 at twice the rate of bf16, and int8 weights are half the bytes.
# W8A8Linear holds each weight as int8 with one scale per output row and, at every call, rounds each input row
# to int8 with a scale of its own (max |x| / 127). The integer dot products are exact, so a row's result depends
# on that row alone, whatever else is in the batch and whichever of the two kernels runs:
# - fbgemm's dynamic linear (torch.ops.quantized.linear_dynamic) for calls of a few rows. It picks its own input
#   scale from the input's range, so each call hands it the rows already rounded (integers in -127..127) plus
#   two columns holding -128 and 127 whose weights are zero: the range is then exactly -128..127, the scale 1
#   and the zero point 128, and it multiplies the same integers.
# - torch._int_mm (oneDNN) for larger calls, where fbgemm's is slower.
# Measured on 2 threads (Zen 4, torch 2.13; Qwen2.5-Coder-1.5B's layer shapes, weights cycled through more than
# the caches hold; ms per layer, against the same layers in bf16 in oneDNN's layout): 1 row 1.7 against 4.7,
# 8 rows 2.0 against 4.3, 16 rows 2.8 against 5.6; 256 rows 33 against 59 (torch._int_mm).
# On the default model's answers (teacher-forced, 580 tokens of 5 of the generate post's answers) the next
# token agreed with plain bf16's at 94.9-100% and the mean KL divergence was 0.003-0.007 nats: about what the
# 4-bit decode copies above already changed (96-98.5%).
INT8_FEW_ROWS = 48  # calls of at most this many rows go to fbgemm (measured crossover: 48-64 rows)


@functools.cache
def int8_dot_available() -> bool:
    """Whether this CPU and torch build compute W8A8Linear's products exactly: fbgemm's dynamic linear (x86)
    and torch._int_mm, checked once on numbers that would overflow a kernel that adds pairs of u8 * s8
    products in 16 bits (AVX2 without VNNI), where the result would be wrong."""
    if not ("fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "_int_mm")
            and hasattr(torch, "_make_per_channel_quantized_tensor")):
        return False
    try:
        layer = W8A8Linear(torch.full((32, 64), 127.0))  # int8 127 with a scale of 1
        x = torch.full((24, 64), 127.0)  # likewise: u8 255 in fbgemm
        exact = torch.full((24, 32), 64.0 * 127 * 127)
        return all(torch.equal(layer(x[:rows]), exact[:rows]) for rows in (1, INT8_FEW_ROWS + 1))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class W8A8Linear(nn.Module):
    """A linear layer on a CPU with int8 weights (one scale per output row) and int8 activations (one scale per
    token, at each call); returns the input's dtype. Build it from a float weight (out, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scales = int8_rows(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q, persistent=False)  # (out, in): torch._int_mm reads its transpose
        self.register_buffer("scales", scales, persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        padded = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)
        with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors will go; int8_dot_available
            warnings.simplefilter("ignore")  # checks for them, so a torch without them takes the bf16 path
            qweight = torch._make_per_channel_quantized_tensor(padded, scales.double(),
                                                               torch.zeros(q.shape[0], dtype=torch.long), 0)
            self.fbgemm = torch.ops.quantized.linear_prepack(qweight, None)  # its own packed copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        flat = x.reshape(-1, k).float()
        rows = flat.shape[0]
        step = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
        if rows <= INT8_FEW_ROWS:
            rounded = flat.new_empty(rows, k + 2)
            torch.round(flat / step, out=rounded[:, :k])
            rounded[:, k] = -128.0
            rounded[:, k + 1] = 127.0
            out = torch.ops.quantized.linear_dynamic(rounded, self.fbgemm, False)  # = products * scales
        else:
            out = torch._int_mm(torch.round(flat / step).to(torch.int8), self.q.t()).float()
            out.mul_(self.scales)
        # in place: a new output-sized tensor per operation costs more than the operation (page faults)
        out = out.mul_(step).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


# Below this many weights a layer stays bf16: W8A8Linear's dozen small operations a call cost more than the
# bytes it saves (SmolLM2-135M's one-row decode fell from 42 to 26 tok/s with every layer int8, stories15M's
# from 196 to 112, on the Zen 4 host; Qwen2.5-Coder-1.5B's smallest layer, wo, has 2.4M).
INT8_MIN_WEIGHTS = 2 ** 21


def int8_linears(model: nn.Module, skip: tuple[str, ...] = ("output",)) -> int:
    """Swap every linear layer of at least INT8_MIN_WEIGHTS weights (but those named in skip) for a
    W8A8Linear, fusing the layers of FUSED like block_linears. Returns how many layers changed."""
    return _convert(model, W8A8Linear, lambda layer: type(layer) is nn.Linear, skip,
                    big_enough=lambda k, n: k * n >= INT8_MIN_WEIGHTS)
