"""Every checkpoint format loads to the same model; bad files give one clear line naming the file."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from tiny_checkpoints import (  # noqa: E402
    SEED_AR,
    SEED_ZH,
    TinyModel,
    build_transformer,
    make_tiny_model,
    train_sentencepiece,
    write_gguf,
    write_hf,
    write_llama2c,
    write_llama2c_tokenizer,
    write_meta,
    write_unsupported_gguf,
)

from llama_ref.checkpoints import CheckpointError, meta_hidden_dim, open_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
TOKENS = torch.tensor([[1, 5, 300, 17, 42, 511, 2, 260, 99, 3]])


def reference_logits(model):
    return build_transformer(model.args, model.weights.items())(TOKENS, 0)


def loaded_logits(checkpoint):
    return build_transformer(checkpoint.args, checkpoint.tensors())(TOKENS, 0)


def write_every_format(model, root):
    return {
        "gguf": write_gguf(model, root / "tiny.gguf"),
        "hf": write_hf(model, root / "hf"),
        "meta": write_meta(model, root / "meta" / "tiny-2shards"),
        "llama2c-v0": write_llama2c(model, root / "v0" / "model.bin", version=0),
        "llama2c-v1": write_llama2c(model, root / "v1" / "model.bin", version=1),
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_format_loads_to_the_same_logits(tmp_path, tied):
    model = make_tiny_model(tmp_path, tie_embeddings=tied)
    expected = reference_logits(model)
    for label, path in write_every_format(model, tmp_path).items():
        checkpoint = open_checkpoint(path)
        assert checkpoint.format == label.split("-")[0]
        args = checkpoint.args
        assert (args.n_kv_heads, args.hidden_dim, args.tie_embeddings) == (2, 192, tied)
        torch.testing.assert_close(loaded_logits(checkpoint), expected, atol=1e-5, rtol=0, msg=label)


def test_shapes_are_known_before_loading_and_weights_come_one_at_a_time(tmp_path):
    model = make_tiny_model(tmp_path, tie_embeddings=True)
    for label, path in write_every_format(model, tmp_path).items():
        checkpoint = open_checkpoint(path)
        stream = checkpoint.tensors()
        assert iter(stream) is stream, label  # a generator, not a dict of everything
        loaded = {name: tuple(tensor.shape) for name, tensor in stream}
        assert loaded == checkpoint.tensor_shapes, label
        assert "output.weight" not in loaded  # tied: the embedding serves as the classifier
        assert checkpoint.args.context_length == (2048 if label == "meta" else 128)  # Meta's files do not say


def test_every_format_brings_the_same_tokenizer(tmp_path):
    import sentencepiece

    model = make_tiny_model(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model.tokenizer_model))
    for label, path in write_every_format(model, tmp_path).items():
        tokenizer = open_checkpoint(path).tokenizer
        for text in (SEED_ZH, SEED_AR):
            ids = tokenizer.encode(text, bos=True, eos=False)
            assert ids == [sp.bos_id()] + sp.encode(text), label
            assert tokenizer.decode(ids) == text, label
        assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)


def test_gguf_brings_its_chat_template_and_special_tokens(tmp_path):
    model = make_tiny_model(tmp_path)
    checkpoint = open_checkpoint(write_gguf(model, tmp_path / "tiny.gguf"))
    assert "<|im_start|>" in checkpoint.chat_template
    im_start, im_end = 3, 4  # the control symbols the sentencepiece model was trained with
    ids = checkpoint.tokenizer.encode("<|im_start|>user\nhi<|im_end|>", bos=False, eos=False)
    assert ids[0] == im_start and ids[-1] == im_end
    assert checkpoint.tokenizer.stop_ids == {2, im_end}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_quantised_gguf_dequantises_like_the_gguf_library(tmp_path, qtype):
    from gguf.quants import dequantize, quantize

    model = make_tiny_model(tmp_path)
    checkpoint = open_checkpoint(write_gguf(model, tmp_path / f"tiny-{qtype.name}.gguf", qtype))
    for name, tensor in checkpoint.tensors():
        original = model.weights[name].numpy()
        if original.ndim == 1:  # llama.cpp keeps norms in F32
            expected, dtype = original, torch.float32
        else:  # half-precision files stay half precision
            expected = dequantize(quantize(original, qtype), qtype).reshape(original.shape)
            dtype = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
        assert tensor.dtype == dtype
        torch.testing.assert_close(tensor.float(), torch.from_numpy(expected), atol=0, rtol=0, msg=name)


def test_meta_hidden_dim_matches_released_models():
    # intermediate sizes published in the Hugging Face configs of these models
    assert meta_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B


def test_hf_directory_brings_its_chat_template(tmp_path):
    model = make_tiny_model(tmp_path)
    directory = write_hf(model, tmp_path / "hf")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }} old"}))
    assert open_checkpoint(directory).chat_template == "{{ messages }} old"
    (directory / "chat_template.jinja").write_text("{{ messages }} new")  # transformers >= 4.43 writes this
    assert open_checkpoint(directory).chat_template == "{{ messages }} new"


# ---------------------------------------------------------------------------- against transformers


@pytest.fixture
def transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", ["mha-untied", "gqa-llama3-tied"])
def test_logits_match_transformers(tmp_path, transformers, variant):
    extra = {}
    if variant == "gqa-llama3-tied":
        # head_dim 32 and these frequencies put four wavelengths in the blended band of Llama 3.1 scaling
        extra = dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 8.0,
                "original_max_position_embeddings": 256,
            },
        )
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **extra,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; scramble them so a misplaced norm shows
        for param in hf_model.parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if param.ndim == 1 else 0.3 * torch.randn_like(param))
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    train_sentencepiece(tmp_path / "hf" / "tokenizer.model")
    tokens = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(1))

    checkpoint = open_checkpoint(tmp_path / "hf")
    ours = build_transformer(checkpoint.args, checkpoint.tensors())(tokens, 0)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert checkpoint.args.context_length == 512

    if variant == "gqa-llama3-tied":
        # the same model as llama.cpp writes it: Llama 3.1 scaling becomes a rope_freqs tensor
        source = TinyModel(checkpoint.args, dict(checkpoint.tensors()), tmp_path / "hf" / "tokenizer.model")
        gguf_checkpoint = open_checkpoint(
            write_gguf(source, tmp_path / "llama3.gguf", rope_scaling=config.rope_parameters)
        )
        ours_gguf = build_transformer(gguf_checkpoint.args, gguf_checkpoint.tensors())(tokens, 0)
        assert (ours_gguf - theirs).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- bad input


def assert_one_line_error(path, *fragments):
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_path(tmp_path):
    assert_one_line_error(tmp_path / "nope.gguf", "no such file or directory")


def test_truncated_gguf(tmp_path):
    model = make_tiny_model(tmp_path)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(path, "truncated or corrupt")


def test_gguf_with_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<!DOCTYPE html><html>Not Found</html>")
    assert_one_line_error(path, "not a GGUF file")


def test_gguf_of_another_architecture(tmp_path):
    model = make_tiny_model(tmp_path)
    path = write_gguf(model, tmp_path / "phi3.gguf", architecture="phi3")
    message = assert_one_line_error(path)
    assert message == f"{path}: GGUF architecture 'phi3' is not supported; llama_ref runs llama and qwen2 models"


def test_gguf_with_an_unsupported_quantisation(tmp_path):
    path = write_unsupported_gguf(tmp_path / "iq2.gguf")
    assert_one_line_error(path, "blk.0.ffn_down.weight", "IQ2_XXS", "Q4_K", "Q6_K", "Q8_0", "F16")


def test_truncated_llama2c(tmp_path):
    model = make_tiny_model(tmp_path)
    path = write_llama2c(model, tmp_path / "model.bin", version=1)
    path.write_bytes(path.read_bytes()[:-1000])
    assert_one_line_error(path, "truncated")


def test_llama2c_file_that_is_something_else(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"these are not the weights you are looking for" * 10)
    assert_one_line_error(path, "not a llama2.c checkpoint")


def test_llama2c_tokenizer_of_another_vocabulary(tmp_path):
    model = make_tiny_model(tmp_path)
    path = write_llama2c(model, tmp_path / "model.bin", version=0)
    write_llama2c_tokenizer(model, tmp_path / "tokenizer.bin", drop_last=212)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "tokenizer.bin" in message and str(path) in message
    assert "300 tokens" in message and "512" in message


def test_hf_tokenizer_larger_than_the_model(tmp_path):
    model = make_tiny_model(tmp_path)
    directory = write_hf(model, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    # a smaller model: drop the embedding rows past 256 and say so in config.json
    from safetensors.torch import load_file, save_file

    for shard in directory.glob("*.safetensors"):
        tensors = {
            n: (t[:256].contiguous() if n in ("model.embed_tokens.weight", "lm_head.weight") else t)
            for n, t in load_file(shard).items()
        }
        save_file(tensors, shard)
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    assert_one_line_error(directory, "512 tokens", "256")


def test_meta_directory_without_params_json(tmp_path):
    model = make_tiny_model(tmp_path)
    directory = write_meta(model, tmp_path / "llama" / "7B")
    (directory / "params.json").unlink()
    assert_one_line_error(directory, "params.json is missing")


def test_corrupt_meta_shard(tmp_path):
    model = make_tiny_model(tmp_path)
    directory = write_meta(model, tmp_path / "llama" / "7B")
    shard = directory / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:200])
    assert_one_line_error(directory, "truncated or corrupt")


def test_hf_directory_of_another_architecture(tmp_path):
    model = make_tiny_model(tmp_path)
    directory = write_hf(model, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert_one_line_error(directory, "model_type 'mistral' is not supported")


def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"garbage" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "llama_ref", "--model", str(path), "--max-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "not a GGUF file" in result.stderr


# ---------------------------------------------------------------------------- crafted headers


def gguf_bytes_claiming_a_huge_array() -> bytes:
    """65 bytes: GGUF v3, no tensors, one key whose uint8 array claims 2^60 elements."""
    import struct

    key = b"general.huge"
    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IIQ", 9, 0, 1 << 60)
        + b"\x00" * 5
    )


def test_a_gguf_claiming_more_than_it_holds_fails_at_once(tmp_path):
    """Before, gguf's reader looped on empty reads past the end of such a file until memory ran out."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(gguf_bytes_claiming_a_huge_array())
    assert path.stat().st_size == 65
    with pytest.raises(CheckpointError, match="claims 1152921504606846976 elements"):
        open_checkpoint(path)


