"""Translations that pass every structural check but say something else: the meaning checks, through the real
openai SDK against a scripted server on 127.0.0.1.

The cases are what Qwen2.5-Coder-1.5B-Instruct wrote for a short post about sampling (issue 28). The scripted
server answers a segment's first request with what the model wrote, and a retry with a faithful translation; it
also answers the requests that read each translation back into English, as the model would read back what it
wrote ("请为故事起名:" reads back as "Please name the story:"), and the requests that translate a link's words
alone.
"""

from __future__ import annotations

import collections
import json

import pytest
from markdown_it import MarkdownIt
from scripted_server import user_text

from explainer.backends import BackendSettings, Usage, make_backend
from explainer.backends.openai import OpenAIBackend
from explainer.cache import Cache
from explainer.translate import FIRMER, TranslationFailed, translate_markdown, verifies_by_default

LINK = "https://pytorch.org/docs/stable/generated/torch.nn.functional.softmax.html"
FORMULA = r"$p_i = \exp(z_i / T) / \sum_j \exp(z_j / T)$"
POST = f"""## Sampling

The sampler below shows where `temperature` enters.

See the [PyTorch docs]({LINK}) for the reference definition, and note that {FORMULA}.

- Raise it for stories:
- Keep `top_p` below one.
"""

# For each segment as sent: what the model answered first, and a faithful answer, each read back into English;
# what the check that catches it says; and words that only the first answer and only the faithful one have.
# Markers: ⟦1⟧ `temperature`; ⟦1⟧⟦2⟧ the link around "PyTorch docs", ⟦3⟧ the formula.
CASES = {
    "bold 1 and a question": (
        "The sampler below shows where ⟦1⟧ enters.",
        ("下面的采样器展示了 **1** 入口的位置。⟦1⟧ 入口位于哪里？", None),
        ("下面的采样器展示了 ⟦1⟧ 从哪里进入。", "The sampler below shows where ⟦1⟧ comes in."),
        "a question the source does not ask",
        ("入口位于哪里", "从哪里进入"),
    ),
    "the link around the formula": (
        "See the ⟦1⟧PyTorch docs⟦2⟧ for the reference definition, and note that ⟦3⟧.",
        (
            "请参考 PyTorch 的文档 ⟦1⟧，并注意 ⟦3⟧。⟦2⟧",
            "Please refer to the PyTorch documentation ⟦1⟧, and note ⟦3⟧.⟦2⟧",
        ),
        (
            "有关参考定义，请参阅 ⟦1⟧PyTorch 文档⟦2⟧，并注意 ⟦3⟧。",
            "For the reference definition, see ⟦1⟧the PyTorch documentation⟦2⟧, and note that ⟦3⟧.",
        ),
        "⟦1⟧…⟦2⟧ marks '，并注意 ⟦3⟧。', not the source's 'PyTorch docs'",
        ("请参考 PyTorch 的文档", "有关参考定义"),
    ),
    "name the story": (
        "Raise it for stories:",
        ("请为故事起名:", "Please name the story:"),
        ("写故事时调高它：", "Raise it when writing stories:"),
        "read back, it says 'Please name the story:'",
        ("起名", "调高它"),
    ),
    "within one line": (
        "Keep ⟦1⟧ below one.",
        ("保持 ⟦1⟧ 在一行内。", "Keep ⟦1⟧ within one line."),
        ("保持 ⟦1⟧ 低于 1。", "Keep ⟦1⟧ below 1."),
        "read back, it says 'Keep ⟦1⟧ within one line.'",
        ("在一行内", "低于 1"),
    ),
}
FAITHFUL = {"Sampling": ("采样", "Sampling")}  # answered faithfully at once
ALONE = {"PyTorch docs": "PyTorch 文档"}  # a link's words, translated by themselves


