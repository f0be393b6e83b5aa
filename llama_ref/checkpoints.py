"""Open a checkpoint in any supported format: GGUF, Hugging Face directory, Meta .pth shards, llama2.c .bin.

open_checkpoint(path) detects the format and reads only metadata: the model's shape, its tokenizer, its chat
template and every weight's shape, so the caller can check memory before loading anything. Then
Checkpoint.tensors() yields the weights one at a time, under Meta's names and in Meta's rotary layout
(query/key features interleaved as complex pairs), which is what model.py expects.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .model import ModelArgs, scale_rope_frequencies
from .tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_hf_tokenizer,
    read_llama2c_tokenizer,
    tokenizer_from_gguf,
)


@dataclass
class Rows:
    """A 2-D tensor of a file, read and dequantized a slice of rows at a time: `rows[start:stop]` is a new
    tensor. A loader that converts a weight slice by slice (quantize.int8_rows) then never holds the whole
    float matrix: for the default model's 151936 x 1536 output, 0.9 GB in fp32."""

    shape: tuple[int, int]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor] = field(repr=False)  # rows start..stop

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.read(start, stop)


@dataclass
class Checkpoint:
    path: Path
    format: str  # the name of its entry in FORMATS
    args: ModelArgs
    tokenizer: Tokenizer
    chat_template: str | None
    tensor_shapes: dict[str, tuple[int, ...]]  # Meta names; known before any weight is read
    read_tensors: Callable[..., Iterator[tuple[str, torch.Tensor | Rows]]] = field(repr=False)
    # GGUF only: a 4-bit weight as its exact (q, scale, min) groups (quants.int4_groups), else None
    read_int4: Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = field(
        default=None, repr=False
    )

    def tensors(
        self, dequantized_dtype: torch.dtype = torch.float32, by_rows: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor | Rows]]:
        """Yield (Meta name, CPU tensor) one at a time, float32 or the file's bf16/f16; quantised blocks
        are dequantised straight to `dequantized_dtype` (a bf16 model never holds an fp32 copy of its
        largest matrix). 'output.weight' is left out when the embeddings are tied. A GGUF's 2-D tensors
        named in `by_rows` come as Rows, read a slice of rows at a time (others formats' as tensors)."""
        with self._reading("the weights"):
            yield from self.read_tensors(dequantized_dtype, by_rows)

    def int4_groups(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The weight `name` as its exact 4-bit (q, scale, min) groups if the file stores it so, else None."""
        if self.read_int4 is None:
            return None
        with self._reading("the 4-bit weights"):
            return self.read_int4(name)

    @contextlib.contextmanager
    def _reading(self, what: str):
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # whatever breaks while reading the user's file is a problem with that file
            raise CheckpointError(
                f"{self.path}: reading {what} failed ({type(e).__name__}: {e}); "
                "the file may be truncated or corrupt, download it again"
            ) from e


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the format of `path` (FORMATS, in order) and read everything but the weights. Raises
    CheckpointError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass {supported_inputs()}")
    model_format, location = _detect_format(path)
    try:
        checkpoint = model_format.open(location)
    except CheckpointError:
        raise
    except TokenizerError as e:
        raise CheckpointError(f"{location}: tokenizer: {e}") from e
    except Exception as e:  # a file we cannot parse is a broken file, whatever the parser raised
        raise CheckpointError(
            f"{location}: cannot be read as a {model_format.name} checkpoint "
            f"({type(e).__name__}: {e}); the file may be truncated or corrupt"
        ) from e
    if checkpoint.tokenizer.n_words > checkpoint.args.vocab_size:
        raise CheckpointError(
            f"{location}: the tokenizer has {checkpoint.tokenizer.n_words} tokens but the model's vocabulary "
            f"has {checkpoint.args.vocab_size}; use the tokenizer that was released with the model"
        )
    return checkpoint


@dataclass(frozen=True)
class Format:
    """One checkpoint format: how to recognise it and how to open it. A new format is one entry of FORMATS."""

    name: str  # Checkpoint.format
    described: str  # what a user passes, for error messages
    marker: str  # what marks a directory in this format, for error messages ("": files only)
    detect: Callable[[Path], Path | None]  # where the checkpoint is if `path` is one (a folder may hold it)
    open: Callable[[Path], Checkpoint]


def supported_inputs() -> str:
    described = [f.described for f in FORMATS]
    return ", ".join(described[:-1]) + ", or " + described[-1]


def _detect_format(path: Path) -> tuple[Format, Path]:
    for model_format in FORMATS:
        location = model_format.detect(path)
        if location is not None:
            return model_format, location
    if path.is_dir():
        raise CheckpointError(
            f"{path}: found no {' or '.join(f.marker for f in FORMATS if f.marker)} in this directory; "
            f"pass {supported_inputs()}"
        )
    raise CheckpointError(f"{path}: unrecognised model file; pass {supported_inputs()}")


def _is_hf(path: Path) -> Path | None:
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    return path.parent if path.suffix.lower() == ".safetensors" or path.name == "config.json" else None


def _is_meta(path: Path) -> Path | None:
    if path.is_dir():
        return path if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")) else None
    return path.parent if path.suffix.lower() == ".pth" or path.name == "params.json" else None


def _is_gguf(path: Path) -> Path | None:
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return path
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "the download may be incomplete or the file is something else"
        )
    return None


def _is_llama2c(path: Path) -> Path | None:
    return path if path.is_file() and path.suffix.lower() == ".bin" else None


# ---------------------------------------------------------------------------- shapes and names


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight model.Transformer(args) loads, with its shape."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        shapes.update(
            {
                f"layers.{i}.attention.wq.weight": (q_rows, args.dim),
                f"layers.{i}.attention.wk.weight": (kv_rows, args.dim),
                f"layers.{i}.attention.wv.weight": (kv_rows, args.dim),
                f"layers.{i}.attention.wo.weight": (args.dim, q_rows),
                f"layers.{i}.feed_forward.w1.weight": (args.hidden_dim, args.dim),
                f"layers.{i}.feed_forward.w2.weight": (args.dim, args.hidden_dim),
                f"layers.{i}.feed_forward.w3.weight": (args.hidden_dim, args.dim),
                f"layers.{i}.attention_norm.weight": (args.dim,),
                f"layers.{i}.ffn_norm.weight": (args.dim,),
            }
        )
        if args.qkv_bias:
            shapes.update(
                {
                    f"layers.{i}.attention.wq.bias": (q_rows,),
                    f"layers.{i}.attention.wk.bias": (kv_rows,),
                    f"layers.{i}.attention.wv.bias": (kv_rows,),
                }
            )
    return shapes


def _check_shapes(path: Path, found: dict[str, tuple[int, ...]], args: ModelArgs) -> dict[str, tuple[int, ...]]:
    # before listing what the configuration implies: a crafted layer count would list millions of names
    layers = {name.split(".")[1] for name in found if name.startswith("layers.")}
    if args.n_layers != len(layers):
        raise CheckpointError(
            f"{path}: the configuration says {args.n_layers} layers but the weights hold "
            f"{len(layers)}; the checkpoint is incomplete or its configuration is wrong"
        )
    expected = expected_shapes(args)
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{path}: weight {name} is missing; the checkpoint is incomplete")
        if tuple(found[name]) != shape:
            raise CheckpointError(
                f"{path}: weight {name} has shape {tuple(found[name])} but the model's "
                f"configuration implies {shape}; the configuration does not match the weights"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}: unexpected weight {extra[0]}; this is not a plain llama-architecture "
            "model, which is all llama_ref runs"
        )
    return expected


def _layer_name(name: str, prefix: str, parts: dict[str, str]) -> str | None:
    """'<prefix>N.<part>.weight' -> 'layers.N.<Meta part>.weight', or None if the part is unknown."""
    if not name.startswith(prefix):
        return None
    layer, _, rest = name[len(prefix) :].partition(".")
    part, _, suffix = rest.rpartition(".")
    return f"layers.{layer}.{parts[part]}.{suffix}" if part in parts and layer.isdigit() else None


def _hf_rotary_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation of HF's convert_llama_weights_to_hf.py `permute`.

    Meta rotates feature pairs (2i, 2i+1) of each head; HF's rotate_half pairs (i, i + head_dim/2), so
    HF stores each head's rows as [all first halves, all second halves]. Interleave them back. A bias
    is one column of the same rows.
    """
    rows = weight.shape[0]
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2)
    return halves.reshape(weight.shape)


