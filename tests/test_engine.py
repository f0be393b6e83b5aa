"""llama_ref's Engine: continuous batching, chunked prefill and the prefix cache give the same greedy
tokens as Llama.generate, the upstream-shaped reference, on a tiny random model and on SmolLM2."""

import threading

import pytest

torch = pytest.importorskip("torch")

from tiny_checkpoints import make_tiny_model, write_gguf  # noqa: E402

from llama_ref import Llama  # noqa: E402
from llama_ref.catalog import resolve_model  # noqa: E402
from llama_ref.engine import CACHE_STEP, CacheShape, Engine, EngineStopped, Job, PrefixCache  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    return write_gguf(make_tiny_model(directory), directory / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return Llama.build(tiny_path, max_seq_len=128, max_batch_size=3, device="cpu", dtype="fp32")


@pytest.fixture
def short_rows(tiny_path):
    """The tiny model again, for an engine whose rows are shorter than the prompts (tiny keeps full rows
    for Llama.generate, the reference)."""
    return Llama.build(tiny_path, max_seq_len=128, max_batch_size=3, device="cpu", dtype="fp32")


def prompts_sharing_a_start(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    shared = torch.randint(3, vocab, (23,), generator=generator).tolist()
    tails = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (1, 9, 17, 4, 30)]
    return [shared + tail for tail in tails] + [shared[:11], shared]


def reference(llama, prompt, max_tokens):
    (tokens,), _ = llama.generate([prompt], max_tokens, temperature=0, stop_tokens=[-1])
    return tokens


def test_greedy_tokens_equal_generate_with_rows_joining_and_leaving(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    limits = [5, 20, 11, 3, 16, 8, 25]
    engine = Engine(tiny.model, tiny.tokenizer, prefill_chunk=8)  # several chunks per prompt

    # 7 jobs over 3 rows: rows free up at different steps and waiting jobs take them
    jobs = engine.run([Job(p, n, stop_ids=frozenset()) for p, n in zip(prompts, limits)])

    for job, prompt, limit in zip(jobs, prompts, limits):
        assert job.tokens == reference(tiny, prompt, limit)
        assert (job.finish_reason, len(job.tokens)) == ("length", limit)
    assert sum(job.cached_tokens for job in jobs) > 0  # later prompts reused the shared start
    assert jobs[0].cached_tokens == 0


def test_prefix_cache_and_anchor_off_give_the_same_tokens(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    cached = Engine(tiny.model, tiny.tokenizer).run([Job(p, 12, stop_ids=frozenset()) for p in prompts])
    uncached = Engine(tiny.model, tiny.tokenizer, prefix_cache_bytes=0, anchor=False).run(
        [Job(p, 12, stop_ids=frozenset()) for p in prompts]
    )
    assert [j.tokens for j in cached] == [j.tokens for j in uncached]
    assert all(j.cached_tokens == 0 for j in uncached)
    # the second prompt shares 23 tokens with the first; the last one is the whole shared start
    assert cached[1].cached_tokens == 23 and cached[6].cached_tokens == 22


def test_each_row_stops_at_its_own_stop_token(tiny):
    prompt = prompts_sharing_a_start(tiny.model.params.vocab_size)[2]
    free_run = reference(tiny, prompt, 12)
    stop = free_run[5]
    first = free_run.index(stop)
    stopping, running = Engine(tiny.model, tiny.tokenizer).run(
        [Job(prompt, 12, stop_ids=frozenset({stop})), Job(prompt, 12, stop_ids=frozenset())]
    )
    assert stopping.finish_reason == "stop" and stopping.tokens == free_run[:first]
    assert running.finish_reason == "length" and running.tokens == free_run


def test_seeded_sampling_repeats_whatever_runs_beside_it(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    sampled = dict(temperature=0.9, top_p=0.95, seed=3, stop_ids=frozenset())
    alone = Engine(tiny.model, tiny.tokenizer).run([Job(prompts[0], 15, **sampled)])[0]
    together = Engine(tiny.model, tiny.tokenizer).run(
        [Job(prompts[4], 9, stop_ids=frozenset()), Job(prompts[0], 15, **sampled)]
    )[1]
    assert together.tokens == alone.tokens


def test_a_cancelled_job_frees_its_row_and_the_rest_finish(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    engine = Engine(tiny.model, tiny.tokenizer)
    jobs = [engine.submit(Job(p, 40, stop_ids=frozenset())) for p in prompts[:4]]
    for _ in range(5):
        engine.step()
    jobs[0].cancel()
    while not all(job.done for job in jobs):
        engine.step()
    assert jobs[0].finish_reason == "cancelled" and len(jobs[0].tokens) < 40
    assert [len(job.tokens) for job in jobs[1:]] == [40, 40, 40]
    assert jobs[3].tokens == reference(tiny, prompts[3], 40)


def test_an_abandoned_job_leaves_its_row_or_the_queue_at_the_next_step(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    engine = Engine(tiny.model, tiny.tokenizer)  # 3 rows: the fourth job waits
    readers_gone = [False] * 4
    jobs = [
        engine.submit(Job(p, 40, stop_ids=frozenset(), abandoned=lambda i=i: readers_gone[i]))
        for i, p in enumerate(prompts[:4])
    ]
    for _ in range(5):
        engine.step()
    readers_gone[1] = readers_gone[3] = True  # one running, one still queued
    engine.step()
    assert jobs[1].done and jobs[3].done and not jobs[0].done
    assert jobs[1].finish_reason == jobs[3].finish_reason == "cancelled" and jobs[3].tokens == []
    assert engine.stats["cancelled"] == 2
    while not all(job.done for job in jobs):
        engine.step()
    assert [len(job.tokens) for job in (jobs[0], jobs[2])] == [40, 40]
    assert jobs[2].tokens == reference(tiny, prompts[2], 40)


def test_rows_shorter_than_the_prompts_read_the_shared_start_from_the_anchor(tiny, short_rows):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)  # 23 shared tokens, tails of 1..30
    limits = [5, 20, 11, 3, 16, 8, 25]
    # no prefix cache: every prompt token a job does not prefill came from the anchor
    engine = Engine(short_rows.model, short_rows.tokenizer, prefill_chunk=8, prefix_cache_bytes=0)
    engine.reserve(3, 128, row_len=40)  # a row holds 40 positions; the prompt plus answer need up to 48
    jobs = engine.run([Job(p, n, stop_ids=frozenset()) for p, n in zip(prompts, limits)])

    for job, prompt, limit in zip(jobs, prompts, limits):
        assert job.tokens == reference(tiny, prompt, limit)
    # The first prompt went into the anchor; the next ones read the 23 tokens they share with it from there.
    # The fifth (23 + 30 tokens and 16 more) does not fit a row beside them: it waited until no row read the
    # anchor, and then put its own prompt there, over all but the 23 tokens it shares with what was there.
    # The last two prompts are 11 and 23 tokens of the shared start: all but their last token came from it.
    assert [job.cached_tokens for job in jobs] == [0, 23, 23, 23, 23, 10, 22]
    assert short_rows.model.layers[0].attention.cache.k.shape[2] == 40


def test_plan_reserves_what_the_jobs_need_within_the_engines_limits(short_rows):
    """Engine.plan, which the local backend and the server both size the KV cache with: a row per prompt, the
    positions of the longest prompt and answer, and rows that hold only what a prompt does not share with the
    first one (which goes into the anchor), rounded up to CACHE_STEP and capped by the engine's limits."""
    step, model, vocab = CACHE_STEP, short_rows.model, short_rows.model.params.vocab_size
    engine = Engine(model, short_rows.tokenizer, max_batch_size=3, max_seq_len=4 * step, prefix_cache_bytes=0)
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(3, vocab, (step + 10,), generator=generator).tolist()
    tail = torch.randint(3, vocab, (20,), generator=generator).tolist()
    tail[0] = 3 if first[step] != 3 else 4
    second = first[:step] + tail  # shares its first `step` tokens with the first prompt
    jobs = [Job(first, 30, stop_ids=frozenset()), Job(second, 40, stop_ids=frozenset())]

    # positions: step + 20 + 40 at most, so 2 steps; a row: the second's 20 tokens of its own and 40 more
    assert engine.plan([first, second], [30, 40]) == CacheShape(2, 2 * step, step)
    assert (model.max_batch_size, model.max_seq_len, model.row_len, model.anchor_len) == (2, 2 * step, step, 2 * step)
    planned = engine.run(jobs)
    assert [job.cached_tokens for job in planned] == [0, step]  # the shared start came from the anchor

    assert engine.plan() == CacheShape(3, 4 * step, 4 * step)  # a server's: every row and position of the limits
    assert model.row_len == 4 * step
    full = engine.run([Job(job.prompt_tokens, job.max_tokens, stop_ids=frozenset()) for job in jobs])
    assert [job.tokens for job in planned] == [job.tokens for job in full]
    assert [len(job.tokens) for job in full] == [30, 40]

    assert engine.plan([[5] * 10] * 5, [20] * 5) == CacheShape(3, step, step)  # rows capped at max_batch_size
    assert engine.plan([[5] * 10], [8 * step]) == CacheShape(1, 4 * step, 4 * step)  # positions at max_seq_len


def test_an_answer_longer_than_a_row_is_refused_before_it_runs(short_rows):
    engine = Engine(short_rows.model, short_rows.tokenizer)
    engine.reserve(2, 128, row_len=32)
    with pytest.raises(ValueError, match="max_tokens=40 exceeds the 32 positions of a row"):
        engine.submit(Job([5] * 60, 40))
    assert engine.run([Job([5] * 60, 32, stop_ids=frozenset())])[0].finish_reason == "length"


def test_too_long_a_job_is_refused_before_it_runs(tiny):
    engine = Engine(tiny.model, tiny.tokenizer)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        engine.submit(Job([5] * 100, 40))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Job([], 4))


def test_a_worker_thread_streams_pieces_and_stops_cleanly(tiny):
    engine = Engine(tiny.model, tiny.tokenizer)
    worker = threading.Thread(target=engine.serve_forever)
    worker.start()
    prompt = prompts_sharing_a_start(tiny.model.params.vocab_size)[1]
    job = engine.submit(Job(prompt, 10, stop_ids=frozenset()))
    text = "".join(job.pieces())
    assert job.tokens == reference(tiny, prompt, 10)
    assert text == tiny.tokenizer.decode(job.tokens)
    engine.close()
    worker.join()
    with pytest.raises(EngineStopped):
        engine.submit(Job(prompt, 4))


def test_prefix_cache_keeps_the_most_recent_within_its_bound():
    entry = torch.zeros(2, 1, 10, 4)  # 320 bytes each for k and v
    cache = PrefixCache(max_bytes=2 * 2 * entry.numel() * entry.element_size())  # room for two prompts
    cache.add([1, 2, 3], entry, entry)
    cache.add([4, 5, 6], entry, entry)
    assert cache.longest_match([1, 2, 3, 9])[0] == 3  # touching [1, 2, 3] makes [4, 5, 6] the oldest
    cache.add([7, 8, 9], entry, entry)
    assert cache.longest_match([4, 5, 6])[0] == 0
    assert cache.longest_match([1, 2, 7])[0] == 2
    cache.add([7, 8, 9, 10], entry, entry)  # extends a stored prompt: replaces it
    assert cache.nbytes <= cache.max_bytes
    assert cache.longest_match([7, 8, 9, 10, 11])[0] == 4
    # what add() would drop is never copied out of the KV cache: a prompt a stored one covers, or too big
    assert not cache.wants([7, 8, 9], entry.nbytes * 2)
    assert not cache.wants([3, 2, 1], cache.max_bytes + 1)
    assert cache.wants([3, 2, 1], entry.nbytes * 2)


@pytest.mark.slow
def test_smollm2_answers_equal_generate_token_for_token():
    llama = Llama.build(resolve_model("smollm2-135m"), max_seq_len=512, max_batch_size=4, device="cpu", dtype="fp32")
    questions = [
        "What is 2+2? Answer with one number.",
        "Name three colours.",
        "Write a Python function that adds two numbers.",
        "What is the capital of France?",
        "Explain recursion in one sentence.",
    ]
    prompts = [
        llama.tokenizer.encode(llama.render_chat([{"role": "user", "content": q}]), bos=False, eos=False)
        for q in questions
    ]
    jobs = Engine(llama.model, llama.tokenizer, prefill_chunk=16).run([Job(p, 24) for p in prompts])
    for job, prompt in zip(jobs, prompts):
        (expected,), _ = llama.generate([prompt], 24, temperature=0)
        assert job.tokens == expected
    assert all(job.cached_tokens > 0 for job in jobs[1:])  # the chat template's system prompt is shared


def test_nucleus_sampling_over_candidates_draws_like_the_full_vocabulary():
    from llama_ref.engine import NUCLEUS_CANDIDATES, sample_nucleus

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5000, generator=generator) * 3
    probs = torch.softmax(logits, dim=-1)
    p = float(torch.topk(probs, NUCLEUS_CANDIDATES).values.sum()) * 0.9  # the nucleus fits the candidates
    sorted_probs, order = torch.sort(probs[0], descending=True)
    keep = (torch.cumsum(sorted_probs, 0) - sorted_probs) <= p
    expected = torch.zeros(5000)
    expected[order[keep]] = sorted_probs[keep] / sorted_probs[keep].sum()
    draws = torch.tensor([sample_nucleus(probs, p, None, generator) for _ in range(20000)])
    frequency = torch.bincount(draws, minlength=5000).float() / len(draws)
    assert set(draws.tolist()) <= set(order[keep].tolist())  # never a token top-p would cut
    assert (frequency - expected).abs().max() < 0.02
    # a flat distribution whose nucleus is wider than the candidates falls back to the full sort
    flat = torch.full((1, 5000), 1 / 5000)
    assert 0 <= sample_nucleus(flat, 0.9, None, generator) < 5000


def test_another_clients_job_gets_a_row_within_a_few_steps_and_the_paused_job_resumes_exactly(tiny):
    """Fair rows: a client holding every row while another's job waits has one paused after
    PREEMPT_AFTER_STEPS steps; the paused job resumes where it stopped, with the tokens it would have had."""
    from llama_ref.engine import PREEMPT_AFTER_STEPS

    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    engine = Engine(tiny.model, tiny.tokenizer, prefill_chunk=8)
    hogs = [engine.submit(Job(prompt, 60, stop_ids=frozenset(), client="a")) for prompt in prompts[:3]]
    while min(len(job.tokens) for job in hogs) < PREEMPT_AFTER_STEPS:
        engine.step()
    steps = engine.stats["decode_steps"]
    short = engine.submit(Job(prompts[4], 2, stop_ids=frozenset(), client="b"))
    while not short.done:
        engine.step()

    # its prefill's chunks (each beside a decode step) and one more token; the rows were busy for 44 more
    assert engine.stats["decode_steps"] - steps <= -(-len(prompts[4]) // 8) + 1 and engine.stats["paused"] == 1
    while not all(job.done for job in hogs):
        engine.step()
    for job, prompt in zip(hogs, prompts):
        assert job.tokens == reference(tiny, prompt, 60)
    assert short.tokens == reference(tiny, prompts[4], 2)


def test_jobs_of_one_client_are_never_paused(tiny):
    prompts = prompts_sharing_a_start(tiny.model.params.vocab_size)
    engine = Engine(tiny.model, tiny.tokenizer)
    jobs = engine.run([Job(p, 40, stop_ids=frozenset()) for p in prompts])  # 7 jobs, 3 rows, no client named
    assert engine.stats["paused"] == 0
    assert [job.tokens for job in jobs] == [reference(tiny, p, 40) for p in prompts]
