"""Translating posts through the real openai SDK against a scripted server on 127.0.0.1.

The scripted translators here answer like a model would: a JSON object with the same ids. The
well-behaved one puts a sentence in the target language in place of each piece of prose and
keeps every ⟦n⟧ marker; the broken ones replay what the seed's Arabic copy shows.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin
from ruamel.yaml import YAML
from scripted_server import Reply, ScriptedServer, user_text

from explainer.backends import Completion, Usage
from explainer.backends.openai import OpenAIBackend
from explainer.cache import Cache
from explainer.cli import main
from explainer.errors import UserError
from explainer.languages import language
from explainer.markdown_segments import split_document
from explainer.post import Post, Section
from explainer.render import render_post
from explainer.translate import SegmentTranslator, translate_file, translate_markdown, translate_post

DATA = Path(__file__).parent / "data"
SEED = (DATA / "seed_zh.md").read_text(encoding="utf-8")
SENTENCE = {
    "ar": "لقد قمت مؤخرا ببناء جهاز الكمبيوتر الخاص بي",
    "en": "I recently built my own computer with a graphics card",
}
# An independent reading of the Markdown, for what the tests compare: CommonMark, tables, front matter.
REFERENCE = MarkdownIt("commonmark").enable("table").use(front_matter_plugin)


def target_of(body: dict) -> str:
    system = body["messages"][0]["content"]
    return "ar" if "Arabic" in system else "en"


def sent_segments(body: dict) -> dict[str, str]:
    return json.loads(user_text(body))


def fake_translation(text: str, target: str) -> str:
    """Each run of prose between markers becomes a sentence in `target`; markers stay in order."""
    out, pos = [], 0
    while True:
        start = text.find("⟦", pos)
        piece = text[pos:] if start < 0 else text[pos:start]
        out.append(f" {SENTENCE[target]} " if any(ch.isalpha() for ch in piece) else piece)
        if start < 0:
            return "".join(out).strip()
        end = text.index("⟧", start) + 1
        out.append(text[start:end])
        pos = end


def well_behaved(body: dict) -> str:
    target = target_of(body)
    return json.dumps(
        {key: fake_translation(value, target) for key, value in sent_segments(body).items()}, ensure_ascii=False
    )


def fences(text: str) -> list[str]:
    return [token.content for token in REFERENCE.parse(text) if token.type in ("fence", "code_block")]


def count(text: str, token_type: str) -> int:
    return sum(token.type == token_type for token in REFERENCE.parse(text))


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return YAML(typ="safe").load(text[4 : text.index("\n---\n", 4)])


def backend_for(server) -> OpenAIBackend:
    return OpenAIBackend(model="test-model", base_url=server.base_url, backoff=0.001)


def everything_sent(server) -> str:
    return "\n".join(message["content"] for body in server.requests for message in body["messages"])


@pytest.fixture
def seed_post(tmp_path) -> Path:
    path = tmp_path / "posts" / "2023-08-17-llama-zh.md"
    path.parent.mkdir()
    path.write_text(SEED, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# A real input: the Chinese seed post, to Arabic and to English
# ---------------------------------------------------------------------------------------------


def test_seed_post_goes_to_arabic_and_english_with_code_and_structure_intact(
    scripted_server, openai_env, seed_post, tmp_path
):
    server = scripted_server(well_behaved)
    out = tmp_path / "site"

    written = translate_file(seed_post, ["ar", "en"], backend_for(server), out_dir=out)

    assert written == [out / "ar" / "2023-08-17-llama-ar.md", out / "en" / "2023-08-17-llama-en.md"]
    for path, lang, direction in ((written[0], "ar", "rtl"), (written[1], "en", "ltr")):
        text = path.read_text(encoding="utf-8")
        assert fences(text) == fences(SEED)  # all 16 code blocks, byte for byte, in order
        assert len(fences(SEED)) == 16
        meta = front_matter(text)
        assert list(meta) == ["layout", "title", "lang", "dir", "translated", "source_hash"]
        assert (meta["layout"], meta["lang"], meta["dir"], meta["translated"]) == ("post", lang, direction, True)
        assert meta["source_hash"] == hashlib.sha256(SEED.encode("utf-8")).hexdigest()
        assert meta["title"] == SENTENCE[lang]
        headings = [token for token in REFERENCE.parse(text) if token.type == "heading_open"]
        assert [h.tag for h in headings] == ["h2", "h2", "h2"]
        for token_type in ("bullet_list_open", "list_item_open", "blockquote_open", "hr", "link_open"):
            assert count(text, token_type) == count(SEED, token_type), token_type
        prose = [token.content for token in REFERENCE.parse(text) if token.type == "inline"]
        assert not any("\u4e00" <= ch <= "\u9fff" for ch in "".join(prose))  # no Chinese prose left
        assert "https://lzwjava.github.io/computer" in text

    # Code, inline code and link targets never reached the model.
    sent = everything_sent(server)
    for block in fences(SEED):
        for line in block.splitlines():
            if len(line.strip()) > 12:
                assert line.strip() not in sent
    for never_sent in ("nvidia-smi", "https://developer.nvidia.com/nccl", "token_logprobs", "layout: post"):
        assert never_sent not in sent


def test_translate_command_writes_each_language_and_prints_the_paths(scripted_server, openai_env, seed_post, tmp_path):
    server = scripted_server(well_behaved)
    result = CliRunner().invoke(
        main,
        [
            "translate",
            str(seed_post),
            "--to",
            "ar,en",
            "-o",
            str(tmp_path / "out"),
            "--base-url",
            server.base_url,
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert paths == [
        str(tmp_path / "out" / "ar" / "2023-08-17-llama-ar.md"),
        str(tmp_path / "out" / "en" / "2023-08-17-llama-en.md"),
    ]
    assert "requests" in result.stderr  # the usage summary
    assert front_matter(Path(paths[0]).read_text(encoding="utf-8"))["dir"] == "rtl"


def test_a_post_already_in_the_target_language_is_skipped(scripted_server, openai_env, seed_post, tmp_path):
    server = scripted_server(well_behaved)
    written = translate_file(seed_post, ["zh", "en"], backend_for(server), out_dir=tmp_path / "out")
    assert [path.parent.name for path in written] == ["en"]


# ---------------------------------------------------------------------------------------------
# Failure modes from the seed's Arabic copy: each is caught and nothing is written
# ---------------------------------------------------------------------------------------------

CODE_LINE = "total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)"


def drop_markers(value: str, target: str) -> str:
    translated = fake_translation(value, target)
    while "⟦" in translated:
        start = translated.index("⟦")
        translated = translated[:start] + translated[translated.index("⟧", start) + 1 :]
    return translated


def mangle_each(mangle):
    def script(body):
        target = target_of(body)
        return json.dumps(
            {key: mangle(value, target) for key, value in sent_segments(body).items()}, ensure_ascii=False
        )

    return script


def wrap_whole_answer(body):
    return "Here is the translation:\n```markdown\n" + well_behaved(body) + "\n```"


def cut_off(body):
    answer = well_behaved(body)
    return Reply(answer[: len(answer) // 2], finish_reason="length")


def only_in_arabic(script):
    """English answers are fine, so the test shows that a language that passed is not written either."""
    return lambda body: script(body) if target_of(body) == "ar" else well_behaved(body)


def break_front_matter(body):
    segments = sent_segments(body)
    answer = json.loads(well_behaved(body))
    for key, value in segments.items():
        if value == "Nvidia 驱动，LLaMA 和 ChatGPT":
            answer[key] = 'تعريف Nvidia\n---\nlayout: post\ntitle: "LLaMA'
    return json.dumps(answer, ensure_ascii=False)


FAILURES = {
    "dropped markers (fences and links lost)": (mangle_each(drop_markers), "is missing"),
    "code duplicated after the Arabic phrase": (
        mangle_each(
            lambda value, target: (
                fake_translation(value, target) + f"\nتم ترجمة الكود أعلاه إلى:\n```python\n{CODE_LINE}\n```"
            )
        ),
        "spans several lines",
    ),
    "the Arabic phrase on one line": (
        mangle_each(lambda value, target: fake_translation(value, target) + " تم ترجمة الكود أعلاه إلى:"),
        "chatter",
    ),
    "code with a translated comment instead of a marker": (
        mangle_each(
            lambda value, target: fake_translation(value, target).replace(
                "⟦1⟧", f"`{CODE_LINE}  # الطول الكلي المقبول`"
            )
        ),
        "⟦1⟧ is missing",
    ),
    "chatter before each segment": (
        mangle_each(lambda value, target: "Here is the translation: " + fake_translation(value, target)),
        "chatter",
    ),
    "a ```markdown wrapper around the answer": (wrap_whole_answer, "not a JSON object"),
    "a truncated answer (finish_reason=length)": (cut_off, "finish_reason=length"),
    "front matter pasted into the title": (break_front_matter, "front matter title"),
    "the source left untranslated": (mangle_each(lambda value, target: value), "reads as zh, not ar"),
    "raw HTML added to the prose": (
        mangle_each(lambda value, target: fake_translation(value, target) + ' <img src="x" onerror="alert(1)">'),
        "HTML or Liquid differs from the source",
    ),
    "a stray backtick, which kramdown may pair with a code span's": (
        mangle_each(lambda value, target: fake_translation(value, target) + " `"),
        "stray backtick",
    ),
    "a look-alike left beside its marker (the marker forced in at the end)": (
        mangle_each(
            lambda value, target: (
                fake_translation(value, target).replace("⟦1⟧", "[1]") + " ⟦1⟧"
                if "⟦1⟧" in value
                else fake_translation(value, target)
            )
        ),
        "'[1]' looks like placeholder ⟦1⟧",
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_each_failure_mode_is_caught_and_nothing_is_written(failure, scripted_server, openai_env, seed_post, tmp_path):
    script, expected = FAILURES[failure]
    server = scripted_server(only_in_arabic(script))
    out = tmp_path / "out"

    result = CliRunner().invoke(
        main,
        ["translate", str(seed_post), "--to", "en,ar", "-o", str(out), "--base-url", server.base_url, "--no-cache"],
    )

    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.startswith("Error: translating") and "\n" not in message and "Traceback" not in message
    assert "nothing was written" in message and expected in message, message
    assert not out.exists()  # not even the language that passed (en) is written
    assert sorted(p.name for p in seed_post.parent.iterdir()) == [seed_post.name]


def test_what_a_translation_adds_is_made_inert_and_the_authors_html_is_kept(scripted_server, openai_env):
    source = (
        "Press <kbd>Ctrl</kbd> and read `a<b>` in the note below, which explains the whole thing.\n\n"
        '<div class="note">The author wrote this <b>HTML</b> on purpose.</div>\n'
    )

    def adds_a_script_link(body):
        answer = json.loads(well_behaved(body))
        return json.dumps(
            {key: value + " [x](javascript:alert(1))" for key, value in answer.items()}, ensure_ascii=False
        )

    server = scripted_server(adds_a_script_link)
    translated = translate_markdown(source, "ar", backend_for(server), source_lang="en")

    # markdown-it sees no link (so the checks pass), kramdown would make one: its scheme is broken
    assert "[x](javascript\\:alert(1))" in translated and "(javascript:" not in translated
    assert "<kbd>" in translated and "</kbd>" in translated and "`a<b>`" in translated
    assert '<div class="note">The author wrote this <b>HTML</b> on purpose.</div>' in translated


def test_what_a_translation_adds_to_the_front_matter_is_escaped_like_the_body(scripted_server, openai_env):
    """The review's finding: a model-added script link landed as written in title: and excerpt:, while the
    same link in the body was made inert."""
    source = (
        "---\ntitle: Running LLaMA on a small graphics card\nexcerpt: What people hit when they run "
        "the model at home.\n---\n\nThe body of the post explains the whole thing in one sentence.\n"
    )

    def adds_a_script_link(body):
        answer = json.loads(well_behaved(body))
        return json.dumps(
            {key: value + " [z](javascript:alert(9))" for key, value in answer.items()}, ensure_ascii=False
        )

    server = scripted_server(adds_a_script_link)
    translated = translate_markdown(source, "ar", backend_for(server), source_lang="en")

    front = YAML(typ="safe").load(translated.split("---\n")[1])
    for key in ("title", "excerpt"):
        assert front[key].endswith(" [z](javascript\\:alert(9))"), front[key]
    assert translated.split("---\n", 2)[2].count("[z](javascript\\:alert(9))") == 1


def test_a_generated_posts_title_is_escaped_like_its_intro():
    post = Post(
        title="Sampling [z](javascript:alert(9)) <b onclick=x>",
        lang="en",
        date="2024-01-02",
        source_path="demo.py",
        code_language="python",
        intro="An intro.",
        sections=[],
    )
    front = YAML(typ="safe").load(render_post(post).split("---\n")[1])
    assert front["title"] == "Sampling [z](javascript\\:alert(9)) &lt;b onclick=x&gt;"


def test_a_failing_batch_is_retried_segment_by_segment(scripted_server, openai_env, seed_post, tmp_path):
    """A model that only gets it wrong in big batches: smaller units succeed, the post is written."""

    def script(body):
        segments = sent_segments(body)
        if len(segments) > 1:
            return Reply(well_behaved(body)[:50], finish_reason="length")
        return well_behaved(body)

    server = scripted_server(script)
    [written] = translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    assert fences(written.read_text(encoding="utf-8")) == fences(SEED)
    assert any(len(sent_segments(body)) == 1 for body in server.requests)


def firmly_asked(body: dict) -> bool:
    return "was rejected" in body["messages"][0]["content"]


def test_a_segment_that_loses_a_marker_alone_is_asked_again_varied_and_passes(
    scripted_server, openai_env, seed_post, tmp_path
):
    """The failure seen with Qwen2.5-Coder-1.5B on zh and ja: a marker dropped. Asked again alone with another
    seed, some sampling and a firmer prompt, the model keeps it, and the language is written whole."""

    def script(body):
        if firmly_asked(body):
            return well_behaved(body)
        return mangle_each(drop_markers)(body)

    server = scripted_server(only_in_arabic(script))
    [written] = translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    assert fences(written.read_text(encoding="utf-8")) == fences(SEED)
    again = [body for body in server.requests if firmly_asked(body)]
    assert again and all(len(sent_segments(body)) == 1 for body in again)
    assert {(body["seed"], body["temperature"]) for body in again} == {(1, 0.4)}


def test_a_segment_failing_every_retry_fails_its_language_after_three_more_asks(
    scripted_server, openai_env, seed_post, tmp_path
):
    server = scripted_server(only_in_arabic(mangle_each(drop_markers)))
    with pytest.raises(UserError, match="asked 4 times"):
        translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    alone = collections.Counter(user_text(body) for body in server.requests if len(sent_segments(body)) == 1)
    assert alone and max(alone.values()) == 4  # the first ask alone, then 3 varied ones
    assert not (tmp_path / "out").exists()


def test_keep_source_on_failure_writes_the_language_and_lists_what_stayed(
    scripted_server, openai_env, seed_post, tmp_path
):
    """Only on request: the failed segments keep their source text, the copy's front matter names them, and
    the command says so; without the flag the same run writes nothing (test above)."""
    lost = "Nvidia 驱动，LLaMA 和 ChatGPT"

    def script(body):
        answer = json.loads(well_behaved(body))
        for key, value in sent_segments(body).items():
            if value == lost:
                answer[key] = "Here is the translation: تعريف"  # chatter, every time
        return json.dumps(answer, ensure_ascii=False) if target_of(body) == "ar" else well_behaved(body)

    server = scripted_server(script)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "translate",
            str(seed_post),
            "--to",
            "ar",
            "-o",
            str(out),
            "--base-url",
            server.base_url,
            "--no-cache",
            "--keep-source-on-failure",
        ],
    )
    assert result.exit_code == 0, result.output
    [written] = out.glob("ar/*.md")
    text = written.read_text(encoding="utf-8")
    matter = front_matter(text)
    assert matter["untranslated"] and all(isinstance(entry, str) for entry in matter["untranslated"])
    assert lost in text and fences(text) == fences(SEED)
    assert "left untranslated" in result.stderr and "front matter title" in result.stderr


def test_a_segment_chattering_only_in_a_batch_is_retried_alone(scripted_server, openai_env, seed_post, tmp_path):
    def script(body):
        segments = sent_segments(body)
        answer = json.loads(well_behaved(body))
        if len(segments) > 1:
            answer["1"] = "Here is the translation: " + answer["1"]
        return json.dumps(answer, ensure_ascii=False)

    server = scripted_server(script)
    [written] = translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    assert "Here is the translation" not in written.read_text(encoding="utf-8")


def test_a_json_fence_around_a_good_answer_is_accepted(scripted_server, openai_env, seed_post, tmp_path):
    server = scripted_server(lambda body: "```json\n" + well_behaved(body) + "\n```")
    [written] = translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    assert fences(written.read_text(encoding="utf-8")) == fences(SEED)
    assert all(len(sent_segments(body)) > 1 for body in server.requests)  # no retries were needed


def test_broken_front_matter_in_the_source_is_one_clear_error(scripted_server, openai_env, tmp_path):
    server = scripted_server(well_behaved)
    post = tmp_path / "post.md"
    post.write_text('---\ntitle: "unclosed\nlayout: post\n---\n\nSome text here.\n', encoding="utf-8")
    result = CliRunner().invoke(
        main, ["translate", str(post), "--to", "ar", "--base-url", server.base_url, "--no-cache"]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: post.md: the front matter is not valid YAML")
    assert server.requests == [] and sorted(p.name for p in tmp_path.iterdir()) == ["post.md"]


def test_a_source_markdown_it_cannot_read_is_one_clear_error(scripted_server, openai_env, tmp_path):
    server = scripted_server(well_behaved)
    post = tmp_path / "post.md"
    post.write_text("Some text here.\n\n>1. <!--\n>", encoding="utf-8")  # markdown-it-py 4.3.0 raises on it
    result = CliRunner().invoke(
        main, ["translate", str(post), "--to", "ar", "--base-url", server.base_url, "--no-cache"]
    )
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: post.md: markdown-it-py") and "cannot read" in result.stderr
    assert server.requests == []


def test_an_unknown_language_lists_the_known_ones(openai_env, seed_post):
    result = CliRunner().invoke(main, ["translate", str(seed_post), "--to", "ar,xx", "--no-cache"])
    assert result.exit_code == 1
    assert "unknown language 'xx'" in result.stderr and "zh-Hant" in result.stderr


def test_an_unreachable_server_fails_at_once_with_the_backends_message(openai_env, seed_post, tmp_path):
    backend = OpenAIBackend(model="test-model", base_url="http://127.0.0.1:9/v1", max_retries=0)
    with pytest.raises(UserError, match="cannot reach"):
        translate_file(seed_post, ["ar"], backend, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The segment cache
# ---------------------------------------------------------------------------------------------


def test_editing_one_paragraph_sends_exactly_that_segment(scripted_server, openai_env, seed_post, tmp_path):
    server = scripted_server(well_behaved)
    cache = Cache(tmp_path / "cache")
    backend = backend_for(server)
    translate_file(seed_post, ["ar"], backend, cache, out_dir=tmp_path / "out")
    first_run = len(server.requests)
    assert first_run > 1

    edited = "实际上，达到这个阶段真的很难，我花了整整两天。"
    seed_post.write_text(SEED.replace("实际上，达到这个阶段是有一定难度的。", edited), encoding="utf-8")
    usage = Usage()
    [written] = translate_file(seed_post, ["ar"], backend, cache, usage, out_dir=tmp_path / "out")

    second_run = server.requests[first_run:]
    assert len(second_run) == 1
    segments = sent_segments(second_run[0])
    assert len(segments) == 1 and edited in next(iter(segments.values()))
    assert usage.requests == 1 and usage.cache_hits > 40
    assert fences(written.read_text(encoding="utf-8")) == fences(SEED)


def test_a_cached_translation_that_a_newer_check_refuses_is_asked_again(scripted_server, openai_env, tmp_path):
    source = "The program runs on the computer today and uses the graphics card for all of its work.\n"
    good = "यह प्रोग्राम आज कंप्यूटर पर चलता है और अपने सारे काम के लिए GPU का उपयोग करता है।"
    server = scripted_server(lambda body: json.dumps({key: good for key in sent_segments(body)}, ensure_ascii=False))
    backend, cache = backend_for(server), Cache(tmp_path / "cache")
    # an answer cached before the check for words that mix scripts existed
    [segment] = split_document(source).segments
    key = SegmentTranslator(language("hi"), backend, cache, Usage(), source_lang="en").key(segment)
    cache.put(key, Completion(good.replace("प्रोग्राम", "प्रोग्रAM"), "stop"))

    assert good in translate_markdown(source, "hi", backend, cache, source_lang="en")
    assert len(server.requests) == 1
    usage = Usage()  # the new answer replaced the refused one in the cache
    assert good in translate_markdown(source, "hi", backend, cache, usage, source_lang="en")
    assert usage.cache_hits == 1 and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------
# Generated posts: translated as data, code never sent
# ---------------------------------------------------------------------------------------------


def test_a_generated_post_is_translated_as_data_and_its_code_never_sent(scripted_server, openai_env):
    server = scripted_server(well_behaved)
    code = "def scale(x):\n    # 把输入乘以二\n    return x * 2\n"
    post = Post(
        title="理解 `scale` 函数",
        lang="zh",
        date="2024-01-02",
        source_path="demo.py",
        code_language="python",
        intro="这篇文章逐段解释一个很小的函数，看看它是如何工作的。",
        sections=[
            Section(
                code=code,
                code_language="python",
                start_line=1,
                end_line=3,
                symbol="scale",
                kind="function",
                explanation="函数 `scale` 把参数 `x` 乘以二，然后返回结果。",
            )
        ],
    )

    translated = translate_post(post, "en", backend_for(server))

    assert translated.lang == "en"
    assert translated.sections[0].code == code
    assert translated.title == f"{SENTENCE['en']} `scale` {SENTENCE['en']}"
    assert translated.sections[0].explanation.count("`") == 4 and "`x`" in translated.sections[0].explanation
    assert SENTENCE["en"] in translated.intro
    assert post.title == "理解 `scale` 函数"  # the source post is not changed
    sent = everything_sent(server)
    assert "return x * 2" not in sent and "把输入乘以二" not in sent and "`scale`" not in sent


# ---------------------------------------------------------------------------------------------
# Property: an identity translator gives back the same structure and the same code
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "The model reads the whole prompt before it writes anything",
    "Each layer of the network keeps its own cache of keys and values",
    "We ran the example on a small graphics card without trouble",
    "Sampling with a lower temperature makes the answers more predictable",
]
sentence = st.sampled_from(SENTENCES)
# No Devanagari: the documents claim to be Hindi, so no stray text can look like untranslated source.
code_text = st.text(
    st.sampled_from([chr(c) for c in range(32, 127) if chr(c) not in "`~"] + list("é中文ü→\t")), max_size=40
)
inline = st.one_of(
    sentence,
    code_text.filter(lambda t: t.strip() and "\n" not in t).map(lambda t: f"`{t.strip()}`"),
    st.tuples(sentence, st.sampled_from(["https://example.com/a_b", "/docs/page.html"])).map(
        lambda pair: f"[{pair[0]}]({pair[1]})"
    ),
    sentence.map(lambda s: f"**{s}**"),
    st.just("see https://example.org/x_y?q=1 there"),
    st.just("{{ site.baseurl }}"),
    st.just("![a chart](img/chart.png)"),
    st.just("<kbd>Ctrl</kbd>"),
    st.just("$x_1 + y$"),
)
line = st.lists(inline, min_size=1, max_size=4).map(" ".join)
block = st.one_of(
    st.tuples(st.integers(1, 4), line).map(lambda pair: "#" * pair[0] + " " + pair[1]),
    line,
    st.lists(line, min_size=2, max_size=3).map("\n".join),  # a paragraph with soft breaks
    st.lists(line, min_size=1, max_size=3).map(lambda items: "\n".join(f"- {item}" for item in items)),
    st.lists(line, min_size=1, max_size=3).map(
        lambda items: "\n".join(f"{n}. {item}" for n, item in enumerate(items, 1))
    ),
    st.lists(line, min_size=1, max_size=2).map(lambda lines: "\n".join(f"> {item}" for item in lines)),
    st.tuples(st.sampled_from(["", "python", "c"]), st.lists(code_text, max_size=4)).map(
        lambda pair: f"```{pair[0]}\n" + "\n".join(pair[1]) + "\n```"
    ),
    st.lists(code_text.filter(lambda t: t.strip()), min_size=1, max_size=3).map(
        lambda lines: "\n".join("    " + item.strip() for item in lines)
    ),
    st.tuples(sentence, sentence).map(lambda pair: f"| {pair[0]} | `code` |\n|---|---|\n| {pair[1]} | two |"),
    st.just("{% highlight python %}\nprint('keep me')  # a comment\n{% endhighlight %}"),
    st.just('<div class="note">\nRaw HTML that stays as it is.\n</div>'),
    st.just("***"),
)
documents = st.lists(block, min_size=1, max_size=8).map(lambda blocks: "\n\n".join(blocks) + "\n")


@pytest.fixture(scope="module")
def identity_backend():
    def echo(body):
        return json.dumps(sent_segments(body), ensure_ascii=False)

    with ScriptedServer(echo) as server:
        yield OpenAIBackend(model="test-model", base_url=server.base_url, api_key="sk-test-not-a-real-key")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_identity_translation_keeps_structure_and_code_bytes(identity_backend, document):
    translated = translate_markdown(document, "en", identity_backend, source_lang="hi")
    body = translated[translated.index("\n---\n", 4) + len("\n---\n") :]

    assert fences(body) == fences(document)
    source_tokens, body_tokens = REFERENCE.parse(document), REFERENCE.parse(body)
    assert [t.type for t in body_tokens] == [t.type for t in source_tokens]
    assert [t.content for t in body_tokens if t.type == "html_block"] == [
        t.content for t in source_tokens if t.type == "html_block"
    ]
    source_inline = [c for t in source_tokens for c in t.children or () if c.type != "softbreak"]
    body_inline = [c for t in body_tokens for c in t.children or () if c.type != "softbreak"]
    assert [(c.type, c.content, c.attrs) for c in body_inline if c.type != "text"] == [
        (c.type, c.content, c.attrs) for c in source_inline if c.type != "text"
    ]
    if "\n" not in "".join(t.content for t in source_tokens if t.type == "inline"):
        assert body == document  # without soft line breaks, an identity translation changes nothing


@pytest.mark.parametrize("lookalike", ["【{n}】", "[[{n}]]", "⟦ {n} ⟧"])
def test_a_placeholder_written_as_a_lookalike_is_mapped_back(
    lookalike, scripted_server, openai_env, seed_post, tmp_path
):
    """Small models write ⟦1⟧ as 【1】 (zh) or drop into [[1]]: unambiguous, so repaired, and the post is whole."""

    def respell(value, target):
        translated = fake_translation(value, target)
        return translated.replace("⟦1⟧", lookalike.format(n=1), 1)

    server = scripted_server(mangle_each(respell))
    [written] = translate_file(seed_post, ["ar"], backend_for(server), out_dir=tmp_path / "out")
    text = written.read_text(encoding="utf-8")
    assert fences(text) == fences(SEED) and count(text, "link_open") == count(SEED, "link_open")
    assert lookalike.format(n=1) not in text
    assert all(len(sent_segments(body)) > 1 for body in server.requests)  # accepted at once, no retries


@pytest.mark.parametrize(
    "translation, expected",
    [
        ("see 【1】 and ⟦2⟧", "see ⟦1⟧ and ⟦2⟧"),
        ("see [[1]] and [[2]]", "see ⟦1⟧ and ⟦2⟧"),
        ("see ⟦1⟧ and 【1】", "see ⟦1⟧ and 【1】"),  # ⟦1⟧ is there: nothing is missing, nothing changes
        ("see 【1】 and 【1】 and ⟦2⟧", "see 【1】 and 【1】 and ⟦2⟧"),  # two candidates: ambiguous, left to fail
        ("see 【1】 and [[1]] and ⟦2⟧", "see 【1】 and [[1]] and ⟦2⟧"),
        ("see 【3】", "see 【3】"),  # no placeholder 3 in the segment
    ],
)
def test_lookalikes_are_repaired_only_when_unambiguous(translation, expected):
    from explainer.translation_checks import repair_placeholders

    assert repair_placeholders(translation, 2) == expected
