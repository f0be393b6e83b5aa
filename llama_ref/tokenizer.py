"""Tokenizers behind one interface: encode(s, bos, eos), decode(ids), bos_id, eos_id, pad_id, stop_ids.

Three kinds of vocabulary reach llama_ref:
- SentencePieceTokenizer: a sentencepiece `tokenizer.model` (Meta checkpoints, some HF directories).
- BPETokenizer: what the Hugging Face `tokenizers` library runs: a directory's tokenizer.json, or the
  byte-level BPE of a GGUF "gpt2" vocabulary rebuilt from its tokens and merges.
- PieceScoreTokenizer: SentencePiece-style pieces with scores but no model file (GGUF "llama" vocabularies
  and llama2.c's tokenizer.bin), encoded in Python by merging the best-scoring adjacent pair first.

Every tokenizer knows the bytes each token stands for. Decoding joins those bytes, so StreamDecoder can
hand out text as soon as it forms whole characters, and decode(ids) is exactly what streaming prints.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import json
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from llama_ref.errors import LlamaRefError

# Tokens that end a turn in the chat formats llama_ref meets; generation stops on any that the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>")
# What sentencepiece prints for its unknown piece (TrainerSpec.unk_surface default, " \u2047 ").
UNKNOWN_SURFACE = " \u2047 ".encode()
SPIECE_SPACE = "\u2581"  # sentencepiece writes a space as "▁"


class TokenizerError(LlamaRefError, ValueError):
    """A vocabulary that cannot be used; checkpoints.py adds the file name."""


class Tokenizer:
    """The common interface. Subclasses supply the bytes of every token and encode plain text."""

    pad_id = -1  # like upstream sentencepiece: padding is never a real token

    def __init__(
        self,
        *,
        token_bytes: Sequence[bytes],
        bos_id: int,
        eos_id: int,
        special_ids: Mapping[str, int],
        add_bos: bool,
        strips_leading_space: bool,
        extra_stop_ids: Iterable[int] = (),
    ):
        self.token_bytes = token_bytes
        self.n_words = len(token_bytes)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.special_ids = dict(special_ids)  # control and user-defined tokens, matched whole in text
        self.add_bos = add_bos  # whether this model's prompts start with bos (SmolLM's do not)
        # sentencepiece adds a space before the text, so decoding drops the first one again
        self.strips_leading_space = strips_leading_space
        turn_ends = (self.special_ids[t] for t in END_OF_TURN_TOKENS if t in self.special_ids)
        self.stop_ids = {eos_id, *turn_ends, *extra_stop_ids}
        self.stop_ids.discard(-1)
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = [self.bos_id] if bos else []
        ids += self._encode_with_specials(s)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        stream = StreamDecoder(self)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def encode_text(self, text: str) -> list[int]:
        """`text` as text only: a special token's name in it ("<|im_end|>") is spelled out as characters,
        never that token, so that text from a user or a file cannot forge a chat's control tokens."""
        return self._encode_text(text)

    def _encode_with_specials(self, text: str) -> list[int]:
        # Each stretch of plain text is encoded on its own, as llama.cpp does: a sentencepiece vocabulary
        # gets its dummy space prefix again after every special token.
        ids: list[int] = []
        for piece, special_id in self.split_specials(text):
            if piece is None:
                assert special_id is not None  # split_specials gives one of the two
                ids.append(special_id)
            else:
                ids += self._encode_text(piece)
        return ids

    def split_specials(self, text: str) -> Iterator[tuple[str | None, int | None]]:
        """(text, None) for each stretch of plain text and (None, id) for each special token's name, in order."""
        pos = 0
        for match in self._special_pattern.finditer(text) if self._special_pattern else ():
            if match.start() > pos:
                yield text[pos : match.start()], None
            yield None, self.special_ids[match.group()]
            pos = match.end()
        if pos < len(text):
            yield text[pos:], None

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError


