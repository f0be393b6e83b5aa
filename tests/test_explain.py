"""explain_file end to end: real chunking, the real openai SDK against a scripted server on
127.0.0.1, the real SQLite cache, and the rendered post read back with markdown-it-py."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import textwrap

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin
from ruamel.yaml import YAML
from scripted_server import Reply, user_text

from explainer.backends import UnusableAnswer
from explainer.backends.openai import OpenAIBackend
from explainer.cache import Cache
from explainer.chunking import chunk_file
from explainer.explain import budget_split, explain_file, off_piece, split_title, ungrounded_names
from explainer.post import Post, Section
from explainer.render import post_json, render_post

# Every chunk of this file starts with a different line, so an answer that echoes its chunk's
# first line can be traced back to exactly one code block of the post.
SAMPLE = '''\
"""A tiny sampler."""

import math


def softmax(xs):
    """Turn scores into probabilities that sum to one."""
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def pick(scores, temperature=1.0):
    probs = softmax([s / temperature for s in scores])
    best = 0

    for index, p in enumerate(probs):
        if p > probs[best]:
            best = index

    return best
'''
MAX_LINES = 4  # small enough that both functions are split into several chunks
TITLE = "Sampling, explained"


def markdown() -> MarkdownIt:
    return MarkdownIt("commonmark").use(front_matter_plugin)


def last_fence(text: str) -> str:
    """The content of the last fenced code block of a Markdown text."""
    fences = [token for token in markdown().parse(text) if token.type == "fence"]
    return fences[-1].content if fences else ""


def first_code_line(code: str) -> str:
    return next(line.strip() for line in code.splitlines() if line.strip())


def echo_script(source_path, extra: dict[str, str] | None = None):
    """A server script: the request that asks for a title (the introduction) gets a heading and
    one sentence; a chunk request (its last fenced block is one of the file's chunks) gets that
    chunk's first line in backticks, plus extra[first line] if given."""
    chunks = {c.code.rstrip("\n") for c in chunk_file(source_path, max_lines=MAX_LINES).chunks}
    extra = extra or {}

    def script(body):
        prompt = user_text(body)
        if "title" in prompt:
            return f"# {TITLE}\n\nThis post walks through `pick` and `softmax`."
        code = last_fence(prompt).rstrip("\n")
        assert code in chunks, "a chunk request must end with its chunk's code"
        first = first_code_line(code)
        # one sentence however long the extra: answers are cut to their sentence budget
        return f"This runs `{first}`: {extra[first]}" if first in extra else f"This runs `{first}`."

    return script


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sampler.py"
    path.write_text(SAMPLE, encoding="utf-8")
    return path


def backend_for(server) -> OpenAIBackend:
    return OpenAIBackend(model="test-model", base_url=server.base_url)


def fences_and_following_code(post_markdown: str) -> list[tuple[str, list[str]]]:
    """Each code block of the post with the inline code spans of the paragraph right after it."""
    tokens = markdown().parse(post_markdown)
    blocks = []
    for index, token in enumerate(tokens):
        if token.type != "fence":
            continue
        following = tokens[index + 1 : index + 3]
        spans = []
        if [t.type for t in following] == ["paragraph_open", "inline"]:
            spans = [child.content for child in following[1].children if child.type == "code_inline"]
        blocks.append((token.content, spans))
    return blocks


def test_one_request_per_chunk_plus_one_and_each_answer_lands_under_its_chunk(
    scripted_server, openai_env, sample, tmp_path
):
    server = scripted_server(echo_script(sample))
    chunks = chunk_file(sample, max_lines=MAX_LINES).chunks
    assert len(chunks) >= 6  # the file really is split: the test below is about many answers

    post, usage = explain_file(
        sample, backend=backend_for(server), cache=Cache(tmp_path / "cache"), max_lines=MAX_LINES, date="2024-05-01"
    )

    assert len(server.requests) == len(chunks) + 1
    assert (usage.requests, usage.cache_hits) == (len(chunks) + 1, 0)
    assert [(s.start_line, s.end_line, s.code) for s in post.sections] == [
        (c.start_line, c.end_line, c.code) for c in chunks
    ]
    rendered = render_post(post)
    blocks = fences_and_following_code(rendered)
    assert len(blocks) == len(chunks)
    for (code, spans), chunk in zip(blocks, chunks):
        assert code == textwrap.dedent(chunk.code).strip("\n") + "\n"
        assert spans == [first_code_line(chunk.code)], f"wrong answer under the code of lines {chunk.start_line}-"
    assert post.title == TITLE and post.intro == "This post walks through `pick` and `softmax`."


def test_a_second_identical_run_is_answered_from_the_cache(scripted_server, openai_env, sample, tmp_path):
    server = scripted_server(echo_script(sample))
    first, _ = explain_file(
        sample, backend=backend_for(server), cache=Cache(tmp_path / "cache"), max_lines=MAX_LINES, date="2024-05-01"
    )
    sent = len(server.requests)

    again, usage = explain_file(
        sample, backend=backend_for(server), cache=Cache(tmp_path / "cache"), max_lines=MAX_LINES, date="2024-05-01"
    )

    assert len(server.requests) == sent
    assert (usage.requests, usage.cache_hits, usage.tokens_in) == (0, sent, 0)
    assert render_post(again) == render_post(first)


def test_a_chunk_prompt_carries_its_context_and_no_other_answer(scripted_server, openai_env, sample):
    server = scripted_server(echo_script(sample))
    explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES)

    prompts = [user_text(body) for body in server.requests]
    calls_softmax = next(p for p in prompts if last_fence(p).startswith("    probs = softmax("))
    # the same-file function it calls, with its docstring
    assert "def softmax(xs):" in calls_softmax
    assert '"""Turn scores into probabilities that sum to one."""' in calls_softmax
    # the whole enclosing function, numbered as in the file, and which of its lines to explain
    assert "15 |     probs = softmax([s / temperature for s in scores])" in calls_softmax
    assert "19 |         if p > probs[best]:" in calls_softmax
    assert "Explain lines 15-" in calls_softmax
    # the earlier chunk, summarised from its code
    assert "def pick(scores, temperature=1.0):" in calls_softmax.split("```")[-3]
    # answers never feed other prompts, so all requests can run at once
    assert not any("This runs" in prompt for prompt in prompts)