def test_a_gguf_claiming_a_million_layers_is_refused_before_building_them(tmp_path):
    import dataclasses

    model = make_tiny_model(tmp_path)
    crafted = TinyModel(dataclasses.replace(model.args, n_layers=1_000_000), model.weights, model.tokenizer_model)
    path = write_gguf(crafted, tmp_path / "layers.gguf")
    with pytest.raises(CheckpointError, match="says 1000000 layers but the file holds tensors for 2"):
        open_checkpoint(path)


def test_a_llama2c_header_claiming_terabytes_is_refused_before_building_anything(tmp_path):
    import struct

    path = tmp_path / "huge.bin"
    path.write_bytes(struct.pack("<7i", 4096, 11008, 2**31 - 1, 32, 32, 32000, 2048))
    with pytest.raises(CheckpointError, match="28 bytes, but its header .* implies at least"):
        open_checkpoint(path)


def crafted_files(tmp_path) -> dict:
    """Every crafted header of issue 10's review, one file or folder each."""
    import dataclasses
    import struct

    model = make_tiny_model(tmp_path)
    files = {}
    files["gguf-huge-array"] = tmp_path / "huge.gguf"
    files["gguf-huge-array"].write_bytes(gguf_bytes_claiming_a_huge_array())
    crafted = TinyModel(dataclasses.replace(model.args, n_layers=1_000_000), model.weights, model.tokenizer_model)
    files["gguf-million-layers"] = write_gguf(crafted, tmp_path / "layers.gguf")
    files["llama2c-terabytes"] = tmp_path / "huge.bin"
    files["llama2c-terabytes"].write_bytes(struct.pack("<7i", 4096, 11008, 2**31 - 1, 32, 32, 32000, 2048))
    files["hf-million-layers"] = write_hf(crafted, tmp_path / "hf-layers")
    huge_header = write_hf(model, tmp_path / "hf-header")
    for shard in huge_header.glob("*.safetensors"):  # a header length of 2^60 bytes, then nothing
        shard.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    files["safetensors-huge-header"] = huge_header
    return files