class Model:
    """The scripted model: translations into Chinese by segment (`answers`: each ask takes the next, the last
    repeats), read-backs into English by translation, and a link's words alone."""

    def __init__(self, answers: dict[str, list[tuple[str, str | None]]]):
        self.answers = answers
        self.asked = collections.Counter()
        self.read_back = {answer: back for given in answers.values() for answer, back in given if back}
        self.sent: list[tuple[str, str, dict]] = []  # (kind, text, body) of every request

    def __call__(self, body: dict) -> str:
        system, segments = body["messages"][0]["content"], json.loads(user_text(body))
        answer = {}
        for key, text in segments.items():
            if "into English" in system:
                kind, answer[key] = "read back", self.read_back[text]
            elif text in ALONE:
                kind, answer[key] = "alone", ALONE[text]
            else:
                given = self.answers[text]
                kind, answer[key] = "translate", given[min(self.asked[text], len(given) - 1)][0]
                self.asked[text] += 1
            self.sent.append((kind, text, body))
        return json.dumps(answer, ensure_ascii=False)

    def translations(self, text: str) -> list[dict]:
        return [body for kind, sent, body in self.sent if kind == "translate" and sent == text]


def answers_for(case: str, faithful_on_retry: bool = True) -> dict[str, list[tuple[str, str | None]]]:
    answers = {text: [answer] for text, answer in FAITHFUL.items()}
    for name, (text, bad, good, *_) in CASES.items():
        if name == case:
            answers[text] = [bad, good] if faithful_on_retry else [bad]
        else:
            answers[text] = [good]
    return answers


def backend_for(server) -> OpenAIBackend:
    return OpenAIBackend(model="test-model", base_url=server.base_url, backoff=0.001)