def test_requests_about_one_symbol_share_their_beginning(scripted_server, openai_env, sample):
    """System prompt, file, the numbered definition and its callees come first, byte for byte the
    same in every request about the symbol, so a prefix cache (ours or a provider's) can reuse them."""
    server = scripted_server(echo_script(sample))
    explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES)

    prompts = [user_text(body) for body in server.requests]
    assert len(prompts) > 2
    shared = os.path.commonprefix(prompts)
    assert "def softmax(xs):" in shared  # the callee
    assert "22 |     return best" in shared  # the definition's last line
    pieces = [p for p in prompts if "Write the opening of the post" not in p]
    assert len(pieces) == len(prompts) - 1
    assert all(p[len(shared) :].count("```") >= 2 for p in pieces)  # each piece's own code follows
    systems = {body["messages"][0]["content"] for body in server.requests}
    assert len(systems) == 1


def test_names_the_code_does_not_contain_are_flagged(scripted_server, openai_env, sample):
    invented = "it is like `torch.empty` but uses `softmax`, `s / temperature`, `True` and `42`."
    server = scripted_server(echo_script(sample, {"probs = softmax([s / temperature for s in scores])": invented}))
    warnings = []

    post, _ = explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES, on_warning=warnings.append)

    flagged = {section.start_line: section.ungrounded for section in post.sections}
    assert flagged[15] == ["torch.empty"]
    assert all(names == [] for line, names in flagged.items() if line != 15)
    assert len(warnings) == 1 and "sampler.py, lines 15-17" in warnings[0] and "`torch.empty`" in warnings[0]
    assert json.loads(post_json(post))["sections"][1]["ungrounded"] == ["torch.empty"]


