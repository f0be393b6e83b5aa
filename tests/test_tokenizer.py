"""Tokenizers: the default model's vocabulary against Hugging Face tokenizers, sentencepiece round trips,
and streaming decode that never breaks a character."""

import pytest
from markdown_it import MarkdownIt
from tiny_checkpoints import SEED_AR, SEED_ZH, train_sentencepiece

from llama_ref.tokenizer import SentencePieceTokenizer, StreamDecoder, load_hf_tokenizer

CODE_BLOCKS = [token.content for token in MarkdownIt().parse(SEED_ZH) if token.type == "fence"]
SAMPLES = [SEED_ZH, SEED_AR, *CODE_BLOCKS]
EDGE_CASES = [
    "",
    " ",
    "  leading spaces",
    "trailing space ",
    "\n\nnewlines\n",
    "x    42  and 7",
    "🦙 llama ☕",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm():
    """The default model's tokenizer, built by llama_ref from the GGUF metadata."""
    pytest.importorskip("gguf")
    from llama_ref.catalog import resolve_model
    from llama_ref.checkpoints import open_checkpoint

    return open_checkpoint(resolve_model("smollm2-135m")).tokenizer


@pytest.fixture(scope="module")
def smollm_reference():
    """transformers' tokenizer for the same GGUF file, with SmolLM2's own pre-tokenizer.

    SmolLM2's tokenizer.json splits every digit off before byte-level BPE (Digits(individual_digits=True),
    then ByteLevel), and llama.cpp does the same for tokenizer.ggml.pre "smollm". transformers' GGUF
    loader applies plain GPT-2 splitting instead, which differs on runs of spaces before a digit (the
    nvidia-smi table in the seed post), so the reference gets the model's real pre-tokenizer back.
    """
    from tokenizers import pre_tokenizers

    from llama_ref.catalog import resolve_model

    path = resolve_model("smollm2-135m")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        transformers = pytest.importorskip("transformers")
        reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.mark.slow
def test_default_model_vocabulary_encodes_like_hf_tokenizers(smollm, smollm_reference):
    assert len(CODE_BLOCKS) >= 3
    for text in SAMPLES + EDGE_CASES:
        expected = smollm_reference.encode(text, add_special_tokens=False)
        assert smollm.encode(text, bos=False, eos=False) == expected, text[:60]
        assert smollm.decode(expected) == smollm_reference.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_default_model_special_tokens(smollm):
    ids = smollm.encode("<|im_start|>user\nHi<|im_end|>", bos=False, eos=False)
    assert ids[0] == smollm.bos_id == 1 and ids[-1] == smollm.eos_id == 2
    assert smollm.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smollm.pad_id == -1 and smollm.n_words == 49152
    assert smollm.add_bos is False  # tokenizer.ggml.add_bos_token: SmolLM2 prompts start without <|im_start|>
    assert smollm.decode(ids) == "user\nHi"  # control tokens print nothing, like skip_special_tokens


@pytest.mark.slow
def test_default_model_vocabulary_round_trips_the_seeds(smollm):
    for text in SAMPLES + EDGE_CASES[:-1]:
        assert smollm.decode(smollm.encode(text, bos=True, eos=True)) == text


@pytest.mark.slow
def test_tokenizer_json_directory_encodes_like_hf(tmp_path, smollm_reference):
    smollm_reference.save_pretrained(tmp_path)
    tokenizer = load_hf_tokenizer(tmp_path, config={})
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    for text in SAMPLES + EDGE_CASES:
        expected = smollm_reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, bos=False, eos=False) == expected
        assert tokenizer.decode(expected) == smollm_reference.decode(expected, skip_special_tokens=True)


def test_sentencepiece_style_tokenizer_json_encodes_like_hf(tmp_path, monkeypatch):
    """A Llama-2-style tokenizer.json (Metaspace, byte fallback), as transformers writes it for a GGUF
    sentencepiece vocabulary: the same ids and text as transformers, and as sentencepiece on the posts."""
    import sentencepiece

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from tiny_checkpoints import make_tiny_model, write_gguf

    tiny = make_tiny_model(tmp_path)
    write_gguf(tiny, tmp_path / "gguf" / "tiny.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "gguf"), gguf_file="tiny.gguf")
    reference.save_pretrained(tmp_path / "hf")
    tokenizer = load_hf_tokenizer(tmp_path / "hf", config={})
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny.tokenizer_model))
    for text in SAMPLES:
        expected = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, bos=False, eos=False) == expected
        assert tokenizer.decode(expected) == reference.decode(expected, skip_special_tokens=True)
    for text in (SEED_ZH, SEED_AR):  # HF's Metaspace adds no "▁" before text that starts with a space; these don't
        assert tokenizer.encode(text, bos=False, eos=False) == sp.encode(text)
        assert tokenizer.decode(sp.encode(text)) == text
    assert tokenizer.add_bos and tokenizer.bos_id == 1 and tokenizer.stop_ids == {2, sp.piece_to_id("<|im_end|>")}


def test_sentencepiece_model_round_trips_and_matches_the_library(sentencepiece_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tokenizer = SentencePieceTokenizer(sentencepiece_model)
    for text in SAMPLES + EDGE_CASES[:-1]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids == [sp.bos_id(), *sp.encode(text), sp.eos_id()]
        assert tokenizer.decode(ids) == sp.decode(ids) == text
    assert tokenizer.n_words == 512 and tokenizer.stop_ids == {sp.eos_id(), sp.piece_to_id("<|im_end|>")}


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("text", [SEED_ZH, SEED_AR], ids=["zh", "ar"])
def test_streaming_never_breaks_a_character(sentencepiece_model, text):
    tokenizer = SentencePieceTokenizer(sentencepiece_model)
    ids = tokenizer.encode(text, bos=True, eos=False)
    byte_tokens = [i for i in ids if len(tokenizer.token_bytes[i]) == 1 and tokenizer.token_bytes[i][0] >= 0x80]
    assert len(byte_tokens) >= 10  # characters outside the tiny vocabulary arrive one byte at a time
    pieces = stream(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("text", [SEED_ZH, SEED_AR], ids=["zh", "ar"])
def test_streaming_the_default_vocabulary(smollm, text):
    ids = smollm.encode(text, bos=False, eos=False)
    pieces = stream(smollm, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == smollm.decode(ids) == text
    assert "" in pieces  # some tokens end inside a character, and those wait for the rest


def test_stream_flush_reports_a_character_that_never_completed(sentencepiece_model):
    tokenizer = SentencePieceTokenizer(sentencepiece_model)
    first_byte_of_a_chinese_char = next(i for i, b in enumerate(tokenizer.token_bytes) if b == b"\xe4")
    decoder = StreamDecoder(tokenizer)
    assert decoder.push(first_byte_of_a_chinese_char) == ""
    assert decoder.flush() == "\ufffd"