def prose(markdown: str) -> list[str]:
    """The text of each paragraph, heading and list item, as markdown-it-py reads it."""
    return [token.content for token in MarkdownIt().parse(markdown) if token.type == "inline"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_replayed_case_is_asked_again_and_the_faithful_answer_is_written(case, scripted_server, openai_env):
    text, _, _, _, (only_bad, only_good) = CASES[case]
    model = Model(answers_for(case))
    server = scripted_server(model)

    translated = translate_markdown(POST, "zh", backend_for(server), source_lang="en", verify=True)

    first, again = model.translations(text)  # asked once more, and only once: alone, as any failed segment
    assert len(json.loads(user_text(first))) > 1 and len(json.loads(user_text(again))) == 1
    body = translated.split("\n---\n", 1)[1]
    written = " ".join(prose(body))
    assert only_good in written and only_bad not in written, written
    assert LINK in body and FORMULA in body and "`temperature`" in body and "`top_p`" in body
    # every other segment was asked once: a faithful answer is not asked again
    assert all(len(model.translations(other)) == 1 for other, *_ in CASES.values() if other != text)


def test_the_segments_asked_again_are_counted_once_each(scripted_server, openai_env):
    model = Model(answers_for("name the story"))  # caught once, faithful on the retry
    server = scripted_server(model)
    usage = Usage()

    translate_markdown(POST, "zh", backend_for(server), usage=usage, source_lang="en", verify=True)

    assert usage.retried == 1 and "1 segment(s) asked again" in usage.summary()
    model = Model(answers_for("name the story", faithful_on_retry=False))  # asked 4 times, then kept
    usage = Usage()
    translate_markdown(
        POST, "zh", backend_for(scripted_server(model)), usage=usage, source_lang="en", verify=True, untranslated=[]
    )
    assert usage.retried == 1


@pytest.mark.parametrize("case", list(CASES))
def test_without_a_faithful_answer_the_segment_fails_and_says_why(case, scripted_server, openai_env):
    text, _, _, problem, _ = CASES[case]
    model = Model(answers_for(case, faithful_on_retry=False))
    server = scripted_server(model)

    with pytest.raises(TranslationFailed) as failure:
        translate_markdown(POST, "zh", backend_for(server), source_lang="en", verify=True)

    message = str(failure.value)
    assert "1 segment(s) failed" in message and "asked 4 times" in message and problem in message, message
    assert "\n" not in message
    alone = [body for body in model.translations(text) if len(json.loads(user_text(body))) == 1]
    # asked alone, then 3 more times, each with another seed and a firmer prompt: as any failing segment
    assert [body["seed"] for body in alone] == [0, 1, 2, 3]
    assert [FIRMER in body["messages"][0]["content"] for body in alone] == [False, True, True, True]


def test_keep_source_on_failure_keeps_the_unfaithful_segment_in_english(scripted_server, openai_env):
    model = Model(answers_for("name the story", faithful_on_retry=False))
    server = scripted_server(model)
    kept: list[str] = []

    translated = translate_markdown(POST, "zh", backend_for(server), source_lang="en", untranslated=kept, verify=True)

    assert "- Raise it for stories:" in translated and "请为故事起名" not in translated
    assert len(kept) == 1 and "Please name the story:" in kept[0]


def test_added_bold_around_faithful_words_is_unwrapped_not_asked_again(scripted_server, openai_env):
    text = CASES["bold 1 and a question"][0]
    answers = answers_for("none")
    answers[text] = [("下面的采样器展示了 ⟦1⟧ 从**哪里**进入。", None)]
    model = Model(answers)
    model.read_back["下面的采样器展示了 ⟦1⟧ 从哪里进入。"] = "The sampler below shows where ⟦1⟧ comes in."
    server = scripted_server(model)

    translated = translate_markdown(POST, "zh", backend_for(server), source_lang="en", verify=True)

    assert "下面的采样器展示了 `temperature` 从哪里进入。" in translated and "**" not in translated
    assert len(model.translations(text)) == 1


def test_the_meaning_checks_cost_one_read_back_per_segment_and_a_rerun_asks_nothing(
    scripted_server, openai_env, tmp_path
):
    model = Model(answers_for("none"))
    server = scripted_server(model)
    backend, cache = backend_for(server), Cache(tmp_path / "cache")
    usage = Usage()

    translate_markdown(POST, "zh", backend, cache, usage, source_lang="en", verify=True)

    kinds = collections.Counter(kind for kind, _, _ in model.sent)
    assert kinds == {"translate": 5, "read back": 5, "alone": 1}  # the five segments, and the link's words
    assert usage.requests == len(server.requests)
    rerun = Usage()
    translate_markdown(POST, "zh", backend, cache, rerun, source_lang="en", verify=True)
    assert rerun.requests == 0 and len(model.sent) == 11


def test_a_cached_translation_made_without_the_checks_is_checked_when_they_are_on(
    scripted_server, openai_env, tmp_path
):
    """The cache holds what passed the checks of its time; a check turned on later applies to it, like any
    check added later."""
    text, bad, good, *_ = CASES["name the story"]
    model = Model({**answers_for("none"), text: [bad, good]})
    server = scripted_server(model)
    backend, cache = backend_for(server), Cache(tmp_path / "cache")

    unchecked = translate_markdown(POST, "zh", backend, cache, source_lang="en", verify=False)
    assert "请为故事起名" in unchecked and not [kind for kind, _, _ in model.sent if kind == "read back"]

    checked = translate_markdown(POST, "zh", backend, cache, source_lang="en", verify=True)
    assert "写故事时调高它" in checked and "请为故事起名" not in checked
    assert len(model.translations(text)) == 2


def test_the_checks_run_by_default_only_where_the_model_runs_here(scripted_server, openai_env):
    model = Model(answers_for("none"))
    server = scripted_server(model)
    translate_markdown(POST, "zh", backend_for(server), source_lang="en")
    assert not any(kind == "read back" for kind, _, _ in model.sent)  # an API: off unless asked for
    assert verifies_by_default(make_backend(BackendSettings(name="local")))  # builds nothing, loads no model
    assert not verifies_by_default(backend_for(server))


# ---------------------------------------------------------------------------------------------
# The marked words, one segment at a time
# ---------------------------------------------------------------------------------------------


def test_the_words_of_links_and_emphasis_are_found_in_source_and_translation():
    from explainer.markdown_segments import split_document
    from explainer.translation_checks import marked_words

    [segment] = split_document("Read **the *whole* guide** in [the notes](https://x.org) or _here_.\n").segments
    assert sorted(marked_words(segment.text, segment.pairs)) == [
        ("*", "here"),
        ("*", "whole"),
        ("**", "the whole guide"),
        ("⟦1⟧…⟦2⟧", "the notes"),
    ]


@pytest.mark.parametrize(
    "translation, read_back, caught",
    [
        ("Lesen Sie **den Leitfaden** vor dem Start.", "Read **the guide** before the start.", False),
        # another word for it than its translation alone: the read-back shows the same words are marked
        ("Lesen Sie **das Handbuch** vor dem Start.", "Read **the manual guide** before the start.", False),
        # the bold moved onto other words: neither way finds the source's words in it
        ("Lesen Sie den Leitfaden **vor dem Start**.", "Read the guide **before the start**.", True),
    ],
)
def test_emphasis_must_mark_the_source_words(translation, read_back, caught):
    from explainer.markdown_segments import split_document
    from explainer.translation_checks import marked_words_problems

    [segment] = split_document("Read **the guide** before you start.\n").segments
    problems = marked_words_problems(segment, translation, read_back, {"the guide": "der Leitfaden"})
    assert bool(problems) == caught, problems


# ---------------------------------------------------------------------------------------------
# The round trip's scale, by how the source language writes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, source_lang, back, caught",
    [
        # issue 28's change of a word: under the bar for a source whose words are spaced
        ("Keep ⟦1⟧ below one.", "en", "Keep ⟦1⟧ within one line.", True),
        ("Keep ⟦1⟧ below one.", "en", "Keep ⟦1⟧ below 1.", False),
        ("Let's learn what NCCL is.", "en", "We will learn what NCCL is.", False),
        # a faithful read-back into Chinese from the labelled set (seed 004): one character is a word, so a
        # paraphrase shares few n-grams; it passes here, where the same score would fail an English source
        ("当你运行以下命令时，", "zh", "当执行命令时，", False),
        ("ChatGPT: 以下是提供的代码的解释：", "zh", "当然，以下是代码的说明:", True),  # the speaker dropped
    ],
)
def test_the_round_trip_is_scored_on_the_source_languages_scale(source, source_lang, back, caught):
    from explainer.markdown_segments import split_document
    from explainer.translation_checks import ROUND_TRIP_MIN_CHRF, chrf, round_trip_problem

    [segment] = split_document(source.replace("⟦1⟧", "`top_p`") + "\n").segments
    assert bool(round_trip_problem(segment, back, source_lang)) == caught
    if source_lang == "zh" and not caught:
        assert chrf(back, segment.text) < ROUND_TRIP_MIN_CHRF


