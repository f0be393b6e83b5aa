"""A LLaMA-family decoder in a screenful of small modules.

Weights use Meta's names and Meta's rotary layout (query/key features interleaved as
complex pairs); checkpoints.py converts every other format into that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llama_ref.quantize import Int8Embedding


@dataclass
class ModelArgs:
    """The architecture only; how many positions and rows the KV cache holds is chosen at run time
    (Transformer.setup_caches), since the trained context and the cache length are different things."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int = 11008  # feed-forward width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: LLaMA with biases on the query, key and value projections
    context_length: int = 2048  # what the model was trained on: the most a cache may usefully hold

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads as __post_init__ settled it: never None once the args exist."""
        assert self.n_kv_heads is not None
        return self.n_kv_heads


def scale_rope_frequencies(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_context / low, freqs / factor, blended)
    return torch.where(wavelen < old_context / high, freqs, scaled)


def precompute_freqs_cis(
    head_dim: int, end: int, theta: float, scaling: dict | None = None, device=None
) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling:
        freqs = scale_rope_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64, (end, head_dim / 2)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: (bsz, seqlen, heads, head_dim), freqs_cis: (bsz, seqlen, head_dim / 2);
    # pairs of features rotate as complex numbers
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = x_complex * freqs_cis[:, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in one op; for bf16 torch computes it in fp32, so that
        # bf16 activations don't lose the small variance terms
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# A KV cache that holds at most this much in fp32 is kept in fp32 on a CPU, whatever the weights' dtype: the
# attention of a one-token step over it is then one SDPA call. In bf16 the same step takes two matmuls, each of
# which costs oneDNN a new setup for every new length, and SDPA itself is slower in bf16.
SMALL_CACHE_BYTES = 64 << 20


def cache_bytes(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    element = torch.finfo(dtype).bits // 8
    return 2 * args.n_layers * batch * seq_len * args.kv_heads * args.head_dim * element


def kv_cache_dtype(
    args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device, compact: bool = False
) -> torch.dtype:
    """The KV cache's dtype: fp32 for a small cache on a CPU (SMALL_CACHE_BYTES); bf16 for a larger one under
    fp32 activations where `compact` (a CPU without native bf16 running quantized layers: half the bytes, and
    attention widens it back to fp32 a row at a time, attend_one_token); else the model's dtype."""
    small = cache_bytes(args, batch, seq_len, torch.float32) <= SMALL_CACHE_BYTES
    if device.type == "cpu" and small:
        return torch.float32
    if compact and device.type == "cpu" and dtype == torch.float32:
        return torch.bfloat16
    return dtype