def _rotary_to_meta(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """q/k weights and biases from HF's rotate-half layout into Meta's interleaved one; others unchanged."""
    if ".attention.wq." in name:
        return _hf_rotary_to_meta(tensor, args.n_heads)
    if ".attention.wk." in name:
        return _hf_rotary_to_meta(tensor, args.kv_heads)
    return tensor


def _linear_rope_scaling(factor: float) -> dict:
    """Linear ("position interpolation") scaling divides every frequency by `factor`. In the Llama 3.1 formula
    of model.scale_rope_frequencies that is the case where every wavelength (all >= 2*pi) lies beyond
    original_max_position_embeddings / low_freq_factor = 1."""
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 1}


# ---------------------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_LAYER_PARTS = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
GGUF_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors for Llama 3.1 rope scaling


# general.architecture -> whether q/k/v carry biases. llama.cpp's convert_hf_to_gguf.py re-permutes
# LLaMA's q/k rows to Meta's interleaved rotary layout (LlamaModel.modify_tensors) but writes Qwen2's as
# Hugging Face has them (rotate-half pairs; llama.cpp runs qwen2 with LLAMA_ROPE_TYPE_NEOX).
GGUF_ARCHITECTURES = {"llama": False, "qwen2": True}


def _gguf_reader(path: Path):
    """gguf's GGUFReader over plain arrays: it slices the file once per metadata value, and numpy's
    memmap subclass adds a Python __array_finalize__ to every slice. A 150k-token vocabulary is 600k
    slices; plain views of the same mapping read it several times faster (benchmarks/results/README.md)."""
    from gguf import GGUFReader, GGUFValueType

    ARRAY = int(GGUFValueType.ARRAY)

    class PlainArrayReader(GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, mapping):
            self._data = mapping.view(np.ndarray)  # the view's base keeps the mapping open

        # A crafted header can claim an array the file cannot hold (65 bytes claiming 2^60 elements): gguf's
        # reader then loops on empty reads past the end, allocating without bound. Array lengths are checked
        # against the file's size first; any other read past the end fails on its own.
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == ARRAY:
                length = int(self._get(orig_offs + 4, np.uint64)[0])
                if length > len(self._data) - orig_offs:  # every element takes at least a byte
                    raise ValueError(
                        f"an array at byte {orig_offs} claims {length} elements, more than the "
                        f"{len(self._data)}-byte file can hold"
                    )
            return super()._get_field_parts(orig_offs, raw_type)

    return PlainArrayReader(path)