# ---------------------------------------------------------------------------------------------
# Names: what every faithful translation keeps as written
# ---------------------------------------------------------------------------------------------


def test_names_are_acronyms_and_identifiers_not_units_or_capitalized_words():
    from explainer.translation_checks import names

    # sources of the labelled set (benchmarks/translation_labels.jsonl)
    assert names(
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 86.00 MiB (GPU 0; 11.69 GiB total capacity)"
    ) == ["torch.cuda.OutOfMemoryError", "CUDA", "GPU"]
    assert names("multi-GPU and multi-node primitives optimized for NVIDIA GPUs") == ["GPU", "NVIDIA"]
    assert names("llama2.c runs a 15M-parameter story model; ⟦1⟧ does the same with SmolLM2-135M") == [
        "llama2.c",
        "SmolLM2",
    ]
    # ordinary words, abbreviations and sizes are written the target language's way
    assert names("Written in English, e.g. in February; llama-2-7b needs about 13GB.") == []


def test_a_translation_that_leaves_out_a_name_is_asked_again_without_a_read_back(scripted_server, openai_env):
    """A zh answer that drops the exception's name (labelled set: it reads back fluently, chrF 52, over the bar),
    then a faithful one. The first is caught by the name alone: no read-back is asked for it."""
    text = "It fails with torch.cuda.OutOfMemoryError when the card is full."
    dropped = ("显卡满时它会失败。", "It fails when the card is full.")
    kept = (
        "显卡满时它会以 torch.cuda.OutOfMemoryError 失败。",
        "It fails with torch.cuda.OutOfMemoryError when the card is full.",
    )
    model = Model({text: [dropped, kept]})
    server = scripted_server(model)

    translated = translate_markdown(text + "\n", "zh", backend_for(server), source_lang="en", verify=True)

    assert kept[0] in translated and dropped[0] not in translated
    first, again = model.translations(text)
    assert FIRMER in again["messages"][0]["content"] and "identifiers" in FIRMER
    read_backs = [sent for kind, sent, _ in model.sent if kind == "read back"]
    assert read_backs == [kept[0]]  # the answer without the name was never read back


