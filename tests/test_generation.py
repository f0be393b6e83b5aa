"""generate() semantics on SmolLM2-135M-Instruct (Q4_1 GGUF, the small catalog model), in fp32 on CPU."""

import inspect
import os

import pytest

torch = pytest.importorskip("torch")

from llama_ref import Llama  # noqa: E402
from llama_ref.catalog import resolve_model  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def llama():
    # float layers: the reference, token for token what transformers computes
    return Llama.build(
        resolve_model("smollm2-135m"), max_seq_len=256, max_batch_size=4, device="cpu", dtype="fp32", kernels="float"
    )


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=False, eos=False)


def test_signature_is_upstreams():
    params = list(inspect.signature(Llama.generate).parameters.values())
    upstream = ["self", "prompt_tokens", "max_gen_len", "temperature", "top_p", "logprobs", "echo"]
    assert [p.name for p in params[:7]] == upstream
    assert [p.default for p in params[3:7]] == [0.6, 0.9, False, False]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[7:])


@pytest.mark.slow  # five prompts alone and together: the longest test of generate() on SmolLM2
def test_batch_of_different_lengths_matches_each_prompt_alone(llama):
    prompts = [encode(llama, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    batched, _ = llama.generate(prompts, max_gen_len=20, temperature=0)
    for prompt, tokens in zip(prompts, batched):
        alone, _ = llama.generate([prompt], max_gen_len=20, temperature=0)
        assert tokens == alone[0]
        assert len(tokens) > 0


def test_echo_logprobs_equal_log_softmax_of_a_full_forward(llama):
    prompts = [encode(llama, p) for p in PROMPTS[:2]]
    tokens, logprobs = llama.generate(prompts, max_gen_len=8, temperature=0, logprobs=True, echo=True)
    for prompt, toks, probs in zip(prompts, tokens, logprobs):
        assert toks[: len(prompt)] == prompt and len(toks) == len(probs) > len(prompt)
        logits = llama.model.forward(torch.tensor([toks]), 0)[0]
        expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(toks[1:])[:, None])[:, 0]
        # incremental decoding and one full pass round differently in fp32, hence the tolerance
        assert torch.allclose(torch.tensor(probs[1:]), expected, atol=1e-3)
        assert probs[0] == 0.0  # the first token has no prediction, as upstream


def test_generation_stops_at_a_stop_token(llama):
    dialog = [{"role": "user", "content": "Say hello."}]
    prompt = encode(llama, llama.render_chat(dialog))
    tokens, _ = llama.generate([prompt], max_gen_len=120, temperature=0)
    assert not set(tokens[0]) & llama.tokenizer.stop_ids
    assert len(tokens[0]) < 120  # a short answer ends on <|im_end|>, not on the length limit


def test_seed_makes_sampling_reproducible(llama):
    prompt = [encode(llama, PROMPTS[0])]
    first, _ = llama.generate(prompt, 16, temperature=1.0, top_p=0.95, seed=7)
    again, _ = llama.generate(prompt, 16, temperature=1.0, top_p=0.95, seed=7)
    assert first == again


def test_top_k_one_is_greedy(llama):
    prompt = [encode(llama, PROMPTS[1])]
    greedy, _ = llama.generate(prompt, 12, temperature=0)
    sampled, _ = llama.generate(prompt, 12, temperature=1.0, top_p=1.0, top_k=1, seed=3)
    assert sampled == greedy


def test_streamed_tokens_are_the_returned_tokens(llama):
    streamed = []
    prompt = encode(llama, PROMPTS[0])
    tokens, _ = llama.generate([prompt], 10, temperature=0, on_token=lambda row, tok: streamed.append(tok))
    assert streamed[: len(tokens[0])] == tokens[0]


def test_chat_completion_uses_the_checkpoints_template(llama):
    assert "<|im_start|>" in llama.chat_template  # from the GGUF metadata
    [result] = llama.chat_completion([[{"role": "user", "content": "What is 2 + 2?"}]], temperature=0, max_gen_len=40)
    assert result["generation"]["role"] == "assistant"
    assert result["generation"]["content"].strip()
    assert result["finish_reason"] in ("stop", "length")


def test_prompt_longer_than_context_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="max_seq_len"):
        llama.generate([[1] * 300], 4)


@pytest.mark.slow  # two more builds of the model
def test_int8_weights_stay_close_to_full_precision():
    full = Llama.build(
        resolve_model("smollm2-135m"), max_seq_len=64, max_batch_size=1, device="cpu", dtype="fp32", kernels="float"
    )
    int8 = Llama.build(
        resolve_model("smollm2-135m"),
        max_seq_len=64,
        max_batch_size=1,
        device="cpu",
        dtype="fp32",
        kernels="int8-weights",
    )
    tokens = torch.tensor([encode(full, "The quick brown fox jumps over the lazy dog")])
    ref = torch.log_softmax(full.model.forward(tokens, 0), -1)
    approx = torch.log_softmax(int8.model.forward(tokens, 0), -1)
    # the same next-token choice almost everywhere, and close distributions
    agree = (ref.argmax(-1) == approx.argmax(-1)).float().mean().item()
    assert agree >= 0.8
    assert (ref.exp() * (ref - approx)).sum(-1).mean().item() < 0.1  # KL divergence


@pytest.mark.slow  # transformers loads the model too
@pytest.mark.skipif(os.environ.get("LLAMA_REF_SKIP_HF") == "1", reason="transformers parity disabled")
def test_greedy_tokens_match_transformers_on_the_same_gguf(llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = resolve_model("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    eos = llama.tokenizer.eos_id
    for text in PROMPTS:
        prompt = encode(llama, text)
        ours, _ = llama.generate([prompt], max_gen_len=32, temperature=0, stop_tokens=[eos])
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        theirs = out[0, len(prompt) :].tolist()
        if eos in theirs:
            theirs = theirs[: theirs.index(eos)]
        assert ours[0] == theirs, text