def test_lang_asks_for_the_answer_in_that_language_and_marks_the_post(scripted_server, openai_env, sample):
    server = scripted_server(echo_script(sample))
    post, _ = explain_file(sample, "softmax", backend=backend_for(server), lang="zh", max_lines=MAX_LINES)

    for body in server.requests:
        assert "Simplified Chinese" in body["messages"][0]["content"]
        assert "Simplified Chinese" in user_text(body)
    rendered = render_post(post)
    front = next(t for t in markdown().parse(rendered) if t.type == "front_matter")
    assert YAML(typ="safe").load(front.content)["lang"] == "zh"
    assert "test-model逐段解释了这段代码。" in rendered  # the notice from translations/zh.toml


@pytest.mark.parametrize(
    "span, context, flagged",
    [
        ("self.model.params", "params = self.model.params", []),
        ("model.params", "params = self.model.params", []),  # a tail of a dotted name in the code
        ("torch.empty", "x = torch.full((1,), 0)", ["torch.empty"]),  # `torch` alone does not ground it
        ("param", "params = 1", ["param"]),  # part of a longer name is not the name
        ("sample_top_p()", "sample_top_p(probs, p)", []),
        ("Llama::generate", "Llama::generate(a)", []),
        ("this->model", "this->model = m;", []),
        ("None", "", []),
        ("True", "", []),
        ("len", "", []),  # keywords and builtins
        ("42", "", []),
        ("x + 1", "", []),
        ('"cuda"', "", []),
        ("tokens[:, 0]", "", []),
        ("a.b/c", "", []),
    ],
)
def test_which_backticked_spans_count_as_invented_names(span, context, flagged):
    assert ungrounded_names(f"See `{span}` here.", context, frozenset({"None", "True", "len"})) == flagged


def test_only_inline_code_spans_are_checked():
    explanation = (
        "Escaped \\`frobnicate\\` is text.\n\n```python\nfrobnicate()\n```\n\n"
        "``` `grab` ``` holds backticks, `invented_name` is a name."
    )
    assert ungrounded_names(explanation, "") == ["invented_name"]


def test_the_title_is_the_heading_the_answer_opens_with():
    assert split_title("# Sampling: `pick` explained\n\nIt picks.\n\nTwice.", "x") == (
        "Sampling: `pick` explained",
        "It picks.\n\nTwice.",
    )
    assert split_title("No heading here.\n\n# Late heading", "sampler.py") == (
        "sampler.py",
        "No heading here.\n\n# Late heading",
    )


def post_with(code: str, explanation: str = "It works.", title: str = "A post") -> Post:
    return Post(
        title=title,
        lang="en",
        date="2024-05-01",
        source_path="src/x.py",
        code_language="python",
        intro="An intro.",
        model="m",
        sections=[
            Section(
                code=code,
                code_language="python",
                start_line=3,
                end_line=5,
                symbol="f",
                kind="block",
                explanation=explanation,
            )
        ],
    )


def test_the_translation_notice_shows_a_model_name_as_text():
    model = "gpt<svg onload=alert(8)> [z](javascript:alert(9))"
    rendered = render_post(post_with("x = 1\n"), translated_by=model)
    html = MarkdownIt("commonmark", {"html": True}).render(rendered.split("---\n", 2)[2])
    assert "<svg" not in html and "<a " not in html
    assert "gpt&lt;svg onload=alert(8)&gt; [z](javascript:alert(9)) helped translate this post." in html


def test_front_matter_survives_titles_that_look_like_yaml():
    for title in ['Nvidia 驱动: LLaMA "and" ChatGPT', "yes", "1.0", "# not a comment", "- item", "a: b: c"]:
        rendered = render_post(post_with("x = 1\n", title=title))
        front = next(t for t in markdown().parse(rendered) if t.type == "front_matter")
        data = YAML(typ="safe").load(front.content)
        assert list(data) == ["layout", "title", "lang", "date", "reviewed"]
        assert data["title"] == title and data["layout"] == "post"