class KVCache(nn.Module):
    """Preallocated once for batch x seq_len; generation writes into it in place.

    Heads come before positions so that attention reads a slice of the cache as it is, with no copy.
    """

    k: torch.Tensor  # buffers, registered in __init__
    v: torch.Tensor

    def __init__(self, batch: int, seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: slice, input_pos: torch.Tensor | int, kv_len: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (bsz, seqlen, heads, head_dim) at input_pos of `rows`: positions (bsz, seqlen), or
        one int, the first position of every row; return those rows' keys and values for positions 0..kv_len-1."""
        cache_k, cache_v = self.k[rows], self.v[rows]
        k, v = k.to(cache_k.dtype), v.to(cache_v.dtype)  # the cache's dtype may differ (kv_cache_dtype)
        if isinstance(input_pos, int):  # one copy into a slice, not a scatter
            cache_k[:, :, input_pos : input_pos + k.shape[1]] = k.transpose(1, 2)
            cache_v[:, :, input_pos : input_pos + v.shape[1]] = v.transpose(1, 2)
        else:
            row_index = torch.arange(k.shape[0], device=k.device)[:, None]
            cache_k[row_index, :, input_pos] = k
            cache_v[row_index, :, input_pos] = v
        return cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk and wv as one layer, where the loader fused them
        self.cache: KVCache | None = None
        self.anchor: KVCache | None = None  # one row: a prompt start that several rows read (Transformer.forward)

    def forward(self, x, rows: slice, input_pos, kv_len: int, freqs_cis, mask, shared: int = 0, into_anchor=False):
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
            )
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        cache = self.anchor if into_anchor else self.cache
        assert cache is not None, "Transformer.setup_caches() allocates the caches before any forward pass"
        keys, values = cache.update(rows, input_pos, kv_len, k, v)
        # fp32 wherever the activations or the cache are (kv_cache_dtype): a small cache is fp32 under bf16
        # weights, and a compact bf16 cache under fp32 activations is widened as attention reads it
        compute = torch.float32 if torch.float32 in (q.dtype, keys.dtype) else keys.dtype
        q = q.to(compute)
        shared_kv = None
        if shared:  # the rows read the anchor's first `shared` positions, then their own
            assert self.anchor is not None, "a plan that shares positions needs an anchor (setup_caches anchor_len)"
            shared_kv = self.anchor.k[0, :, :shared], self.anchor.v[0, :, :shared]
        if seqlen == 1 and mask is None and compute == torch.float32:
            # one new token that sees the whole cache: in fp32, SDPA is one call and the fastest way
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.to(compute), values.to(compute), enable_gqa=self.n_kv_heads != self.n_heads
            )
        elif seqlen == 1:
            out = attend_one_token(q.transpose(1, 2), keys, values, mask, shared_kv)
        elif mask is not None:  # a chunk past the start of the cache: it sees every earlier position
            if shared_kv is not None:
                keys = torch.cat([shared_kv[0].expand(bsz, -1, -1, -1), keys], dim=2)
                values = torch.cat([shared_kv[1].expand(bsz, -1, -1, -1), values], dim=2)
            out = attend_chunk(q.transpose(1, 2), keys, values, mask)
        else:  # a chunk from position 0: SDPA's own causal mask is exact
            # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.to(compute),
                values.to(compute),
                is_causal=True,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1).type_as(x))


def attend_one_token(q, keys, values, bias, shared=None):
    """Attention for one new token per row, q (bsz, heads, 1, head_dim), as two matmuls.

    On CPU, SDPA's kernels are built for many queries: for one query per row over a long cache they
    run many times slower than this. The query heads that share a key/value head are stacked as rows
    of one matrix, so grouped-query attention needs no copies.
    bias: (bsz, 1, 1, positions), 0 where a row may look and -inf where it may not, or None.

    shared: (keys, values) of the anchor, (kv_heads, span, head_dim), that every row reads before its
    own (bias then covers the anchor's positions first). Every row's queries meet them in one matmul,
    so a prompt start that all rows share is read once per step, not once per row (cascade attention).

    A cache narrower than q (a compact bf16 cache under fp32 activations: kv_cache_dtype) is widened a row
    at a time into one buffer that stays in the CPU's caches: as fast as reading an fp32 cache, from half
    the bytes (benchmarks/results: the AVX2 class).
    """
    bsz, n_heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(bsz, kv_heads, -1, head_dim)
    widen = keys.dtype != q.dtype
    # keys @ q^T, then transposed, rather than q @ keys^T: the cache's slice of kv_len positions is a strided
    # batch of contiguous matrices, which the CPU kernel reads as it is, but its transpose it copies first
    if widen:
        buffer = torch.empty(keys.shape[1:], dtype=q.dtype, device=q.device)
        scores = torch.stack(
            [torch.matmul(buffer.copy_(keys[r]), grouped[r].transpose(-1, -2)) for r in range(bsz)]
        ).transpose(-1, -2)
    else:
        scores = torch.matmul(keys, grouped.transpose(-1, -2)).transpose(-1, -2)
    span = 0
    if shared is not None:
        shared_k, shared_v = (part.to(q.dtype) for part in shared) if widen else shared
        span, group = shared_k.shape[1], grouped.shape[2]
        # every row's query heads of one key/value head, stacked: (kv_heads, bsz * group, head_dim)
        stacked = grouped.transpose(0, 1).reshape(kv_heads, bsz * group, head_dim)
        shared_scores = torch.matmul(shared_k, stacked.transpose(-1, -2)).transpose(-1, -2)
        scores = torch.cat([shared_scores.reshape(kv_heads, bsz, group, span).transpose(0, 1), scores], dim=-1)
    # scaled, masked and widened to fp32 in one pass: bias + scale * scores
    scores = scores.float() * head_dim**-0.5 if bias is None else torch.add(bias, scores, alpha=head_dim**-0.5)
    compute = q.dtype if widen else values.dtype
    probs = torch.softmax(scores, dim=-1).to(compute)
    if widen:
        out = torch.stack([torch.matmul(probs[r, ..., span:], buffer.copy_(values[r])) for r in range(bsz)])
    else:
        out = torch.matmul(probs[..., span:], values)
    if shared is not None:  # the two parts of each sum added in fp32, as one matmul would
        shared_probs = probs[..., :span].transpose(0, 1).reshape(kv_heads, bsz * group, span)
        shared_out = torch.matmul(shared_probs, shared_v).reshape(kv_heads, bsz, group, head_dim).transpose(0, 1)
        out = (out.float() + shared_out.float()).to(compute)
    return out.reshape(bsz, n_heads, 1, head_dim)