PROBE = """
import sys, time
from llama_ref.checkpoints import CheckpointError, open_checkpoint

def high_water():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024

before, started = high_water(), time.perf_counter()
try:
    checkpoint = open_checkpoint(sys.argv[1])
    dict(checkpoint.tensors())
except CheckpointError as exc:
    print(f"{time.perf_counter() - started} {high_water() - before} {exc}")
"""


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_every_crafted_checkpoint_fails_fast_and_small(tmp_path):
    """Issue 10's bound: each crafted header is refused in under 0.5 s and 300 MiB, measured in a fresh
    interpreter after its imports (a crafted file used to take minutes and gigabytes before failing)."""
    for name, path in crafted_files(tmp_path).items():
        probe = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0 and probe.stdout, f"{name}: {probe.stderr[-2000:]}"
        seconds, grown, message = probe.stdout.split(" ", 2)
        assert float(seconds) < 0.5, f"{name} took {float(seconds):.2f} s: {message}"
        assert int(grown) < 300 << 20, f"{name} grew {int(grown) >> 20} MiB: {message}"
        assert "\n" not in message.strip(), f"{name}: {message}"


def test_a_models_identity_is_its_content_not_its_path(tmp_path):
    """What explainer's answer cache keys a local model by (llama_ref.identity)."""
    import shutil

    from llama_ref.identity import _gguf_index_end, model_identity

    model = make_tiny_model(tmp_path)
    paths = write_every_format(model, tmp_path / "a")
    identities = {name: model_identity(path) for name, path in paths.items()}
    assert len(set(identities.values())) == len(identities)  # each format's files differ
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name, path in paths.items():  # a copy elsewhere is the same model
        assert model_identity(tmp_path / "b" / path.relative_to(tmp_path / "a")) == identities[name]

    reader = gguf.GGUFReader(paths["gguf"])  # the index ends where the tensor data starts, but for the padding
    with open(paths["gguf"], "rb") as f:
        end = _gguf_index_end(f.read())
    assert reader.data_offset - 32 < end <= reader.data_offset
    (paths["hf"] / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert model_identity(paths["hf"]) != identities["hf"]  # a file beside the weights changes the answers
    (tmp_path / "b" / "tiny.gguf").write_text("not a model")
    assert model_identity(tmp_path / "b" / "tiny.gguf") != identities["gguf"]


def test_load_llama_takes_a_catalog_name_or_a_path_and_fails_with_one_line(tmp_path):
    """loading.load_llama, the way in that the CLI, the server and the local backend share: every failure is
    a LlamaRefError whose message is one line naming what was asked for."""
    from llama_ref.errors import LlamaRefError
    from llama_ref.loading import load_llama

    path = write_gguf(make_tiny_model(tmp_path), tmp_path / "tiny.gguf")
    llama = load_llama(path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="fp32")
    assert (llama.model.max_batch_size, llama.model.max_seq_len) == (2, 32)

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:4000])
    for model, kernels, names in [
        ("no-such-model", "auto", ["no-such-model", "--list-models"]),
        (broken, "auto", ["broken.gguf"]),
        (path, "no-such-kernel", ["no-such-kernel"]),
    ]:
        with pytest.raises(LlamaRefError) as failed:
            load_llama(model, max_seq_len=32, max_batch_size=1, device="cpu", kernels=kernels)
        message = str(failed.value)
        assert "\n" not in message and all(name in message for name in names), message