def test_code_keeps_its_backticks_and_is_dedented_for_display():
    code = '        s = "```not a fence```"\n        t = "````"\n\n'
    blocks = fences_and_following_code(render_post(post_with(code)))
    assert blocks == [('s = "```not a fence```"\nt = "````"\n', [])]


@pytest.mark.skipif(shutil.which("ruby") is None, reason="needs ruby with the liquid gem (Jekyll's template engine)")
def test_liquid_leaves_code_and_prose_exactly_as_written():
    code = 'template = "{{ name }} {% if x %}{%- endraw -%}"\n'
    explanation = "Fills `{{ name }}` and runs `{% if x %}`."
    rendered = render_post(post_with(code, explanation))
    body = rendered.split("---\n", 2)[2]
    liquid = subprocess.run(
        ["ruby", "-e", 'require "liquid"; print Liquid::Template.parse(STDIN.read).render'],
        input=body,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    blocks = fences_and_following_code(liquid)
    assert blocks == [(code, ["{{ name }}", "{% if x %}"])]


INJECTED = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"


def test_html_in_an_answer_is_escaped_and_its_markdown_kept(scripted_server, openai_env, sample):
    """An explained file can tell the model what to write: its HTML reaches the post as text."""

    def script(body):
        if "title" in user_text(body):
            return f"# {TITLE}\n\nA **bold** start. {INJECTED}"
        return f"Compares `a < b` **first**. {INJECTED}\n\n```python\nif a < b: pass\n```"

    server = scripted_server(script)
    post, _ = explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES)
    rendered = render_post(post)

    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; and &lt;img src=x onerror=alert(1)&gt;"
    assert rendered.count(escaped) == len(post.sections) + 1 and "<script>" not in rendered
    assert "A **bold** start." in rendered
    assert rendered.count("Compares `a < b` **first**.") == len(post.sections)
    assert rendered.count("```python\nif a < b: pass\n```") == len(post.sections)
    assert INJECTED in post.intro  # the post's data keeps the answer as it came


def test_json_holds_every_field_of_the_post():
    post = post_with("x = 1\n")
    post.sections[0].ungrounded = ["torch.empty"]
    data = json.load(io.StringIO(post_json(post)))
    assert data["title"] == "A post" and data["sections"][0]["code"] == "x = 1\n"
    assert data["sections"][0]["ungrounded"] == ["torch.empty"]
    # The human language and the programming language under names that cannot be mixed up
    assert (data["lang"], data["code_language"], data["sections"][0]["code_language"]) == ("en", "python", "python")


def test_a_cut_off_answer_is_asked_again_once_firmly(scripted_server, openai_env, sample, tmp_path):
    plain = echo_script(sample)

    def script(body):
        prompt = user_text(body)
        if "title" in prompt and "Your answer must be short" not in prompt:
            return Reply("# Sampling\n\n```python\ndef pick(...)\n```\n## Step 1\n...", finish_reason="length")
        return plain(body)

    server = scripted_server(script)
    warnings = []
    post, usage = explain_file(
        sample,
        "pick",
        backend=backend_for(server),
        cache=Cache(tmp_path / "cache"),
        max_lines=MAX_LINES,
        on_warning=warnings.append,
    )

    assert post.title == TITLE
    firm = [user_text(body) for body in server.requests if "Your answer must be short" in user_text(body)]
    assert len(firm) == 1  # only the cut-off request is asked again
    assert any("asking again for shorter ones" in w for w in warnings)
    assert usage.requests == len(server.requests) - 1  # the cut-off answer was never counted as answered

    # a rerun is answered from the cache, the retried piece included, and writes the same post
    asked = len(server.requests)
    again, rerun = explain_file(
        sample,
        "pick",
        backend=backend_for(server),
        cache=Cache(tmp_path / "cache"),
        max_lines=MAX_LINES,
        on_warning=warnings.append,
    )
    assert len(server.requests) == asked and rerun.requests == 0
    assert again == post