ATTEND_BLOCK = 64


def attend_chunk(q, keys, values, mask):
    """Attention for a chunk of new tokens, q (bsz, heads, seqlen, head_dim), over keys and values
    (bsz, kv_heads, positions, head_dim), where mask (bsz, 1, seqlen, positions) says what each sees.

    The query heads that share a key/value head are stacked into one tall matrix, so each key/value
    head is one large matmul. On CPU, SDPA with a mask runs at a fraction of that speed.
    """
    bsz, n_heads, seqlen, head_dim = q.shape
    kv_heads, positions = keys.shape[1], keys.shape[2]
    group = n_heads // kv_heads
    # contiguous for the matmuls, and in q's dtype where the cache is compact (kv_cache_dtype): one copy either way
    keys_t = keys.transpose(-1, -2).to(q.dtype, memory_format=torch.contiguous_format)
    values = values.to(q.dtype)
    bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
    out = torch.empty_like(q)
    # a block of queries at a time keeps each block's scores a few MB: the whole chunk's at once, or blocks
    # twice this size, were slower
    for start in range(0, seqlen, ATTEND_BLOCK):
        end = min(start + ATTEND_BLOCK, seqlen)
        block = q[:, :, start:end].reshape(bsz, kv_heads, group * (end - start), head_dim)
        scores = torch.matmul(block, keys_t).view(bsz, kv_heads, group, end - start, positions)
        probs = torch.softmax(torch.add(bias[:, :, None, start:end], scores, alpha=head_dim**-0.5), dim=-1)
        block_out = torch.matmul(probs.type_as(values).view(bsz, kv_heads, group * (end - start), positions), values)
        out[:, :, start:end] = block_out.view(bsz, n_heads, end - start, head_dim)
    return out


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 as one layer, where the loader fused them

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rows, input_pos, kv_len, freqs_cis, mask, shared=0, into_anchor=False):
        h = x + self.attention(self.attention_norm(x), rows, input_pos, kv_len, freqs_cis, mask, shared, into_anchor)
        return h + self.feed_forward(self.ffn_norm(h))


KV_LEN_STEP = 128