class StreamDecoder:
    """Turns token ids into text one at a time, never splitting a multi-byte character.

    push() returns the text completed by this token ("" while a character is still incomplete);
    flush() returns whatever is left at the end (U+FFFD only for bytes that never formed a character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._token_bytes = tokenizer.token_bytes
        self._strip_next_space = tokenizer.strips_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        # ids past the tokenizer (padding rows of a larger embedding) stand for no text
        data = self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""
        if self._strip_next_space and data:
            self._strip_next_space = False
            data = data.removeprefix(b" ")
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------- sentencepiece model file


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece tokenizer.model, encoded by the sentencepiece library itself."""

    def __init__(self, model_path: str | Path):
        from sentencepiece import SentencePieceProcessor

        try:
            self._sp = sp = SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"not a sentencepiece model ({e})") from e
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        token_bytes = []
        for i, piece in enumerate(pieces):
            if sp.is_control(i) or sp.is_unused(i):
                token_bytes.append(b"")
            elif sp.is_unknown(i):
                token_bytes.append(UNKNOWN_SURFACE)
            elif sp.is_byte(i):
                token_bytes.append(_byte_piece_value(piece))
            else:
                token_bytes.append(piece.replace(SPIECE_SPACE, " ").encode())
        # sentencepiece only strips the space it adds itself: its add_dummy_prefix shows on any encoding
        adds_prefix = sp.encode("a", out_type=str)[0].startswith(SPIECE_SPACE)
        super().__init__(
            token_bytes=token_bytes,
            bos_id=sp.bos_id(),
            eos_id=sp.eos_id(),
            special_ids={p: i for i, p in enumerate(pieces) if sp.is_control(i)},
            add_bos=True,
            strips_leading_space=adds_prefix,
        )

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)