def test_a_second_cut_off_fails_the_post(scripted_server, openai_env, sample):
    plain = echo_script(sample)
    server = scripted_server(
        lambda body: Reply("# Too long", finish_reason="length") if "title" in user_text(body) else plain(body)
    )
    with pytest.raises(UnusableAnswer, match="cut off"):
        explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES, on_warning=lambda w: None)
    assert sum("Your answer must be short" in user_text(body) for body in server.requests) == 1


def test_a_path_outside_the_current_folder_never_shows_where_it_lives(
    scripted_server, openai_env, tmp_path, monkeypatch
):
    project = tmp_path / "home" / "writer" / "proj"
    (project / ".git").mkdir(parents=True)
    (project / "src").mkdir()
    source = project / "src" / "sampler.py"
    source.write_text(SAMPLE, encoding="utf-8")
    loose = tmp_path / "elsewhere" / "sampler.py"
    loose.parent.mkdir()
    loose.write_text(SAMPLE, encoding="utf-8")
    monkeypatch.chdir(tmp_path / "elsewhere")
    server = scripted_server(echo_script(source))

    in_project, _ = explain_file(source, "pick", backend=backend_for(server), max_lines=MAX_LINES)
    monkeypatch.chdir(tmp_path)
    alone, _ = explain_file(str(loose), "pick", backend=backend_for(server), max_lines=MAX_LINES)

    assert in_project.source_path == "src/sampler.py"
    assert alone.source_path == "elsewhere/sampler.py"  # inside the current folder: relative to it
    monkeypatch.chdir(project)
    assert explain_file(loose, "pick", backend=backend_for(server), max_lines=MAX_LINES)[0].source_path == "sampler.py"
    assert not any(str(tmp_path) in user_text(body) for body in server.requests)


def test_explanations_are_asked_greedily_with_a_sentence_budget_that_grows_with_the_piece(
    scripted_server, openai_env, sample
):
    server = scripted_server(echo_script(sample))
    explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES)

    assert {body["temperature"] for body in server.requests} == {0}
    budgets = {}
    for body in server.requests:
        prompt = user_text(body)
        if "title" not in prompt:
            budgets[first_code_line(last_fence(prompt))] = prompt
    assert "in one sentence." in budgets["probs = softmax([s / temperature for s in scores])"]  # 2 lines
    loop = budgets["for index, p in enumerate(probs):"]  # 3 lines, but a loop: its pass and its end
    assert "in at most two sentences." in loop and "when the loop stops" in loop


STRAYED = "`pick` divides `scores` by `temperature`, runs `softmax` over them and loops with `index`."


def strays_at_return(sample, only_once: bool):
    """echo_script, but the piece `return best` is answered about the rest of `pick` (STRAYED): the first
    time only, or every time."""
    plain = echo_script(sample)

    def script(body):
        prompt = user_text(body)
        asked_again = "An earlier answer" in prompt
        if last_fence(prompt).strip() == "return best" and not (only_once and asked_again):
            return STRAYED
        return plain(body)

    return script


def test_an_answer_about_the_rest_of_its_definition_is_asked_again_and_the_new_one_kept(
    scripted_server, openai_env, sample, tmp_path
):
    server = scripted_server(strays_at_return(sample, only_once=True))
    warnings = []
    post, usage = explain_file(
        sample,
        "pick",
        backend=backend_for(server),
        cache=Cache(tmp_path / "cache"),
        max_lines=MAX_LINES,
        on_warning=warnings.append,
    )

    again = [user_text(b) for b in server.requests if "An earlier answer" in user_text(b)]
    assert len(again) == 1 and "`scores`, `temperature`, `index`" in again[0]
    assert post.sections[-1].explanation == "This runs `return best`."
    assert usage.extra["off_piece"] == 1 and not warnings
    asked = len(server.requests)
    rerun, rerun_usage = explain_file(
        sample, "pick", backend=backend_for(server), cache=Cache(tmp_path / "cache"), max_lines=MAX_LINES
    )
    assert len(server.requests) == asked and rerun == post  # the kept answer is the cached one