def test_a_translation_that_never_keeps_the_name_fails_and_names_it(scripted_server, openai_env):
    text = "It fails with torch.cuda.OutOfMemoryError when the card is full."
    model = Model({text: [("显卡满时它会失败。", "It fails when the card is full.")]})
    server = scripted_server(model)

    with pytest.raises(TranslationFailed) as failure:
        translate_markdown(text + "\n", "zh", backend_for(server), source_lang="en", verify=True)

    assert "leaves out 'torch.cuda.OutOfMemoryError'" in str(failure.value) and "asked 4 times" in str(failure.value)


@pytest.mark.parametrize(
    "source, translation, caught",
    [
        # from the labelled set: a name that stands for another, and words beside names alone
        (
            "The NVIDIA Collective Communication Library (NCCL) implements",
            "CUDA コレクティブ ライブラリ (NCCL) は",
            "adds 'CUDA'",
        ),
        ("NVIDIA NCCL, `nccl`", "NVIDIA NCCL, 协议⟦1⟧", "adds words to a segment of names alone"),
        ("NVIDIA NCCL, `nccl`", "NCCL, NVIDIA⟦1⟧", None),  # reordered: the same names, nothing beside them
        ("The NVIDIA Collective Communication Library (NCCL) implements", "NVIDIA 集合通信库 (NCCL) 实现了", None),
    ],
)
def test_a_translation_adds_no_name_and_no_word_to_names_alone(source, translation, caught):
    from explainer.markdown_segments import split_document
    from explainer.translation_checks import names_problem

    [segment] = split_document(source + "\n").segments
    problem = names_problem(segment, translation)
    assert (problem is None) if caught is None else (caught in (problem or "")), problem


def test_a_segment_of_names_alone_is_not_read_back(scripted_server, openai_env):
    """The example site's "NVIDIA NCCL, <link>": translated into Arabic as it is, read back as "NVIDIA NCCL, the
    library for efficient inter-node communication" (chrF 38), so the read-back failed a faithful translation on
    every try. The names check judges such a segment; nothing is read back."""
    text = "NVIDIA NCCL, ⟦1⟧"
    model = Model({text: [(text, "NVIDIA NCCL, the library for efficient inter-node communication ⟦1⟧")]})
    server = scripted_server(model)

    translated = translate_markdown(
        "NVIDIA NCCL, <https://developer.nvidia.com/nccl>\n", "zh", backend_for(server), source_lang="en", verify=True
    )

    assert "NVIDIA NCCL, <https://developer.nvidia.com/nccl>" in translated
    assert [kind for kind, _, _ in model.sent] == ["translate"]
