"""Tiny checkpoints in every format llama_ref reads, all written from ONE set of random weights.

The writers produce what users have on disk, following each format's own converter rather than
llama_ref's reader: a GGUF as llama.cpp's convert_hf_to_gguf.py writes it (Meta's rotary layout, optional
quantisation), a Hugging Face directory (q/k rows permuted as HF's convert_llama_weights_to_hf.py does), a
Meta directory split into model-parallel shards the way fairscale splits them, and llama2.c version 0 and 1
.bin files with tokenizer.bin (llama2.c's export.py and tokenizer.py). The vocabulary is a sentencepiece
BPE model trained here on the seed posts, so every format's tokenizer can be checked against
sentencepiece itself.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_ref.model import ModelArgs, Transformer

# The seed posts: the Chinese post and its broken Arabic machine translation, with prose, code blocks and a
# terminal table full of digits and runs of spaces.
SEED_ZH = (Path(__file__).parent / "data" / "seed_zh.md").read_text(encoding="utf-8")
SEED_AR = (Path(__file__).parent / "data" / "seed_ar_broken.md").read_text(encoding="utf-8")
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GGUF_TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "byte": 6}


def train_sentencepiece(path: Path, vocab_size: int = 512) -> Path:
    """A Llama-style sentencepiece BPE model (byte fallback, digits split, no normalisation) on the seed posts."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((SEED_ZH + SEED_AR).splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        control_symbols=list(CONTROL_TOKENS),
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


@dataclass
class TinyModel:
    args: ModelArgs
    weights: dict[str, torch.Tensor]  # Meta names and rotary layout, float32
    tokenizer_model: Path  # the sentencepiece model the vocabulary comes from

    def pieces(self):
        """(piece, score, kind) for every id, as sentencepiece reports them."""
        return sentencepiece_pieces(self.tokenizer_model)


def sentencepiece_pieces(tokenizer_model: Path):
    """(piece, score, kind) for every id of a sentencepiece model, as sentencepiece reports them."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    for i in range(sp.get_piece_size()):
        kind = (
            "control" if sp.is_control(i) else "unknown" if sp.is_unknown(i) else "byte" if sp.is_byte(i) else "normal"
        )
        yield sp.id_to_piece(i), sp.get_score(i), kind


def make_tiny_model(directory: Path, *, tie_embeddings: bool = False, seed: int = 0) -> TinyModel:
    """Random weights for a 2-layer model with grouped-query attention over a freshly trained vocabulary.

    Weights are large enough (and norms far enough from 1) that any misplaced row or column changes
    the logits visibly. hidden_dim 192 is what Meta's FeedForward computes for dim 64, multiple_of 32.
    """
    tokenizer_model = train_sentencepiece(directory / "tokenizer.model")
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        hidden_dim=192,
        norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=tie_embeddings,
        context_length=128,
    )
    generator = torch.Generator().manual_seed(seed)
    reference = Transformer(args)
    weights = {}
    for name, param in reference.state_dict().items():
        if name == "output.weight" and tie_embeddings:
            continue
        noise = torch.randn(param.shape, generator=generator)
        weights[name] = 1 + 0.2 * noise if param.ndim == 1 else 0.3 * noise
    return TinyModel(args, weights, tokenizer_model)


def build_transformer(args: ModelArgs, weights) -> Transformer:
    """A model.Transformer holding `weights` (Meta names), in float32, ready for forward()."""
    weights = {name: tensor.float() for name, tensor in weights}
    if args.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model = Transformer(args)
    model.load_state_dict(weights, strict=True)
    model.setup_caches(max_batch_size=4, max_seq_len=args.context_length)
    return model


# ---------------------------------------------------------------------------- GGUF

GGUF_LAYER_PARTS = {
    "attention_norm": "attn_norm",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
}


def gguf_name(meta_name: str) -> str:
    top = {
        "tok_embeddings.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "output.weight": "output.weight",
    }
    if meta_name in top:
        return top[meta_name]
    _, layer, rest = meta_name.split(".", 2)
    return f"blk.{layer}.{GGUF_LAYER_PARTS[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    model: TinyModel,
    path: Path,
    qtype=None,
    *,
    architecture: str = "llama",
    rope_scaling: dict | None = None,
    weights: dict | None = None,
) -> Path:
    """A llama GGUF like llama.cpp writes: Meta-layout q/k, norms in F32, matrices in `qtype` (default F32),
    a sentencepiece ("llama") vocabulary, the chat template, and Llama 3.1 rope scaling as rope_freqs."""
    import gguf
    from gguf.quants import quantize

    qtype = qtype or gguf.GGMLQuantizationType.F32
    args = model.args
    writer = gguf_writer(path, architecture, args, model.tokenizer_model)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, tensor in (weights or model.weights).items():
        array = tensor.float().numpy()
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array)
        else:
            writer.add_tensor(gguf_name(name), quantize(array, qtype), raw_dtype=qtype)
    if rope_scaling:
        writer.add_tensor("rope_freqs.weight", llama3_rope_divisors(args.head_dim, args.rope_theta, rope_scaling))
    return close_gguf(writer, path)


def gguf_writer(path: Path, architecture: str, args: ModelArgs | None = None, tokenizer_model: Path | None = None):
    """A gguf.GGUFWriter for `path` holding what convert_hf_to_gguf.py writes of every model: the shape of
    `args` and the sentencepiece ("llama") vocabulary of `tokenizer_model` with the chat template. Add the
    tensors (and any other keys), then close_gguf()."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    if args is not None:
        writer.add_block_count(args.n_layers)
        writer.add_context_length(args.context_length)
        writer.add_embedding_length(args.dim)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_rope_freq_base(args.rope_theta)
    if tokenizer_model is not None:
        pieces, scores, kinds = zip(*sentencepiece_pieces(tokenizer_model))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(list(pieces))
        writer.add_token_scores(list(scores))
        writer.add_token_types([GGUF_TOKEN_TYPES[k] for k in kinds])
        writer.add_chat_template(CHATML_TEMPLATE)
    return writer


