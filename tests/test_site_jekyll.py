"""examples/site, built by `explainer build` in three languages and then by the real Jekyll (the
Debian `jekyll` package, installed by .ci/run): what readers get is checked in the HTML."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt
from site_support import (
    GENERATED_DEMO_OUTPUT,
    REPO,
    STAND_IN_OUTPUT,
    LiveParts,
    is_translation,
    make_site,
    run_build,
    site_script,
)

LANGUAGES = ["en", "zh", "ar"]
PAGES = {"running-llama": "2023/08/17", "llama-generate": "2024/05/01"}


class Page(HTMLParser):
    """What a reader sees of a page: the <html> attributes, the text of each <pre>, the links."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.html_attributes: dict[str, str] = {}
        self.code_blocks: list[str] = []
        self.links: list[str] = []
        self.text = ""  # every text node; comments are not text
        self._in_pre = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "html":
            self.html_attributes = dict(attrs)
        elif tag == "pre":
            self._in_pre += 1
            if self._in_pre == 1:
                self.code_blocks.append("")
        elif tag == "a":
            self.links.append(dict(attrs).get("href", ""))

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre -= 1

    def handle_data(self, data):
        self.text += data
        if self._in_pre:
            self.code_blocks[-1] += data


def built_site(folder, script, languages):
    """examples/site built by `explainer build` against `script`, then by Jekyll."""
    if shutil.which("jekyll") is None:
        pytest.skip("needs Jekyll: apt-get install jekyll (.ci/run installs it)")
    from scripted_server import ScriptedServer

    with ScriptedServer(script) as server:
        config = make_site(folder, server.base_url, languages)
        built = run_build(config)
    assert built.returncode == 0, built.stderr
    site = config.parent
    jekyll = subprocess.run(
        ["jekyll", "build", "--source", str(site), "--destination", str(site / "_site")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert jekyll.returncode == 0, jekyll.stdout + jekyll.stderr
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return built_site(tmp_path_factory.mktemp("jekyll"), site_script, LANGUAGES)


def page(site, slug: str, lang: str) -> Page:
    return Page((site / "_site" / PAGES[slug] / f"{slug}-{lang}.html").read_text(encoding="utf-8"))


def source_code_blocks(site) -> list[str]:
    """The fenced blocks of the hand-written post as its author wrote them."""
    text = (site / "_sources" / "running-llama.md").read_text(encoding="utf-8")
    return [token.content for token in MarkdownIt("commonmark").parse(text) if token.type == "fence"]


def generate_source_lines() -> list[str]:
    """The lines of llama_ref's Llama.generate, decorators included, found with Python's own parser."""
    text = (REPO / "llama_ref" / "generation.py").read_text(encoding="utf-8")
    [llama] = [node for node in ast.parse(text).body if isinstance(node, ast.ClassDef) and node.name == "Llama"]
    [generate] = [node for node in llama.body if isinstance(node, ast.FunctionDef) and node.name == "generate"]
    first = min([generate.lineno, *(decorator.lineno for decorator in generate.decorator_list)])
    return text.splitlines()[first - 1 : generate.end_lineno]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_code_block_of_the_handwritten_post_is_verbatim_on_the_page(site, lang):
    blocks = [block.rstrip("\n") for block in page(site, "running-llama", lang).code_blocks]
    expected = [block.rstrip("\n") for block in source_code_blocks(site)]
    assert any("{{ name }}" in block and "{% if admin %}" in block for block in expected)
    demo = next(index for index, block in enumerate(expected) if "achieved tok/s" in block)
    # The page has the source's blocks in order, and the demo's real output right below the demo.
    assert blocks == expected[: demo + 1] + [STAND_IN_OUTPUT] + expected[demo + 1 :]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_explained_function_is_on_the_page_verbatim_with_its_demo_output(site, lang):
    blocks = page(site, "llama-generate", lang).code_blocks
    assert blocks[-1].rstrip("\n") == GENERATED_DEMO_OUTPUT
    source = generate_source_lines()
    shown = [line for block in blocks[:-2] for line in block.rstrip("\n").split("\n")]
    # Pieces are dedented, and blank lines between them dropped, for display: otherwise the page
    # shows generate() line for line, in order, and nothing else.
    assert [line.strip() for line in shown if line.strip()] == [line.strip() for line in source if line.strip()]


def test_right_to_left_pages_say_so_and_left_to_right_pages_too(site):
    for slug in PAGES:
        for lang in LANGUAGES:
            attributes = page(site, slug, lang).html_attributes
            assert attributes == {"lang": lang, "dir": "rtl" if lang == "ar" else "ltr"}
    css = (site / "_site" / "assets" / "css" / "style.css").read_text(encoding="utf-8")
    assert "pre, code { direction: ltr;" in css  # code reads left to right on a right-to-left page


def test_a_machine_written_post_says_so_and_its_edit_markers_leave_no_trace(site):
    for lang in LANGUAGES:
        explained = (site / "_site" / PAGES["llama-generate"] / f"llama-generate-{lang}.html").read_text(
            encoding="utf-8"
        )
        handwritten = (site / "_site" / PAGES["running-llama"] / f"running-llama-{lang}.html").read_text(
            encoding="utf-8"
        )
        assert "Machine-written, not reviewed yet." in explained
        assert "not reviewed" not in handwritten  # its author wrote it
        assert "explainer_written" not in explained
        # the markers are HTML comments: in the page's source, never in what a reader sees
        text = Page(explained).text
        assert "explainer:" not in text, text[text.index("explainer:") - 200 : text.index("explainer:") + 100]
        assert ("<!-- explainer: piece " in explained) == (lang == "en")  # translations have no markers
    source = (site / "_posts" / "en" / "2024-05-01-llama-generate-en.md").read_text(encoding="utf-8")
    assert "<!-- explainer: piece " in source  # the markers are in the post an author edits


def test_each_page_links_its_other_languages(site):
    for slug, day in PAGES.items():
        links = page(site, slug, "ar").links
        assert f"/{day}/{slug}-en.html" in links and f"/{day}/{slug}-zh.html" in links


# What an explained file with a prompt injection gets a model to write (the attributes quoted, as
# kramdown needs them to pass a tag through), and what a translator might add.
INJECTED = (
    '<script>alert(1)</script> <img src="x" onerror="alert(1)"> <img src=x onerror=alert(1)> '
    "[click](javascript:alert(1))"
)


def injected_script(body: dict) -> str:
    if is_translation(body):
        answer = json.loads(site_script(body))
        return json.dumps(
            # link text in Chinese: a segment of names alone ("NVIDIA NCCL, ⟦1⟧") stays Chinese with it
            {key: f"{value} [点这里](javascript:alert(1))" for key, value in answer.items()},
            ensure_ascii=False,
        )
    if "Write the opening" in body["messages"][-1]["content"]:
        return f"# How generate() writes text\n\nA **bold** start. {INJECTED}"
    return f"It compares `a < b` **first**. {INJECTED}"


def test_html_a_model_writes_is_not_live_on_the_site_and_its_markdown_is(tmp_path_factory):
    site = built_site(tmp_path_factory.mktemp("jekyll-injected"), injected_script, ["en", "zh"])
    for slug, day in PAGES.items():
        for lang in ("en", "zh"):
            html = (site / "_site" / day / f"{slug}-{lang}.html").read_text(encoding="utf-8")
            parts = LiveParts(html)
            assert "script" not in parts.elements
            assert parts.live_attributes == [] and parts.script_urls == []  # no onerror=, no javascript: link
    english = (site / "_site" / PAGES["llama-generate"] / "llama-generate-en.html").read_text(encoding="utf-8")
    assert "<strong>bold</strong>" in english and "<strong>first</strong>" in english
    assert ">a &lt; b</code>" in english  # a code span (kramdown adds its highlighter class)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in english  # shown to the reader as text