@dataclass(frozen=True)
class StepPlan:
    """What the engine adds to a forward pass; Meta's and gpt-fast's callers need none of it.

    rows: the cache rows the batch uses (default: the first bsz). shared (one int, or one per row): each row
    reads that many positions from the anchor, then its own cache, which holds its positions from there on
    (position p at p - shared); rows whose prompts start alike keep that start once, and a decode step reads
    it once. into_anchor: write into the anchor (one row) instead of the rows' caches. last_only: logits for
    the last position only, since prefill throws the others away."""

    rows: slice | None = None
    shared: int | torch.Tensor | None = None
    into_anchor: bool = False
    last_only: bool = False


LAST_ONLY = StepPlan(last_only=True)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.params = args
        # load_model may swap in an Int8Embedding (loading.place_kernels)
        self.tok_embeddings: nn.Embedding | Int8Embedding = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.compiled_step: Callable[..., torch.Tensor] | None = None  # compile_steps()
        self.compact_kv = False  # kv_cache_dtype's `compact`: a large cache in bf16 under fp32 activations

    def setup_caches(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype=None,
        device=None,
        row_len: int | None = None,
        anchor_len: int = 0,
    ):
        """Allocate the KV caches and rotary table for max_batch_size rows of max_seq_len positions;
        call after the weights are on their device. dtype: the caches' (default: kv_cache_dtype's choice).

        row_len (default max_seq_len): what each row's own cache holds, for rows that read the start of
        their prompt from the anchor, a one-row cache of anchor_len positions (forward's `shared`)."""
        args = self.params
        device = device or self.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.row_len, self.anchor_len = row_len or max_seq_len, anchor_len
        positions = max_batch_size * self.row_len + anchor_len
        dtype = dtype or kv_cache_dtype(args, 1, positions, self.dtype, torch.device(device), self.compact_kv)
        for attention in self.attentions():
            attention.cache = None  # freed before the new one is allocated
            attention.cache = KVCache(max_batch_size, self.row_len, args.kv_heads, args.head_dim, dtype, device)
            attention.anchor = None
            if anchor_len:
                attention.anchor = KVCache(1, anchor_len, args.kv_heads, args.head_dim, dtype, device)
        self.freqs_cis = precompute_freqs_cis(
            args.head_dim, max_seq_len, args.rope_theta, args.rope_scaling, device=device
        )

    def attentions(self) -> Iterator[Attention]:
        """Each layer's attention, in order (nn.ModuleList hands its items back as plain Modules)."""
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            yield layer.attention

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized layer's weights have their own)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_anchor(self, anchor_len: int) -> None:
        """Allocate (or resize) only the anchor, keeping the rows' caches."""
        cache = next(self.attentions()).cache
        assert cache is not None, "setup_caches() first"
        args, ref = self.params, cache.k
        self.anchor_len = anchor_len
        for attention in self.attentions():
            attention.anchor = None
            attention.anchor = KVCache(1, anchor_len, args.kv_heads, args.head_dim, ref.dtype, ref.device)

    def compile_steps(self) -> None:
        """Run one-token steps at one position for every row (Llama.generate's decode steps) through
        torch.compile, which fuses the small operations between the matmuls into generated C++: for a small
        model those, not the arithmetic, are most of a step. The first steps compile (slowly, unless torch's
        cache under the system's temporary folder has them already), so this pays off for long generations
        only. Where compiling fails (no C++ compiler, say), a warning says so and
        steps run as before."""
        # the rotary embedding's complex numbers stay as they are (eager kernels inside the compiled step)
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
        self.compiled_step = torch.compile(self.step, dynamic=True, options={"cpp_wrapper": True})

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor, plan: StepPlan | None = None
    ) -> torch.Tensor:
        """Logits for `tokens` (bsz, seqlen) placed at positions start_pos... of the cache. start_pos is
        one int for every row, or one per row (a tensor of bsz), so that rows at different lengths can
        step together. `plan` carries the engine's extras (StepPlan): which rows, the anchor, last_only."""
        plan = plan or StepPlan()
        if (
            self.compiled_step is not None
            and tokens.shape[1] == 1
            and isinstance(start_pos, int)
            and plan.shared is None
            and not plan.into_anchor
        ):
            try:
                return self.compiled_step(tokens, start_pos, plan.last_only, plan.rows)
            except Exception as exc:  # noqa: BLE001 - whatever stopped the compiler, the step itself can run
                warnings.warn(
                    f"torch.compile failed, so decoding runs without it: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                    stacklevel=2,
                )
                self.compiled_step = None
        return self.step(tokens, start_pos, plan.last_only, plan.rows, plan.shared, plan.into_anchor)

    def step(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor,
        last_only: bool = False,
        rows: slice | None = None,
        shared: int | torch.Tensor | None = None,
        into_anchor: bool = False,
    ) -> torch.Tensor:
        """forward() with the plan's fields spelled out, as torch.compile traces it (compile_steps), without
        the choice of a compiled step and without inference mode of its own."""
        bsz, seqlen = tokens.shape
        rows = rows or slice(0, bsz)
        steps = torch.arange(seqlen, device=tokens.device)
        length = self.anchor_len if into_anchor else self.row_len
        cache_pos: int | torch.Tensor  # where the caches take the tokens: one int for every row, or one per row
        if isinstance(start_pos, int):
            # one first position for every row comes with one count of shared positions, or none: a prefill
            # chunk (Engine._prefill_chunk) or a step of Llama.generate
            assert not isinstance(shared, torch.Tensor), "per-row shared counts need per-row positions"
            input_pos = (start_pos + steps).expand(bsz, seqlen)
            # the caches take every row's first position as one int: a slice, not a scatter
            cache_pos = start_pos - (shared or 0)
            kv_len = cache_pos + seqlen
            # from position 0, SDPA's own causal mask is exact and cheaper than a mask tensor;
            # a single new token sees the whole cache
            needs_mask = (cache_pos > 0 and seqlen > 1) or bool(shared)
            own_pos = (cache_pos + steps).expand(bsz, seqlen)
        else:
            input_pos = start_pos[:, None] + steps
            own_pos = cache_pos = input_pos if shared is None else input_pos - torch.as_tensor(shared)[:, None]
            # Rounded up (the mask hides the extra positions), so that the steps of a decode allocate the
            # same sizes over and over: sizes that grew by one position every step defeated glibc's reuse of
            # freed blocks, and the heap grew every step (a lower mmap threshold slowed every step instead).
            kv_len = min(-(-(int(cache_pos.max()) + 1) // KV_LEN_STEP) * KV_LEN_STEP, length)
            # Near the row's end, the whole row: a slice of every row is a strided batch, which the CPU
            # matmul copies first, so reading the whole contiguous rows is faster there, but not at half a row
            if kv_len * 4 > length * 3:
                kv_len = length
            needs_mask = True
        mask = None
        if needs_mask:
            # each new token sees the cache up to its own position, and nothing a shorter row left behind
            mask = torch.arange(kv_len, device=tokens.device) <= own_pos[:, None, :, None]
        span = 0
        if shared is not None and not into_anchor:
            lengths = torch.as_tensor(shared, device=tokens.device).expand(bsz)
            span = int(lengths.max())
            if span:  # the anchor's positions come first: each row sees the first `shared` of them
                seen = torch.arange(span, device=tokens.device) < lengths[:, None, None, None]
                assert mask is not None  # needs_mask: shared positions always need one
                mask = torch.cat([seen.expand(-1, -1, seqlen, -1), mask.expand(bsz, -1, -1, -1)], dim=-1)
        if mask is not None and seqlen == 1:  # decode steps add it: 0 where a row looks, -inf elsewhere
            mask = torch.zeros(mask.shape, device=tokens.device).masked_fill_(~mask, float("-inf"))
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[input_pos]
        for layer in self.layers:
            h = layer(h, rows, cache_pos, kv_len, freqs_cis, mask, span, into_anchor)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