def close_gguf(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_unsupported_gguf(path: Path) -> Path:
    """A one-block GGUF whose ffn_down matrix is IQ2_XXS, a quantisation llama_ref does not read."""
    import gguf

    writer = gguf_writer(path, "llama")
    writer.add_block_count(1)
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS][1]
    writer.add_tensor(
        "blk.0.ffn_down.weight",
        np.zeros((64, block_bytes), dtype=np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS,
    )
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    return close_gguf(writer, path)


def llama3_rope_divisors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Llama 3.1 rope scaling as per-frequency divisors, the way convert_hf_to_gguf.py computes rope_freqs."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            divisors.append(1.0)
        elif wavelen > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


# ---------------------------------------------------------------------------- Hugging Face

HF_LAYER_PARTS = {
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}


def hf_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's convert_llama_weights_to_hf.py `permute`: Meta's interleaved rotary pairs -> rotate-half order."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_hf(model: TinyModel, directory: Path) -> Path:
    """config.json, weights in two safetensors shards with an index, and tokenizer.model."""
    from safetensors.torch import save_file

    args = model.args
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.context_length,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    hf = {}
    for name, tensor in model.weights.items():
        if name.endswith("attention.wq.weight"):
            tensor = hf_permute(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = hf_permute(tensor, args.n_kv_heads)
        hf[hf_name(name)] = tensor.contiguous()
    names = sorted(hf)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, shard_names in shards.items():
        save_file({n: hf[n] for n in shard_names}, str(directory / file), metadata={"format": "pt"})
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(model.tokenizer_model, directory / "tokenizer.model")
    return directory


def hf_name(meta_name: str) -> str:
    top = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if meta_name in top:
        return top[meta_name]
    _, layer, rest = meta_name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER_PARTS[rest.removesuffix('.weight')]}.weight"


# ---------------------------------------------------------------------------- Meta


def write_meta(model: TinyModel, directory: Path, n_shards: int = 2) -> Path:
    """params.json and consolidated.0N.pth shards, split as Llama 2's fairscale layers split them;
    tokenizer.model goes to the parent directory, as in facebookresearch/llama's download layout."""
    args = model.args
    directory.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "multiple_of": 32,
        "norm_eps": args.norm_eps,
        "vocab_size": -1,
    }
    (directory / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for name, tensor in model.weights.items():
        if tensor.ndim == 1:
            parts = [tensor] * n_shards  # RMSNorm weights are replicated
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
            parts = tensor.chunk(n_shards, dim=1)  # RowParallelLinear, ParallelEmbedding
        else:
            parts = tensor.chunk(n_shards, dim=0)  # ColumnParallelLinear
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for shard in shards:
        shard["rope.freqs"] = torch.ones(args.head_dim // 2)  # Llama 2 shards carry this unused buffer
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    shutil.copy(model.tokenizer_model, directory.parent / "tokenizer.model")
    return directory


# ---------------------------------------------------------------------------- llama2.c


def write_llama2c(model: TinyModel, path: Path, version: int) -> Path:
    """A llama2.c checkpoint as export.py's legacy_export (version 0) or version1_export writes it,
    with tokenizer.bin beside it."""
    args = model.args
    w = model.weights
    path.parent.mkdir(parents=True, exist_ok=True)

    def layers(part):
        return [w[f"layers.{i}.{part}.weight"] for i in range(args.n_layers)]

    header = [
        args.dim,
        args.hidden_dim,
        args.n_layers,
        args.n_heads,
        args.n_kv_heads,
        args.vocab_size,
        args.context_length,
    ]
    matrices = [*layers("attention.wq"), *layers("attention.wk"), *layers("attention.wv"), *layers("attention.wo")]
    ffn = [*layers("feed_forward.w1"), *layers("feed_forward.w2"), *layers("feed_forward.w3")]
    with path.open("wb") as f:
        if version == 0:
            header[5] = args.vocab_size if args.tie_embeddings else -args.vocab_size
            f.write(struct.pack("<7i", *header))
            angles = torch.outer(
                torch.arange(args.context_length).float(),
                1.0 / 10000.0 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim),
            )
            tensors = [
                w["tok_embeddings.weight"],
                *layers("attention_norm"),
                *matrices,
                *layers("ffn_norm"),
                *ffn,
                w["norm.weight"],
                torch.cos(angles),
                torch.sin(angles),
            ]
        else:
            f.write(struct.pack("<Ii", 0x616B3432, 1) + struct.pack("<7i", *header))
            f.write(struct.pack("<B", int(args.tie_embeddings)))
            f.write(b"\0" * (256 - f.tell()))
            tensors = [
                *layers("attention_norm"),
                *layers("ffn_norm"),
                w["norm.weight"],
                w["tok_embeddings.weight"],
                *matrices,
                *ffn,
            ]
        if not args.tie_embeddings:
            tensors.append(w["output.weight"])
        for tensor in tensors:
            f.write(tensor.float().numpy().astype("<f4").tobytes())
    write_llama2c_tokenizer(model, path.parent / "tokenizer.bin")
    return path


def write_llama2c_tokenizer(model: TinyModel, path: Path, drop_last: int = 0) -> Path:
    """tokenizer.bin as llama2.c's tokenizer.py `export` writes it; drop_last leaves tokens out (for errors)."""
    entries = []
    for i, (piece, score, _) in enumerate(model.pieces()):
        piece = {1: "\n<s>\n", 2: "\n</s>\n"}.get(i, piece).replace("\u2581", " ")
        entries.append((piece.encode(), score))
    entries = entries[: len(entries) - drop_last]
    with path.open("wb") as f:
        f.write(struct.pack("<I", max(len(b) for b, _ in entries)))
        for data, score in entries:
            f.write(struct.pack("<fI", score, len(data)) + data)
    return path
