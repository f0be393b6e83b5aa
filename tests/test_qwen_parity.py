"""llama_ref runs Qwen2 exactly as transformers does: the same logits from a tiny random Qwen2ForCausalLM, read
from its Hugging Face directory and from a qwen2 GGUF, and the same greedy tokens from the real catalog models."""

import gc

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tiny_checkpoints import (  # noqa: E402
    GGUF_LAYER_PARTS,
    HF_LAYER_PARTS,
    build_transformer,
    close_gguf,
    gguf_writer,
    train_sentencepiece,
)

from llama_ref import Llama  # noqa: E402
from llama_ref.catalog import list_models, resolve_model  # noqa: E402
from llama_ref.checkpoints import open_checkpoint  # noqa: E402
from llama_ref.model import ModelArgs  # noqa: E402

VOCAB = 512  # train_sentencepiece's vocabulary
TOKENS = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- a tiny random Qwen2


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A random Qwen2ForCausalLM saved as Hugging Face saves it, with a sentencepiece tokenizer beside it."""
    directory = tmp_path_factory.mktemp("qwen2") / "hf"
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0; scramble both so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(1 + 0.2 * torch.randn_like(param) if param.ndim == 1 else 0.3 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    train_sentencepiece(directory / "tokenizer.model")
    return model, directory


def llama_ref_logits(path):
    checkpoint = open_checkpoint(path)
    assert checkpoint.args.qkv_bias
    return build_transformer(checkpoint.args, checkpoint.tensors())(TOKENS, 0)


def transformers_logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_hf_directory_logits_match_transformers(tiny_qwen2):
    model, directory = tiny_qwen2
    assert (llama_ref_logits(directory) - transformers_logits(model)).abs().max().item() < 1e-4


# Hugging Face name -> GGUF name, as llama.cpp's convert_hf_to_gguf.py maps Qwen2's tensors
GGUF_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_GGUF_PARTS = {HF_LAYER_PARTS[part]: GGUF_LAYER_PARTS[part] for part in HF_LAYER_PARTS}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    part, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF_PARTS[part]}.{suffix}"


def write_qwen2_gguf(model, tokenizer_model, path):
    """A qwen2 GGUF as convert_hf_to_gguf.py writes one: Qwen2Model keeps Hugging Face's rotate-half q/k rows
    (llama.cpp runs qwen2 with NEOX rope), so, unlike llama's, they are written as they are, biases included."""
    config = model.config
    args = ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_parameters["rope_theta"],
        context_length=config.max_position_embeddings,
    )
    writer = gguf_writer(path, "qwen2", args, tokenizer_model)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(gguf_tensor_name(name), tensor.float().numpy())
    return close_gguf(writer, path)


def test_gguf_logits_match_transformers(tiny_qwen2, tmp_path):
    model, directory = tiny_qwen2
    path = write_qwen2_gguf(model, directory / "tokenizer.model", tmp_path / "qwen2.gguf")
    assert {"blk.0.attn_q.bias", "blk.1.attn_k.bias"} <= {t.name for t in gguf.GGUFReader(path).tensors}
    assert (llama_ref_logits(path) - transformers_logits(model)).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- the real models

NEW_TOKENS = 32
# Each prompt gets a 32-token answer with no end of turn in it, so all 32 greedy choices are compared.
PROMPTS = {
    "chinese-chat": [{"role": "user", "content": "用中文简单介绍一下快速排序算法的原理。"}],
    "english-chat": [{"role": "user", "content": "Explain what a KV cache does in a transformer."}],
    "code": 'def quicksort(items):\n    """Sort a list with quicksort."""\n',
}


def installed_model(name: str):
    """The catalog model's file; a skip only when the catalog says its packages are not installed."""
    status = next(status for status in list_models() if status.model.name == name)
    if not status.installed:
        pytest.skip(f"{name} is not installed ({len(status.missing)} packages missing)")
    return resolve_model(name)


def prompt_ids(llama, prompt) -> list[int]:
    tokenizer = llama.tokenizer
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.add_bos, eos=False)
    return tokenizer.encode(llama.render_chat(prompt), bos=False, eos=False)


def top_two_margin(scores) -> float:
    first, second = scores.float().topk(2).values.tolist()
    return first - second


# The default model. Qwen2.5-Coder-0.5B takes the same code paths (qwen2: biases on q, k and v, an output
# matrix of its own, the same tokenizer and chat template); the two quantisations only it has, Q5_0 and
# Q8_0, are checked against the gguf library's in test_quants. Comparing it here too cost make test about 4
# minutes of one worker's time on two cores.
@pytest.fixture(scope="module", params=["qwen2.5-coder-1.5b"])
def greedy(request):
    """{prompt: (llama_ref's tokens, transformers' tokens, transformers' top-two logit margin at each step)}
    for one catalog model. One model is in memory at a time: the 1.5B takes over 6 GB in fp32."""
    path = installed_model(request.param)
    llama = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32", kernels="float")
    ours = {}
    for label, prompt in PROMPTS.items():
        ids = prompt_ids(llama, prompt)
        ours[label] = ids, llama.generate([ids], NEW_TOKENS, temperature=0)[0][0]
    del llama
    gc.collect()

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert model.dtype == torch.float32
    results = {}
    for label, (ids, tokens) in ours.items():
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        theirs = out.sequences[0, len(ids) :].tolist()
        results[label] = tokens, theirs, [top_two_margin(step[0]) for step in out.scores]
    del model, out
    gc.collect()
    # the kernels this CPU gets by default (llama_ref.kernels), fed transformers' tokens: which would it pick?
    fast = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu")
    for label, (tokens, theirs, margins) in results.items():
        ids = ours[label][0]
        with torch.no_grad():
            logits = fast.model.forward(torch.tensor([ids + theirs[:-1]]), 0)[0, len(ids) - 1 :]
        results[label] = tokens, theirs, margins, logits.argmax(-1).tolist()
    del fast
    gc.collect()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(greedy, prompt):
    ours, theirs, margins, _fast = greedy[prompt]
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert ours == theirs, (
        f"first difference at new token {first_difference}: llama_ref {ours[first_difference]}, transformers "
        f"{theirs[first_difference]}; transformers' top two logits there differ by {margins[first_difference]:.2e}"
        if first_difference is not None
        else f"lengths differ: llama_ref {len(ours)}, transformers {len(theirs)}"
    )
    assert len(ours) == NEW_TOKENS


@pytest.mark.slow
def test_the_default_kernels_pick_the_tokens_transformers_picks(greedy):
    """Quantized layers (this CPU's row of the kernel table) round differently, so not token for token: teacher-
    forced on transformers' greedy answers, the likeliest next token is the same almost everywhere."""
    pairs = [(a, b) for _ours, theirs, _margins, fast in greedy.values() for a, b in zip(fast, theirs)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= 0.9, agreement