def test_an_answer_still_off_its_piece_is_kept_with_a_warning(scripted_server, openai_env, sample):
    server = scripted_server(strays_at_return(sample, only_once=False))
    warnings = []
    post, usage = explain_file(
        sample, "pick", backend=backend_for(server), max_lines=MAX_LINES, on_warning=warnings.append
    )

    assert post.sections[-1].explanation == STRAYED
    assert usage.extra["off_piece"] == 1
    assert len(warnings) == 1 and "asked twice, it describes code outside" in warnings[0]


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("Turns scores into probabilities that sum to one, as the docstring says.", "restates the docstring"),
        ("It computes things in a helpful way, as described above.", "names nothing the code of these lines uses"),
        (
            "It subtracts the largest score, `top`, before `math.exp`, so no exponential overflows, "
            "then divides each by their `total`.",
            None,
        ),
        ("It takes the maximum first, so that the exponentials stay small, and divides by the sum.", None),
    ],
)
def test_what_counts_as_an_answer_off_its_piece(sample, answer, reason):
    chunked = chunk_file(sample, "softmax", max_lines=30)
    [chunk] = chunked.chunks  # the whole function, docstring included
    found = off_piece(chunked, chunk, answer)
    assert (found is None) if reason is None else (reason in found), found


def test_the_introduction_keeps_its_opening_paragraph_only(scripted_server, openai_env, sample):
    plain = echo_script(sample)
    rambling = (
        f"# {TITLE}\n\n`pick` draws the likeliest score's index.\nIt divides by `temperature` first.\n\n"
        "## How it works\n\n1. **Softmax**: every score becomes a probability.\n2. It returns the largest.\n\n"
        "In summary, a crucial function."
    )
    server = scripted_server(lambda body: rambling if "title" in user_text(body) else plain(body))
    post, _ = explain_file(sample, "pick", backend=backend_for(server), max_lines=MAX_LINES)

    assert post.title == TITLE
    assert post.intro == "`pick` draws the likeliest score's index.\nIt divides by `temperature` first."


def test_an_introduction_without_a_paragraph_is_kept_as_it_is():
    from explainer.explain import opening_paragraph

    assert opening_paragraph("- one\n- two") == "- one\n- two"
    assert opening_paragraph("> quoted\n\nThen prose.") == "Then prose."


LONG_ANSWERS = {
    # lines 15-17, two lines of code: one sentence
    "probs = softmax([s / temperature for s in scores])": (
        "`probs` holds the `softmax` of each score over `temperature`. Then `best` starts at 0, e.g. the first "
        "index. A third sentence the budget has no room for."
    ),
    # the loop: its pass and when it stops, two sentences
    "for index, p in enumerate(probs):": (
        "One pass compares `p` with `probs[best]` and keeps the larger one's `index`. It stops after the last "
        "of `probs`.\n\nIt is a crucial step."
    ),
}