def _open_gguf(path: Path) -> Checkpoint:
    from .quants import SUPPORTED

    reader = _gguf_reader(path)
    meta = {key: f.contents() for key, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture '{arch}' is not supported; llama_ref runs "
            f"{' and '.join(GGUF_ARCHITECTURES)} models"
        )

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    layers = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    if int(key("block_count", 0)) != len(layers):
        raise CheckpointError(
            f"{path}: the header says {key('block_count')} layers but the file holds tensors for "
            f"{len(layers)}; the file is corrupt or was written wrongly"
        )
    if key("expert_count", 0):
        raise CheckpointError(
            f"{path}: this GGUF is a mixture-of-experts model, which llama_ref does not run; "
            "use a dense llama-architecture model"
        )
    tensors = {t.name: t for t in reader.tensors}
    by_meta_name = {}
    for name, t in tensors.items():
        if name == GGUF_ROPE_FREQS:
            continue
        if t.tensor_type not in SUPPORTED:
            raise CheckpointError(
                f"{path}: tensor {name} is stored as {t.tensor_type.name}, which llama_ref cannot dequantize; "
                f"supported: {', '.join(q.name for q in SUPPORTED)}; use a GGUF quantised to one of those"
            )
        by_meta_name[GGUF_NAMES.get(name) or _layer_name(name, "blk.", GGUF_LAYER_PARTS) or name] = t

    # GGUF shapes list the fastest-varying dimension first; torch lists it last
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_meta_name.items()}
    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    head_count_kv = key("attention.head_count_kv", n_heads)
    if isinstance(head_count_kv, list):
        raise CheckpointError(
            f"{path}: per-layer key/value head counts are not supported; "
            "use a model with the same attention in every layer"
        )
    if int(key("rope.dimension_count", dim // n_heads)) != dim // n_heads:
        raise CheckpointError(
            f"{path}: rotary embedding on part of each head is not supported; use a model that rotates whole heads"
        )
    theta = float(key("rope.freq_base", 10000.0))
    args = ModelArgs(
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(head_count_kv),
        vocab_size=shapes["tok_embeddings.weight"][0],
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_gguf_rope_scaling(path, arch, meta, tensors.get(GGUF_ROPE_FREQS), dim // n_heads, theta),
        tie_embeddings="output.weight" not in shapes,
        qkv_bias=GGUF_ARCHITECTURES[arch],
        context_length=int(key("context_length", 2048)),
    )
    shapes = _check_shapes(path, shapes, args)
    rotate_half_layout = arch == "qwen2"

    def read_tensors(dequantized_dtype, by_rows=frozenset()):
        for name, t in by_meta_name.items():
            # rows in the file's order: not for q and k, whose rows a Qwen2 file permutes (_rotary_to_meta)
            if name in by_rows and len(shapes[name]) == 2 and ".attention.w" not in name:
                yield name, _gguf_rows(path, t, shapes[name], dequantized_dtype)
                continue
            tensor = _gguf_tensor(path, t, shapes[name], dequantized_dtype)
            yield name, _rotary_to_meta(name, tensor, args) if rotate_half_layout else tensor

    def read_int4(name):
        from .quants import FOUR_BIT, int4_groups

        t = by_meta_name.get(name)
        if t is None or t.tensor_type not in FOUR_BIT:
            return None
        groups = int4_groups(_gguf_raw(path, t), t.tensor_type, shapes[name])
        return tuple(_rotary_to_meta(name, g, args) for g in groups) if rotate_half_layout else groups

    chat_template = meta.get("tokenizer.chat_template")
    return Checkpoint(
        path,
        "gguf",
        args,
        tokenizer_from_gguf(meta),
        chat_template if isinstance(chat_template, str) else None,
        shapes,
        read_tensors,
        read_int4,
    )


def _gguf_tensor(path: Path, t, shape: tuple[int, ...], dequantized_dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor.

    Its bytes are read from the file, not through the reader's mapping: pages of a mapping stay
    resident while it is open, and would hold a second copy of the model during the load.

    For llama, convert_hf_to_gguf.py (LlamaModel.modify_tensors) re-permutes HF's q/k rows back to
    Meta's interleaved layout before writing, and transformers' GGUF loader (LlamaTensorProcessor,
    modeling_gguf_pytorch_utils.py) reverses that to get HF's layout back. So llama GGUF q/k are
    already in the layout model.py uses.
    """
    from gguf import GGMLQuantizationType as Q

    from .quants import dequantize

    # float files keep their precision; quantised blocks become dequantized_dtype
    dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(t.tensor_type, dequantized_dtype)
    return dequantize(_gguf_raw(path, t), t.tensor_type, shape, dtype)


def _gguf_rows(path: Path, t, shape: tuple[int, int], dequantized_dtype: torch.dtype) -> Rows:
    """A GGUF tensor as Rows: each row is a whole number of blocks, so rows a..b are bytes a..b * row_bytes."""
    from gguf import GGMLQuantizationType as Q

    from .quants import dequantize

    dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(t.tensor_type, dequantized_dtype)
    row_bytes = int(t.n_bytes) // shape[0]

    def read(start: int, stop: int) -> torch.Tensor:
        return dequantize(
            _gguf_raw(path, t, start * row_bytes, (stop - start) * row_bytes),
            t.tensor_type,
            (stop - start, shape[1]),
            dtype,
        )

    return Rows(shape, dtype, read)


def _gguf_raw(path: Path, t, start: int = 0, count: int | None = None) -> np.ndarray:
    count = int(t.n_bytes) if count is None else count
    raw = np.fromfile(path, dtype=np.uint8, count=count, offset=int(t.data_offset) + start)
    if raw.size != count:
        raise CheckpointError(
            f"{path}: tensor {t.name} runs past the end of the file; the file is truncated, download it again"
        )
    return raw


def _gguf_rope_scaling(path: Path, arch: str, meta: dict, rope_freqs, head_dim: int, theta: float) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0)))
    if rope_freqs is not None:
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
        divisors = np.array(rope_freqs.data, dtype=np.float64).reshape(-1)
        return _llama3_scaling_from_divisors(path, divisors, head_dim, theta, original)
    if kind == "linear" or (kind == "none" and factor != 1.0):
        return _linear_rope_scaling(factor)
    if kind not in ("none", ""):
        raise CheckpointError(
            f"{path}: rope scaling type '{kind}' is not supported; supported: linear and Llama 3.1 (rope_freqs)"
        )
    return None


def _llama3_scaling_from_divisors(
    path: Path, divisors: np.ndarray, head_dim: int, theta: float, original_context: int
) -> dict | None:
    """Recover Llama 3.1 rope-scaling parameters from llama.cpp's rope_freqs tensor.

    convert_hf_to_gguf.py stores Llama 3.1 scaling as one divisor per frequency: 1 for short wavelengths,
    `factor` for long ones, and 1 / ((1 - s) / factor + s) in between, where s = (C / wavelen - low) /
    (high - low) is linear in 1 / wavelen. Two in-between divisors give that line; only C/low and C/high
    matter, so C is taken from the file (or Llama 3's 8192) and low and high follow from it.
    """
    if np.allclose(divisors, 1.0):
        return None
    if np.allclose(divisors, divisors[0]):  # every frequency divided alike: linear scaling
        return _linear_rope_scaling(float(divisors[0]))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(divisors.max())
    smooth = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    between = (divisors > 1.0 + 1e-6) & (divisors < factor - 1e-6)
    unsupported = CheckpointError(
        f"{path}: rope_freqs does not follow Llama 3.1 rope scaling; "
        "llama_ref supports only that form of per-frequency rope scaling"
    )
    if between.sum() < 2:
        raise unsupported
    inverse_wavelen = freqs[between] / (2 * math.pi)
    slope, intercept = np.polyfit(inverse_wavelen, smooth[between], 1)
    low = -intercept * original_context / slope
    scaling = {
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(low + original_context / slope),
        "original_max_position_embeddings": original_context,
    }
    scaled = scale_rope_frequencies(torch.from_numpy(freqs), scaling).numpy()
    if not np.allclose(freqs / scaled, divisors, rtol=1e-4):
        raise unsupported
    return scaling


# ---------------------------------------------------------------------------- Hugging Face directory

HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_PARTS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


# model_type -> whether q/k/v carry biases (Qwen2ForCausalLM: always; LLaMA: refused below when set)
HF_MODEL_TYPES = {"llama": False, "qwen2": True}


def _open_hf(directory: Path) -> Checkpoint:
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{directory}: Hugging Face model_type '{model_type}' is not supported; llama_ref "
            f"runs {' and '.join(HF_MODEL_TYPES)} models"
        )
    if config.get("use_sliding_window"):
        raise CheckpointError(
            f"{directory}: config.json turns on sliding-window attention, which llama_ref does "
            "not run; use a model with full attention"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{directory}: config.json sets {flag}; llama_ref runs llama models without biases")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise CheckpointError(
            f"{directory}: head_dim {config['head_dim']} differs from hidden_size / "
            "num_attention_heads, which llama_ref does not support"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{directory}: hidden_act '{config['hidden_act']}' is not supported; llama uses silu")
    theta, scaling = _hf_rope(directory, config)
    args = ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=config.get("tie_word_embeddings", False),
        qkv_bias=HF_MODEL_TYPES[model_type],
        context_length=config.get("max_position_embeddings", 2048),
    )

    # the index names the model's shards; a directory may hold other safetensors (adapters, Mistral's consolidated)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []
    if not files:
        raise CheckpointError(
            f"{directory}: no *.safetensors weights; llama_ref reads Hugging Face weights "
            "only as safetensors (re-save the model with safe_serialization=True)"
        )
    sources, shapes = {}, {}  # Meta name -> (file, HF name)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                name = HF_NAMES.get(hf_name) or _layer_name(hf_name, "model.layers.", HF_LAYER_PARTS)
                if hf_name.endswith("rotary_emb.inv_freq") or (name == "output.weight" and args.tie_embeddings):
                    continue  # recomputed from the config / the same matrix as the embedding
                name = name or hf_name
                sources[name] = (file, hf_name)
                shapes[name] = tuple(f.get_slice(hf_name).get_shape())
    shapes = _check_shapes(directory, shapes, args)

    def read_tensors(_dequantized_dtype, _by_rows=frozenset()):  # nothing quantised in these formats
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name, (source, hf_name) in sources.items():
                    if source == file:
                        yield name, _from_hf(name, f.get_tensor(hf_name), args)

    return Checkpoint(
        directory, "hf", args, load_hf_tokenizer(directory, config), _hf_chat_template(directory), shapes, read_tensors
    )


def _from_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return _rotary_to_meta(name, tensor, args)


def _hf_rope(directory: Path, config: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older versions rope_theta + rope_scaling
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {k: params[k] for k in keys}
    if kind == "linear":
        return theta, _linear_rope_scaling(float(params["factor"]))
    raise CheckpointError(f"{directory}: rope scaling type '{kind}' is not supported; supported: llama3 and linear")


def _hf_chat_template(directory: Path) -> str | None:
    # transformers >= 4.43 saves the template as chat_template.jinja; older ones inside tokenizer_config.json
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


# ---------------------------------------------------------------------------- Meta directory

# How Meta's model-parallel layers (fairscale) split a weight across consolidated.NN.pth shards:
# ColumnParallelLinear splits output features (dim 0), RowParallelLinear input features (dim 1); norms
# are replicated. The embedding is ParallelEmbedding in Llama 1/2 (split on dim 1) and
# VocabParallelEmbedding in Llama 3 (split on dim 0); the shard's own shape tells which.
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _open_meta(directory: Path) -> Checkpoint:
    params_file = directory / "params.json"
    if not params_file.is_file():
        raise CheckpointError(
            f"{directory}: params.json is missing; a Meta checkpoint needs the params.json "
            "that was released beside its consolidated.*.pth files"
        )
    params = json.loads(params_file.read_text(encoding="utf-8"))
    shard_files = sorted(directory.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"{directory}: no consolidated.*.pth weights beside params.json")
    # mmap: opening every shard costs address space, not memory; a weight is read when it is concatenated
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in shard_files]
    dim = params["dim"]
    concat_dims = {
        name: _meta_concat_dim(name, tensor.shape, dim, len(shards))
        for name, tensor in shards[0].items()
        if name != "rope.freqs"
    }  # rope.freqs: recomputed
    shapes = {}
    for name, concat_dim in concat_dims.items():
        shape = list(shards[0][name].shape)
        if concat_dim is not None:
            shape[concat_dim] = sum(shard[name].shape[concat_dim] for shard in shards)
        shapes[name] = tuple(shape)

    vocab_size = params.get("vocab_size", -1)  # Llama 1/2 write -1: the tokenizer decides
    scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1: apply_scaling in llama-models' reference model.py
        scaling = {
            "factor": params.get("rope_scaling_factor", 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": params.get("rope_high_freq_factor", 4.0),
            "original_max_position_embeddings": 8192,
        }
    args = ModelArgs(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=vocab_size if vocab_size > 0 else shapes["tok_embeddings.weight"][0],
        hidden_dim=meta_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in shapes,
        context_length=params.get("max_seq_len", 2048),
    )  # params.json rarely says; Meta's default
    shapes = _check_shapes(directory, shapes, args)

    def read_tensors(_dequantized_dtype, _by_rows=frozenset()):  # nothing quantised in these formats
        for name, concat_dim in concat_dims.items():
            parts = [shard[name] for shard in shards]
            yield name, parts[0] if concat_dim is None else torch.cat(parts, dim=concat_dim)

    tokenizer_file = next(
        (d / "tokenizer.model" for d in (directory, directory.parent) if (d / "tokenizer.model").is_file()), None
    )
    if tokenizer_file is None:
        raise CheckpointError(
            f"{directory}: tokenizer.model not found here or in the parent directory; "
            "copy the tokenizer.model released with the model"
        )
    try:
        tokenizer = SentencePieceTokenizer(tokenizer_file)
    except TokenizerError as e:
        raise CheckpointError(
            f"{tokenizer_file}: {e}; llama_ref reads sentencepiece tokenizers "
            "(Llama 3's tiktoken tokenizer.model is not supported)"
        ) from e
    return Checkpoint(directory, "meta", args, tokenizer, None, shapes, read_tensors)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The feed-forward width exactly as FeedForward.__init__ in Meta's model.py computes it."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _meta_concat_dim(name: str, shard_shape: torch.Size, dim: int, n_shards: int) -> int | None:
    """The dimension this weight is split along across shards, or None if every shard holds all of it."""
    if n_shards == 1 or len(shard_shape) == 1:
        return None
    if name == "tok_embeddings.weight":
        return 0 if shard_shape[1] == dim else 1
    return 1 if name.endswith(ROW_PARALLEL) else 0


# ---------------------------------------------------------------------------- llama2.c .bin

LLAMA2C_MAGIC = 0x616B3432  # "ak42", version 1+ files (export.py version1_export)
LLAMA2C_V1_HEADER_BYTES = 256


def _open_llama2c(path: Path) -> Checkpoint:
    """llama2.c checkpoints, as written by its export.py and read by run.c.

    Version 0 (legacy_export): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; a negative vocab_size means the classifier is not shared), then float32 weights: embedding,
    per-layer attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, two unused
    seq_len x head_dim/2 rope tables, and the classifier if unshared.
    Version 1 (version1_export): uint32 magic "ak42", int32 version, the same 7 int32, a shared-classifier
    byte, zero padding to 256 bytes, then: attention norms, ffn norms, final norm, embedding, wq, wk, wv,
    wo, w1, w2, w3 and the classifier if unshared.
    Weights are in Meta's layout: llama2.c's model.py is Meta's, rotary pairs interleaved.
    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(LLAMA2C_V1_HEADER_BYTES)
    if len(head) < 28:
        raise CheckpointError(f"{path}: only {len(head)} bytes; too short for a llama2.c checkpoint")
    if struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise CheckpointError(
                f"{path}: llama2.c version {version} files are not supported; export the model "
                "with llama2.c's export.py --version 0 or 1 (float32)"
            )
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack_from("<7i", head, 8)
        shared, offset = bool(head[36]), LLAMA2C_V1_HEADER_BYTES
    else:
        version = 0
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack_from("<7i", head)
        shared, offset, vocab_size = vocab_size > 0, 28, abs(vocab_size)
    sizes = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
    if min(sizes) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path}: not a llama2.c checkpoint (its header reads {sizes}); pass a .bin written by llama2.c's export.py"
        )
    # the header alone can claim terabytes: compare its least size with the file before building anything
    kv_dim = dim // n_heads * n_kv_heads
    least_bytes = 4 * (
        n_layers * (2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden_dim) + vocab_size * dim
    )
    if least_bytes > file_size:
        raise CheckpointError(
            f"{path}: {file_size} bytes, but its header {sizes} implies at least {least_bytes}; "
            "the file is truncated or not a llama2.c checkpoint"
        )
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        hidden_dim=hidden_dim,
        norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=shared,
        context_length=seq_len,
    )  # run.c: rmsnorm eps 1e-5, rope base 10000
    shapes = expected_shapes(args)
    layout = _llama2c_layout(args, version)
    rope_tables = seq_len * args.head_dim if version == 0 else 0  # skipped, as run.c does
    expected_bytes = offset + 4 * (sum(math.prod(s) for _, s in layout) + rope_tables)
    if file_size != expected_bytes:
        raise CheckpointError(
            f"{path}: {file_size} bytes, but its header {sizes} implies {expected_bytes}; "
            "the file is truncated or not a llama2.c checkpoint"
        )

    def read_tensors(_dequantized_dtype, _by_rows=frozenset()):  # nothing quantised in these formats
        weights = np.memmap(path, dtype=np.float32, mode="r", offset=offset)
        pos = 0
        for name, shape in layout:
            if name == "output.weight" and version == 0:
                pos += rope_tables
            count = math.prod(shape)
            yield name, torch.from_numpy(np.array(weights[pos : pos + count])).reshape(shape)
            pos += count

    tokenizer_file = path.parent / "tokenizer.bin"
    if not tokenizer_file.is_file():
        raise CheckpointError(
            f"{path}: tokenizer.bin not found beside it; copy the tokenizer.bin from the "
            "llama2.c repository (or the one exported with this model) into that folder"
        )
    try:
        tokenizer = read_llama2c_tokenizer(tokenizer_file, vocab_size)
    except TokenizerError as e:
        raise CheckpointError(f"{tokenizer_file}: {e} (model {path})") from e
    return Checkpoint(path, "llama2c", args, tokenizer, None, shapes, read_tensors)


def _llama2c_layout(args: ModelArgs, version: int) -> list[tuple[str, tuple[int, ...]]]:
    """(Meta name, shape) in file order."""
    shapes = expected_shapes(args)

    def per_layer(part: str):
        return [(f"layers.{i}.{part}.weight", shapes[f"layers.{i}.{part}.weight"]) for i in range(args.n_layers)]

    matrices = [
        entry for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo") for entry in per_layer(part)
    ]
    ffn = [entry for part in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3") for entry in per_layer(part)]
    embedding, norm = ("tok_embeddings.weight", shapes["tok_embeddings.weight"]), ("norm.weight", (args.dim,))
    if version == 0:
        layout = [embedding, *per_layer("attention_norm"), *matrices, *per_layer("ffn_norm"), *ffn, norm]
    else:
        layout = [*per_layer("attention_norm"), *per_layer("ffn_norm"), norm, embedding, *matrices, *ffn]
    if not args.tie_embeddings:
        layout.append(("output.weight", shapes["output.weight"]))
    return layout


# ---------------------------------------------------------------------------- the formats, in detection order

FORMATS: tuple[Format, ...] = (
    Format("hf", "a Hugging Face model directory", "config.json (Hugging Face)", _is_hf, _open_hf),
    Format("meta", "a Meta model directory", "params.json (Meta)", _is_meta, _open_meta),
    Format("gguf", "a .gguf file", "single .gguf file", _is_gguf, _open_gguf),
    Format("llama2c", "a llama2.c .bin file", "", _is_llama2c, _open_llama2c),
)