# ---------------------------------------------------------------------------- HF tokenizers (BPE)


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` Tokenizer, which encodes; decoding goes through each token's bytes.

    byte_level: tokens are spelled in GPT-2's byte alphabet (GPT-2, Llama 3, SmolLM). Otherwise they are
    sentencepiece-style ("▁" for a space, <0xNN> byte-fallback pieces), as in Llama 2's tokenizer.json.
    """

    def __init__(
        self,
        backend,
        *,
        byte_level: bool,
        strips_leading_space: bool,
        bos_id: int,
        eos_id: int,
        add_bos: bool,
        extra_stop_ids: Iterable[int] = (),
    ):
        self._backend = backend
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        alphabet = _byte_level_alphabet()
        token_bytes = []
        for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
            token = backend.id_to_token(token_id)
            if token is None or (token_id in added and added[token_id].special):
                token_bytes.append(b"")
            elif token_id in added:
                token_bytes.append(added[token_id].content.encode())
            elif byte_level:
                # a token outside the byte alphabet is spelled as plain text (some vocabularies mislabel)
                in_alphabet = all(c in alphabet for c in token)
                token_bytes.append(bytes(alphabet[c] for c in token) if in_alphabet else token.encode())
            elif _is_byte_piece(token):
                token_bytes.append(_byte_piece_value(token))
            else:
                token_bytes.append(token.replace(SPIECE_SPACE, " ").encode())
        super().__init__(
            token_bytes=token_bytes,
            bos_id=bos_id,
            eos_id=eos_id,
            special_ids={t.content: i for i, t in added.items()},
            add_bos=add_bos,
            strips_leading_space=strips_leading_space,
            extra_stop_ids=extra_stop_ids,
        )

    def _encode_with_specials(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids  # the library matches added tokens

    def _encode_text(self, text: str) -> list[int]:
        return self._text_backend.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _text_backend(self):
        """A copy of the backend that spells special tokens' names as text (encode_special_tokens): a
        setting of the whole object, so a copy, not a toggle another thread's encode could see."""
        copy = type(self._backend).from_str(self._backend.to_str())
        copy.encode_special_tokens = True
        return copy


def _decoder_types(decoder: dict | None) -> set[str]:
    """The decoder step names in a tokenizer.json, looking inside Sequence decoders."""
    if not decoder:
        return set()
    if decoder["type"] == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder["decoders"]))
    if decoder["type"] == "Metaspace" and decoder.get("prepend_scheme") == "never":
        return set()  # a Metaspace that never added a space has none to strip
    return {decoder["type"]}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level spelling (its encoder.py, followed by HF ByteLevel and GGUF "gpt2" vocabularies):
    printable Latin-1 bytes stand for themselves, the other 68 bytes are moved to U+0100 onward."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    moved = (b for b in range(256) if b not in alphabet.values())
    alphabet.update({chr(0x100 + n): b for n, b in enumerate(moved)})
    return alphabet


def load_hf_tokenizer(directory: Path, config: Mapping) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model from a Hugging Face model directory.

    bos/eos come from tokenizer_config.json, falling back to config.json's ids; every id in
    generation_config.json's eos_token_id also stops generation.
    """
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    generation_config = _read_json(directory / "generation_config.json")
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as Backend

        spec = (directory / "tokenizer.json").read_text(encoding="utf-8")
        backend = Backend.from_str(spec)
        decoders = _decoder_types(json.loads(spec).get("decoder"))
        byte_level = "ByteLevel" in decoders
        bos_id = _token_id(backend, tokenizer_config.get("bos_token"), config.get("bos_token_id"))
        eos_id = _token_id(backend, tokenizer_config.get("eos_token"), config.get("eos_token_id"))
        # the post-processor shows whether this tokenizer puts bos in front of a prompt
        adds_bos = bos_id in backend.encode("", add_special_tokens=True).ids
        return BPETokenizer(
            backend,
            byte_level=byte_level,
            strips_leading_space=not byte_level and bool({"Strip", "Metaspace"} & decoders),
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=tokenizer_config.get("add_bos_token", adds_bos),
            extra_stop_ids=_id_list(config.get("eos_token_id")) + _id_list(generation_config.get("eos_token_id")),
        )
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model")
    raise TokenizerError("no tokenizer.json or tokenizer.model; copy the tokenizer files from the model's repository")


def _token_id(backend, token, fallback_id) -> int:
    content = token.get("content") if isinstance(token, dict) else token
    token_id = backend.token_to_id(content) if content else None
    if token_id is not None:
        return token_id
    ids = _id_list(fallback_id)
    return ids[0] if ids else -1


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ---------------------------------------------------------------------------- pieces with scores


class PieceScoreTokenizer(Tokenizer):
    """SentencePiece-style BPE over a list of pieces and scores.

    Encoding follows llama2.c's run.c `encode` and llama.cpp's SPM tokenizer, which both reproduce
    sentencepiece's BPE: prefix a space, start from single characters, repeatedly merge the adjacent pair
    whose concatenation is the best-scoring piece (leftmost on ties), and spell characters that are not
    pieces with <0xNN> byte pieces. A heap keeps this O(n log n) instead of run.c's O(n^2) rescans.
    Pieces are given with real spaces (not "▁").
    """

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        kinds: Sequence[str],
        *,
        bos_id: int,
        eos_id: int,
        unk_id: int,
        add_bos: bool = True,
        add_space_prefix: bool = True,
        extra_stop_ids: Iterable[int] = (),
    ):
        # kinds, as GGUF token types: normal, unknown, control, user (user-defined), unused, byte
        self._score = {p: s for p, s, k in zip(pieces, scores, kinds) if k == "normal"}
        self._piece_id = {p: i for i, (p, k) in enumerate(zip(pieces, kinds)) if k == "normal"}
        self._byte_id = {_byte_piece_value(p)[0]: i for i, (p, k) in enumerate(zip(pieces, kinds)) if k == "byte"}
        self._unk_id = unk_id
        self._add_space_prefix = add_space_prefix
        surface = {"control": b"", "unused": b"", "unknown": UNKNOWN_SURFACE}
        token_bytes = [
            _byte_piece_value(p) if k == "byte" else surface.get(k, p.encode()) for p, k in zip(pieces, kinds)
        ]
        super().__init__(
            token_bytes=token_bytes,
            bos_id=bos_id,
            eos_id=eos_id,
            special_ids={p: i for i, (p, k) in enumerate(zip(pieces, kinds)) if k in ("control", "user")},
            add_bos=add_bos,
            strips_leading_space=add_space_prefix,
            extra_stop_ids=extra_stop_ids,
        )

    def _encode_text(self, text: str) -> list[int]:
        if self._add_space_prefix:
            text = " " + text
        ids = []
        for symbol in self._merge_best_pairs(list(text)):
            if symbol in self._piece_id:
                ids.append(self._piece_id[symbol])
            elif self._byte_id:
                ids += [self._byte_id[b] for b in symbol.encode()]
            else:
                ids.append(self._unk_id)
        return ids

    def _merge_best_pairs(self, symbols: list[str | None]) -> list[str]:
        """Merge neighbours, the best-scored pair first, in `symbols`: a symbol merged into its left neighbour
        becomes None. next_of and prev_of link the symbols still there."""
        n = len(symbols)
        next_of = list(range(1, n + 1))
        prev_of = list(range(-1, n - 1))
        candidates: list[tuple[float, int, str]] = []

        def consider(left: int) -> None:
            right = next_of[left]
            if right < n:
                left_symbol, right_symbol = symbols[left], symbols[right]
                assert left_symbol is not None and right_symbol is not None  # linked symbols are still there
                merged = left_symbol + right_symbol
                if merged in self._score:
                    heapq.heappush(candidates, (-self._score[merged], left, merged))

        for i in range(n - 1):
            consider(i)
        while candidates:
            _, left, merged = heapq.heappop(candidates)
            right = next_of[left]
            left_symbol = symbols[left]
            if left_symbol is None or right >= n:
                continue  # merged away since this pair was scored
            right_symbol = symbols[right]
            assert right_symbol is not None  # linked symbols are still there
            if left_symbol + right_symbol != merged:
                continue  # a neighbour changed since this pair was scored
            symbols[left], symbols[right] = merged, None
            next_of[left] = next_of[right]
            if next_of[left] < n:
                prev_of[next_of[left]] = left
            if prev_of[left] >= 0:
                consider(prev_of[left])
            consider(left)
        return [s for s in symbols if s is not None]


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _byte_piece_value(piece: str) -> bytes:
    return bytes([int(piece[3:5], 16)])  # "<0x0A>" -> b"\n"


# ---------------------------------------------------------------------------- GGUF metadata

GGUF_TOKEN_KINDS = {0: "normal", 1: "normal", 2: "unknown", 3: "control", 4: "user", 5: "unused", 6: "byte"}

# tokenizer.ggml.pre -> how text is split before BPE, as llama.cpp's llama-vocab.cpp does for that name.
# GPT-2's own split (used inside ByteLevel) is: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
# Qwen2's split is Llama 3's with digits one at a time (tokenizer.json of Qwen2/Qwen2.5 models)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN2_FAMILY = ("qwen2", "deepseek-r1-qwen")
LLAMA3_FAMILY = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "pixtral", "dbrx")
PLAIN_GPT2 = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes from its tokenizer.ggml.* metadata (values as gguf's reader
    decodes them: each key's type is whatever the file says, so they are Any here)."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("has no tokenizer.ggml.tokens; it carries no vocabulary to tokenize with")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    kinds = [GGUF_TOKEN_KINDS.get(t, "normal") for t in types]
    bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    end_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    if model == "gpt2":
        backend = _byte_level_bpe(
            tokens, kinds, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre", "default")
        )
        return BPETokenizer(
            backend,
            byte_level=True,
            strips_leading_space=False,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=meta.get("tokenizer.ggml.add_bos_token", False),
            extra_stop_ids=end_ids,
        )
    if model == "llama":
        return PieceScoreTokenizer(
            [t.replace(SPIECE_SPACE, " ") for t in tokens],
            meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            kinds,
            bos_id=bos_id,
            eos_id=eos_id,
            unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
            add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
            add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
            extra_stop_ids=end_ids,
        )
    raise TokenizerError(
        f"tokenizer.ggml.model '{model}' is not supported; supported: gpt2 (byte-level BPE) and llama (SentencePiece)"
    )


def _byte_level_bpe(tokens: Sequence[str], kinds: Sequence[str], merges: Sequence[str], pre: str):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[cast("tuple[str, str]", tuple(m.split(" ", 1))) for m in merges],  # "a b" -> ("a", "b")
        ignore_merges=pre in LLAMA3_FAMILY,
    )  # llama.cpp takes a whole word that is in the vocab
    backend = Backend(bpe)
    if pre in DIGITS_THEN_GPT2:
        split = [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    elif pre in LLAMA3_FAMILY or pre in QWEN2_FAMILY:
        pattern = LLAMA3_SPLIT if pre in LLAMA3_FAMILY else QWEN2_SPLIT
        split = [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    elif pre in PLAIN_GPT2:
        split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        known = ", ".join(DIGITS_THEN_GPT2 + LLAMA3_FAMILY + QWEN2_FAMILY + PLAIN_GPT2)
        raise TokenizerError(f"tokenizer.ggml.pre '{pre}' is not supported; supported: {known}")
    backend.pre_tokenizer = pre_tokenizers.Sequence(split)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == "control"]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == "user"])
    return backend


# ---------------------------------------------------------------------------- llama2.c tokenizer.bin


def read_llama2c_tokenizer(path: Path, vocab_size: int) -> PieceScoreTokenizer:
    """llama2.c's tokenizer.bin, as tokenizer.py `export` writes it and run.c `build_tokenizer` reads it:
    uint32 max_token_length, then per token float32 score, int32 length, UTF-8 bytes. Pieces use real
    spaces; ids 0, 1, 2 are <unk>, <s> (written "\\n<s>\\n") and </s> (written "\\n</s>\\n")."""
    data = path.read_bytes()
    pieces: list[str] = []
    scores: list[float] = []
    pos = 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise TokenizerError(f"ends inside token {len(pieces)}; the file is truncated")
        score, length = struct.unpack_from("<fi", data, pos)
        if length < 0 or pos + 8 + length > len(data):
            raise TokenizerError(f"ends inside token {len(pieces)}; the file is truncated or corrupt")
        pieces.append(data[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
        scores.append(score)
        pos += 8 + length
    if len(pieces) != vocab_size:
        raise TokenizerError(
            f"has {len(pieces)} tokens but the model's vocabulary has {vocab_size}; "
            "use the tokenizer.bin the model was trained with"
        )
    kinds = ["byte" if _is_byte_piece(p) else "normal" for p in pieces]
    kinds[:3] = ["unknown", "control", "control"]
    pieces[1:3] = ["<s>", "</s>"]  # the sentencepiece names that export replaced
    return PieceScoreTokenizer(pieces, scores, kinds, bos_id=1, eos_id=2, unk_id=0)