def test_an_answer_past_its_sentence_budget_keeps_its_first_sentences_and_the_cache_the_whole(
    scripted_server, openai_env, sample, tmp_path
):
    plain = echo_script(sample)

    def script(body):
        first = first_code_line(last_fence(user_text(body))) if "title" not in user_text(body) else ""
        return LONG_ANSWERS.get(first) or plain(body)

    server = scripted_server(script)
    cache = Cache(tmp_path / "cache")
    post, _ = explain_file(sample, "pick", backend=backend_for(server), cache=cache, max_lines=MAX_LINES)

    by_line = {section.start_line: section.explanation for section in post.sections}
    assert by_line[15] == "`probs` holds the `softmax` of each score over `temperature`."
    assert by_line[18] == (
        "One pass compares `p` with `probs[best]` and keeps the larger one's `index`. It stops after the last "
        "of `probs`."
    )
    # the JSON data keeps what was left out, for the author to read
    sections = json.loads(post_json(post))["sections"]
    assert (
        sections[1]["left_out"]
        == "Then `best` starts at 0, e.g. the first index. A third sentence the budget has no room for."
    )
    assert sections[2]["left_out"] == "It is a crucial step."
    assert sections[3]["left_out"] == ""
    # the cache keeps the model's whole answer: a later budget can keep more of it without asking again
    with sqlite3.connect(tmp_path / "cache" / "answers.sqlite") as stored:
        assert any("A third sentence" in text for (text,) in stored.execute("SELECT text FROM answers"))
    asked = len(server.requests)
    again, _ = explain_file(sample, "pick", backend=backend_for(server), cache=cache, max_lines=MAX_LINES)
    assert len(server.requests) == asked and again == post


@pytest.mark.parametrize(
    "answer, most, kept",
    [
        # dots in code spans, decimals and abbreviations end no sentence
        (
            "It calls `self.model.forward`, i.e. the model, with 0.5. Then more. And more.",
            1,
            "It calls `self.model.forward`, i.e. the model, with 0.5.",
        ),
        # a sentence may end inside a closing bracket or quote
        ('It stops (at the end.) Then "quoted." Third.', 2, 'It stops (at the end.) Then "quoted."'),
        # Chinese and Japanese full stops need no space
        ("它复制提示。然后生成。最后返回。", 2, "它复制提示。然后生成。"),
        # later paragraphs go whole
        ("One. Two.\n\nThree.\n\nFour.", 2, "One. Two."),
        ("One.\n\nTwo. Three.", 2, "One.\n\nTwo."),
        # within budget: as it is
        ("One. Two.", 2, "One. Two."),
        # a list, a heading or code: as it is
        ("Sets up:\n- `a`. Then.\n- `b`. Then.", 1, "Sets up:\n- `a`. Then.\n- `b`. Then."),
        ("# Title\n\nOne. Two.", 1, "# Title\n\nOne. Two."),
        # a cut inside a link would break it: as it is
        (
            "See [the loop. It stops](https://example.com/a.b) here. Then.",
            1,
            "See [the loop. It stops](https://example.com/a.b) here. Then.",
        ),
        ("See [the loop](https://example.com/a.b). Then.", 1, "See [the loop](https://example.com/a.b)."),
    ],
)
def test_which_sentences_an_answer_keeps(answer, most, kept):
    assert budget_split(answer, most)[0] == kept


def test_a_whole_definition_keeps_its_whole_answer(scripted_server, openai_env, sample):
    walk = "`softmax` turns scores into probabilities. It takes `top` first. Then `exps`. Then `total`. Then divides."
    server = scripted_server(lambda body: f"# {TITLE}\n\nIntro." if "title" in user_text(body) else walk)
    post, _ = explain_file(sample, "softmax", backend=backend_for(server), max_lines=30)

    [section] = post.sections
    assert section.kind == "function" and section.explanation == walk


@pytest.mark.parametrize(
    "answer, flagged",
    [
        ("The `pick` function is a method that samples a score, as its name says.", True),
        ("`pick()` draws an index from the scores.", True),
        ("One pass of the loop in `pick` keeps the `index` of the largest `p` in `best`.", False),
        ("One pass keeps the index of the largest probability.", False),
    ],
)
def test_an_answer_about_its_whole_definition_instead_of_its_lines_is_off_its_piece(sample, answer, flagged):
    chunked = chunk_file(sample, "pick", max_lines=MAX_LINES)
    [loop] = [c for c in chunked.chunks if c.kind == "for"]
    found = off_piece(chunked, loop, answer)
    assert (found is not None and "`pick` as a whole" in found) if flagged else found is None, found
